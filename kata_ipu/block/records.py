"""The typed records of a pool's on-disk state: one record type per :class:`Kind`.

A record is what :class:`~kata_ipu.block.store.Store` keeps as
``<meta>/<kind>/<id>.json``; the JSON shape is the on-disk format and does not change::

    bases/<id>.json    {"id", "state", "size", "digest", "created"}
    volumes/<id>.json  {"id", "base", "state", "size", "export": Device.to_json() | null}

Records are immutable; a change is a new record (``dataclasses.replace``) written over the
old one after :func:`~kata_ipu.block.model.check_transition` accepted the state change.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kata_ipu.block.model import Device, State


class Kind(enum.StrEnum):
    """A kind of record; its value is the record directory's name."""

    BASES = "bases"
    VOLUMES = "volumes"

    @property
    def singular(self) -> str:
        return _SINGULAR[self]


_SINGULAR = {Kind.BASES: "base", Kind.VOLUMES: "volume"}


@dataclass(frozen=True, slots=True)
class BaseRecord:
    id: str
    state: State
    size: int
    digest: str
    created: float = field(default_factory=time.time)

    kind: ClassVar[Kind] = Kind.BASES

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state.value, "size": self.size,
                "digest": self.digest, "created": self.created}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseRecord:
        return cls(id=str(data["id"]), state=State(data["state"]), size=int(data["size"]),
                   digest=str(data["digest"]), created=float(data.get("created", 0.0)))


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    id: str
    base: str
    state: State
    size: int
    export: Device | None = None

    kind: ClassVar[Kind] = Kind.VOLUMES

    @property
    def listed(self) -> bool:
        """READY or EXPORTED: what ``list``/``get_volume`` show."""
        return self.state in LISTED

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "base": self.base, "state": self.state.value,
                "size": self.size, "export": self.export.to_json() if self.export else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        export = data.get("export")
        return cls(id=str(data["id"]), base=str(data["base"]), state=State(data["state"]),
                   size=int(data["size"]),
                   export=Device.from_json(export) if export else None)


Record = BaseRecord | VolumeRecord
LISTED = frozenset({State.READY, State.EXPORTED})
