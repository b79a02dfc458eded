"""Semantic errors of the block target, each derived from one class of :mod:`kata_ipu.errors`.

::

    KataIpuError
     ├── InvalidArgument ── BadId, BadImage
     ├── NotFound ───────── PoolNotFound, BaseNotFound, VolumeNotFound
     ├── AlreadyExists ──── BaseExists, VolumeExists
     ├── ResourceExhausted ─ PoolFull, NoFreeLoop
     ├── FailedPrecondition ─ BaseInUse, VolumeBusy, NeedsIpu
     ├── Unimplemented ──── ExportNotSupported
 ├── Internal ───────── IllegalTransition
 └── Unavailable ────── DaemonUnavailable
"""

from __future__ import annotations

from kata_ipu.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)


class BadId(InvalidArgument):
    def __init__(self, what: str, value: object, rule: str) -> None:
        super().__init__(f"invalid {what} id {value!r}: {rule}")
        self.value = value


class BadImage(InvalidArgument):
    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"cannot import {path}: {reason}")
        self.path = path


class PoolNotFound(NotFound):
    def __init__(self, root: object) -> None:
        super().__init__(f"no block pool at {root}")
        self.root = root


class BaseNotFound(NotFound):
    def __init__(self, base_id: str) -> None:
        super().__init__(f"base {base_id!r} not found")
        self.base_id = base_id


class VolumeNotFound(NotFound):
    def __init__(self, volume_id: str) -> None:
        super().__init__(f"volume {volume_id!r} not found")
        self.volume_id = volume_id


class BaseExists(AlreadyExists):
    def __init__(self, base_id: str, reason: str) -> None:
        super().__init__(f"base {base_id!r} already exists {reason}")
        self.base_id = base_id


class VolumeExists(AlreadyExists):
    def __init__(self, volume_id: str, base_id: str) -> None:
        super().__init__(f"volume {volume_id!r} already exists as a clone of base {base_id!r}")
        self.volume_id = volume_id
        self.base_id = base_id


class PoolFull(ResourceExhausted):
    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"pool full: need {needed} bytes, {free} bytes free")
        self.needed = needed
        self.free = free


class NoFreeLoop(ResourceExhausted):
    def __init__(self) -> None:
        super().__init__("no free loop device could be configured")


class BaseInUse(FailedPrecondition):
    def __init__(self, base_id: str, clones: list[str]) -> None:
        shown = ", ".join(clones[:5]) + (" ..." if len(clones) > 5 else "")
        super().__init__(f"base {base_id!r} has {len(clones)} live clone(s): {shown}")
        self.base_id = base_id
        self.clones = clones


class VolumeBusy(FailedPrecondition):
    def __init__(self, volume_id: str, reason: str) -> None:
        super().__init__(f"volume {volume_id!r} is busy: {reason}")
        self.volume_id = volume_id


class NeedsIpu(FailedPrecondition):
    def __init__(self, kind: str, backend: str) -> None:
        super().__init__(
            f"export kind {kind} needs a hardware IPU/DPU (an SR-IOV virtual function); "
            f"the software backend {backend!r} cannot provide it"
        )
        self.kind = kind
        self.backend = backend


class DaemonUnavailable(Unavailable):
    def __init__(self, what: str) -> None:
        super().__init__(f"qemu-storage-daemon unavailable: {what}")


class ExportNotSupported(Unimplemented):
    def __init__(self, kind: str, backend: str, supported: list[str]) -> None:
        super().__init__(
            f"backend {backend!r} cannot export {kind}; it supports {', '.join(supported)}")
        self.kind = kind
        self.backend = backend


class IllegalTransition(Internal):
    def __init__(self, what: str, object_id: str, old: object, new: object) -> None:
        old_name = getattr(old, "value", old)
        new_name = getattr(new, "value", new)
        super().__init__(f"{what} {object_id!r}: illegal state change {old_name} -> {new_name}")
        self.object_id = object_id
