"""What Kata's runtimes do with the rootfs the proxy hands them, and so what the proxy must add
or refuse before it forwards ``Create`` to the Kata delegate (shared/notes/kata.md).

Each rule names the Kata code it follows (Kata 3.19.1; main behaves the same):

Read-only
    Kata's Go runtime drops the options of the rootfs mount: ``hotplugDrive`` builds the
    ``BlockDrive`` without them and the agent's ``Storage`` gets none (containerd-shim-v2
    ``create.go: checkAndMount``, virtcontainers ``container.go: hotplugDrive``), so an
    ``ro`` the IPU asks for is lost and the guest mounts the clone read-write. Only the
    spec's ``root.readonly`` makes a container root read-only there (the agent's
    ``rustjail`` remounts it read-only). runtime-rs passes options on; the spec does no harm.
EROFS
    Kata recognises EROFS only as containerd's erofs snapshotter lays it out: an ``overlay``
    mount whose layers are erofs files (``IsErofsRootFS``; runtime-rs ``erofs_rootfs.rs``,
    the agent's ``multi_layer_erofs.rs``). A bare erofs block device is hot-plugged and
    mounted as it is, a read-only ``/``: the container cannot write its own root. The
    overlay over it is stacked only by this project's guest side, not by Kata's agent.
Passthrough
    With ``disable_block_device_use = false`` (which the kata-ipu handler needs), a rootfs
    that is not a block device but sits on one (a bind or an already mounted directory, an
    empty ``rootfs`` list) makes Kata hot-plug the *host's* disk that holds it
    (``hotplugDrive`` → ``getDeviceForPath``; kata-containers/runtime#2734). Only an
    overlayfs rootfs is safe to pass through: Kata shares it over virtio-fs.
vhost-user-blk
    Kata takes vhost-user-blk only as a volume, never as the rootfs (``isBlockDevice``
    needs a ``/sys/dev/block`` entry; see :func:`shim_hooks.ipu.prepare`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kata_ipu.errors import FailedPrecondition
from shim_hooks.taskapi import Mount

KATA = "kata"


def check_export(delegate: str, fstype: str, key: str) -> None:
    """Refuse an export the Kata delegate would turn into a broken root."""
    if delegate == KATA and fstype == "erofs":
        raise FailedPrecondition(
            f"kata-ipu: {key}: an EROFS rootfs cannot go to Kata: Kata mounts a bare erofs "
            "device as a read-only / (it takes EROFS only as the erofs snapshotter's overlay); "
            "configure kata-ipud's rootfs fstype as ext4 or xfs for the kata delegate")


def needs_readonly_root(delegate: str, options: Iterable[str], spec: dict[str, Any]) -> bool:
    """True when the spec must say ``root.readonly`` for the mount's ``ro`` to hold."""
    return (delegate == KATA and "ro" in tuple(options)
            and not (spec.get("root") or {}).get("readonly", False))


def check_passthrough(delegate: str, rootfs: Iterable[Mount], cid: str, why: str) -> None:
    """Refuse to hand Kata containerd's own rootfs unless it is overlayfs; ``why``: the reason
    there is no IPU rootfs, kept in the refusal."""
    if delegate != KATA:
        return
    mounts = tuple(rootfs)
    unsafe = [m for m in mounts if m.type != "overlay"]
    if not mounts or unsafe:
        what = (", ".join(f"{m.type} {m.source}" for m in unsafe) if unsafe
                else "no rootfs mounts (a host directory as root.path)")
        raise FailedPrecondition(
            f"kata-ipu: container {cid}: fallback \"passthrough\" refused for the kata "
            f"delegate: its rootfs is {what}, not overlayfs; with block devices enabled Kata "
            "would hot-plug the host disk that holds it (kata-containers/runtime#2734); "
            f"no IPU rootfs because: {why}")
