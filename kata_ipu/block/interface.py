"""The block-target interface every backend implements (``file``, ``qsd``, later ``spdk``).

See :mod:`kata_ipu.block` for the lifecycle walk-through. Methods take objects or their ids;
every one is idempotent by id and safe to call concurrently (threads or processes) on the
same id.
"""

from __future__ import annotations

import abc
import contextlib
import os
from typing import ClassVar

from kata_ipu.block.model import Base, Device, ExportKind, Listing, Pool, Usage, Volume
from kata_ipu.errors import NotFound


class BlockTarget(abc.ABC):
    """A pool of read-only bases and their writable copy-on-write clones."""

    backend: ClassVar[str]
    export_kinds: ClassVar[frozenset[ExportKind]]

    @property
    @abc.abstractmethod
    def pool(self) -> Pool:
        """The pool this target manages."""

    @abc.abstractmethod
    def import_base(self, image: str | os.PathLike[str], base_id: str, *,
                    content_id: str | None = None) -> Base:
        """Copy a raw filesystem image into the pool as base ``base_id``, read-only from then
        on. Repeating the call with the same content returns the same base; different content
        under the same id raises :class:`~kata_ipu.block.errors.BaseExists`; not enough space
        raises :class:`~kata_ipu.block.errors.PoolFull` before anything is written.

        "Same content" is the sha256 of the image file, unless the caller names the content
        itself with ``content_id`` (e.g. "built from manifest X as ext4"): then the image is
        not read at all, which is what keeps a fresh import cheap for large images."""

    @abc.abstractmethod
    def get_base(self, base_id: str) -> Base:
        """The base ``base_id`` or :class:`~kata_ipu.block.errors.BaseNotFound`."""

    @abc.abstractmethod
    def destroy_base(self, base_id: str) -> None:
        """Remove a base; :class:`~kata_ipu.block.errors.BaseInUse` while clones exist."""

    @abc.abstractmethod
    def clone(self, base: Base | str, volume_id: str) -> Volume:
        """A writable copy-on-write clone of ``base`` named ``volume_id`` (idempotent)."""

    @abc.abstractmethod
    def get_volume(self, volume_id: str) -> Volume:
        """The volume ``volume_id`` or :class:`~kata_ipu.block.errors.VolumeNotFound`."""

    @abc.abstractmethod
    def export(self, volume: Volume | str, kind: ExportKind) -> Device:
        """Present the volume as ``kind``; the same call again returns the same device."""

    @abc.abstractmethod
    def unexport(self, volume: Volume | str, *, force: bool = False) -> None:
        """Withdraw the volume's export (a no-op if it has none). A host block device that is
        still mounted raises :class:`~kata_ipu.block.errors.VolumeBusy` unless ``force``."""

    @abc.abstractmethod
    def destroy(self, volume: Volume | str, *, missing_ok: bool = False) -> None:
        """Unexport and delete a volume. An unknown id raises
        :class:`~kata_ipu.block.errors.VolumeNotFound` unless ``missing_ok``; pieces already
        missing (loop device, daemon export, file) are skipped."""

    def retire(self, volume: Volume | str) -> None:
        """The seed's destroy flow for a volume in use: hot-remove its export first, then
        delete it. Idempotent: a volume (or export) already gone is not an error."""
        with contextlib.suppress(NotFound):
            self.unexport(volume)
        self.destroy(volume, missing_ok=True)

    @abc.abstractmethod
    def list(self) -> Listing:
        """Every base and volume that is ready or exported (never half-created ones)."""

    @abc.abstractmethod
    def usage(self) -> Usage:
        """Pool capacity and space used."""

    @abc.abstractmethod
    def recover(self) -> None:
        """Reconcile the on-disk records with reality after a crash or restart."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release this handle; exports and long-lived daemons stay up."""

    @abc.abstractmethod
    def destroy_pool(self, *, force: bool = False) -> None:
        """Tear the pool down completely; with ``force`` its volumes and bases first."""
