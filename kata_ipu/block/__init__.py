"""The block target: a pool of read-only base images and their copy-on-write clones, exported
to the host or into a VM (the seed's SPDK lvstore + ``bdev_lvol_snapshot`` +
``bdev_lvol_clone`` + vhost/NBD export, as a software IPU).

Terms
-----
*pool*
    Where bases and volumes live, with its capacity. Created once with :func:`create_pool`,
    opened with :func:`open_pool` (which also runs crash recovery).
*base*
    An imported raw filesystem image (ext4, erofs...). Read-only from the moment it is
    imported: the snapshot every container of one image shares.
*volume*
    A writable copy-on-write clone of one base, named by the caller (a container id).
*device*
    An export of a volume: a host block device, a vhost-user-blk socket, an NBD export or a
    FUSE file, carrying a virtio-blk serial (<= 20 bytes) derived from the volume id.

Lifecycle: preparing an image
-----------------------------
::

    target = create_pool("/var/lib/kata-ipu/block", backend="file", size=64 << 30)
    base = target.import_base("/var/lib/kata-ipu/images/sha256-ab12.ext4", "sha256-ab12")

``import_base`` checks the space first (``PoolFull`` leaves nothing behind), copies the image
keeping its holes and marks it read-only (``chmod 0444`` and, where supported, the immutable
flag). Importing the same content under the same id again returns the same base.

Lifecycle: running a container
------------------------------
::

    vol = target.clone(base, "ctr-1234")                    # FICLONE reflink / qcow2 overlay
    dev = target.export(vol, ExportKind.HOST_BLOCK)         # runc mounts dev.path
    dev = target.export(vol, ExportKind.VHOST_USER_BLK)     # or: a Kata VM hot-plugs dev.socket
    ...
    target.destroy(vol)                                     # unexport + delete, tolerant

Each call is idempotent by id (``clone`` of an existing id with the same base returns it,
``export`` with the same kind returns the same device) and safe against concurrent calls on
the same id from threads or processes (per-id ``flock``). A volume has one export at a time;
``VFIO_PCI`` raises ``NeedsIpu`` on the software backends. ``destroy_base`` refuses while
clones exist (``BaseInUse``); ``destroy`` of an unknown id raises ``VolumeNotFound`` unless
``missing_ok``; teardown skips pieces that are already gone (os-brick's habit).

Lifecycle: crashes and restarts
-------------------------------
Every change writes an intent record (``CREATING``/``DESTROYING``) before it touches data, so
``open_pool``/``recover`` can roll back interrupted operations, remove orphan files and forget
(``file``) or re-create (``qsd``) exports that no longer exist; ``list`` only ever shows
``READY``/``EXPORTED`` objects. The ``qsd`` backend also notices a dead
``qemu-storage-daemon`` on the next call and rebuilds its nodes and exports from disk.

Backends
--------
``file`` (:class:`~kata_ipu.block.filebackend.FileTarget`, default)
    XFS ``reflink=1`` (a loop-mounted sparse pool file when the state directory does not
    support reflink), ``FICLONE`` clones, ``LOOP_CONFIGURE`` host export, vhost-user-blk
    through a per-export ``qemu-storage-daemon``.
``qsd`` (:class:`~kata_ipu.block.qsdbackend.QsdTarget`)
    one long-lived ``qemu-storage-daemon`` per pool over QMP; qcow2 overlays over a read-only
    raw base node; vhost-user-blk, NBD and FUSE exports; host block device = FUSE + loop.
"""

from kata_ipu.block.errors import (
    BadId,
    BadImage,
    BaseExists,
    BaseInUse,
    BaseNotFound,
    DaemonUnavailable,
    ExportNotSupported,
    NeedsIpu,
    NoFreeLoop,
    PoolFull,
    PoolNotFound,
    VolumeBusy,
    VolumeExists,
    VolumeNotFound,
)
from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.model import (
    Base,
    Device,
    ExportKind,
    Listing,
    Pool,
    State,
    Usage,
    Volume,
    serial_for,
)
from kata_ipu.block.pool import BACKENDS, create_pool, open_pool

__all__ = [
    "BACKENDS", "BadId", "BadImage", "Base", "BaseExists", "BaseInUse", "BaseNotFound",
    "BlockTarget", "DaemonUnavailable", "Device", "ExportKind", "ExportNotSupported",
    "Listing", "NeedsIpu", "NoFreeLoop", "Pool", "PoolFull",
    "PoolNotFound", "State", "Usage", "Volume", "VolumeBusy", "VolumeExists",
    "VolumeNotFound", "create_pool", "open_pool", "serial_for",
]
