"""The ``kataipu.v1`` messages of the daemon's records: one table per enum, both ways.

:data:`EXPORT_KINDS` is the one table between the block target's
:class:`~kata_ipu.block.model.ExportKind` and the API's ``ExportKind`` (a request's
``EXPORT_UNSPECIFIED`` means ``HOST_BLOCK``; ``FUSE`` has no API value and shows as
unspecified). The state database stores a kind by its enum name and the block target by its
value: both are the enum itself, not tables.

May import: ``kata_ipu.api``, the block model, the state records. Nothing here does I/O.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.block.model import ExportKind
from kata_ipu.daemon.state import BaseRecord, ImageRecord, VolumeRecord

EXPORT_KINDS: tuple[tuple[pb.ExportKind, ExportKind], ...] = (
    (pb.HOST_BLOCK, ExportKind.HOST_BLOCK),
    (pb.VHOST_USER_BLK, ExportKind.VHOST_USER_BLK),
    (pb.VFIO_PCI, ExportKind.VFIO_PCI),
    (pb.NBD, ExportKind.NBD),
)
_KIND_OF: dict[pb.ExportKind, ExportKind] = {
    pb.EXPORT_UNSPECIFIED: ExportKind.HOST_BLOCK, **dict(EXPORT_KINDS)}
_PB_OF: dict[ExportKind, pb.ExportKind] = {kind: v for v, kind in EXPORT_KINDS}

FS: dict[pb.FsType, str | None] = {
    pb.FS_UNSPECIFIED: None, pb.EXT4: "ext4", pb.EROFS: "erofs"}
_FS_TO_PB: dict[str, pb.FsType] = {"ext4": pb.EXT4, "erofs": pb.EROFS}


def export_kind(value: pb.ExportKind) -> ExportKind:
    """The block target's kind of a request's ``export`` (KeyError: not an API value)."""
    return _KIND_OF[value]


def export_value(kind: ExportKind) -> pb.ExportKind:
    """The API's value of a device's kind (``EXPORT_UNSPECIFIED``: one the API lacks)."""
    return _PB_OF.get(kind, pb.EXPORT_UNSPECIFIED)


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def platform_text(p: pb.Platform) -> str:
    if not p.os and not p.architecture:
        return ""
    return "/".join(x for x in (p.os or "linux", p.architecture, p.variant) if x)


def image_message(img: ImageRecord, bases: list[BaseRecord], clones: int,
                  layers: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> pb.Image:
    os_, _, rest = img.platform.partition("/")
    arch, _, variant = rest.partition("/")
    return pb.Image(
        name=img.names[0] if img.names else "", digest=img.digest,
        config_digest=img.config_digest,
        platform=pb.Platform(os=os_, architecture=arch, variant=variant),
        size_bytes=img.size_bytes,
        bases=[pb.BaseImage(id=b.id, fstype=_FS_TO_PB.get(b.fstype, pb.FS_UNSPECIFIED),
                            size_bytes=b.size_bytes, built_at=ts(b.built_at),
                            build_seconds=b.build_seconds, layers=b.layers) for b in bases],
        created_at=ts(img.created_at), clones=clones, layers=layers[0],
        diff_ids=layers[1])


def device_message(vol: VolumeRecord, fstype: str) -> pb.Device:
    """The API's device of a volume row (an empty one while the row has no device)."""
    dev = vol.device
    fs = _FS_TO_PB.get(fstype, pb.FS_UNSPECIFIED)
    if dev is None:
        return pb.Device(kind=pb.EXPORT_UNSPECIFIED, fstype=fs, read_only=False)
    kind = export_value(dev.kind)
    return pb.Device(
        kind=kind, path=dev.path, major=dev.major or 0, minor=dev.minor or 0, fstype=fs,
        read_only=False, serial=dev.serial,
        vhost_socket=(dev.socket or "") if kind == pb.VHOST_USER_BLK else "",
        size_bytes=dev.size, nbd_uri=dev.path if kind == pb.NBD else "")


def rootfs_message(vol: VolumeRecord, fstype: str) -> pb.Rootfs:
    return pb.Rootfs(container_id=vol.container_id, image=vol.image, image_digest=vol.digest,
                     volume_id=vol.volume_id, device=device_message(vol, fstype),
                     created_at=ts(vol.created_at), annotations=vol.annotations)
