"""Talking to kata-ipud (``kataipu.v1``) from the host side: the shim proxy, kata-ipu-runtime
and the ipu snapshotter.

:func:`prepare` returns the exported clone as a :class:`Prepared` device; :func:`release` is
idempotent; :func:`pull` (the snapshotter's) returns the image's identity and layers as a
:class:`Pulled`; :func:`remove_image` drops an image the host no longer uses. Failures keep
their gRPC class (``NotFound``, ``ResourceExhausted``...) and get a message that says what
the IPU was asked and why it refused; an unreachable daemon is :class:`IpuUnreachable`
(``Unavailable``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

from kata_ipu import api
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.errors import FailedPrecondition, KataIpuError, Unavailable
from kata_ipu.ttrpc import Client, ConnectionClosed
from kata_ipu.ttrpc.client import Message, MessageParser
from shim_hooks.taskapi import Mount

log = logging.getLogger("shim_hooks.ipu")

EXPORT_KINDS = {"host-block": pb.HOST_BLOCK, "vhost-user-blk": pb.VHOST_USER_BLK,
                "nbd": pb.NBD, "vfio-pci": pb.VFIO_PCI}
CONNECT_TIMEOUT = 5.0
M = TypeVar("M")


class IpuUnreachable(Unavailable):
    """kata-ipud does not answer at the configured address."""


@dataclass(frozen=True, slots=True)
class Prepared:
    key: str
    image: str
    image_digest: str
    volume_id: str
    path: str
    major: int
    minor: int
    fstype: str
    options: tuple[str, ...]
    cold: bool
    mountpoint: str = ""  # where the proxy mounted it on the host itself ("" if it did not)

    def mount(self) -> Mount:
        """The one rootfs mount containerd's shims understand: ``ext4 /dev/loopN``."""
        return Mount(type=self.fstype, source=self.path, options=self.options)

    def record(self) -> dict[str, object]:
        return {"key": self.key, "image": self.image, "image_digest": self.image_digest,
                "volume_id": self.volume_id, "device": self.path, "major": self.major,
                "minor": self.minor, "fstype": self.fstype, "cold": self.cold,
                **({"mountpoint": self.mountpoint} if self.mountpoint else {})}


async def _connect(address: str) -> Client:
    try:
        return await Client.connect(address, timeout=CONNECT_TIMEOUT)
    except KataIpuError as exc:
        raise IpuUnreachable(f"kata-ipu: the IPU service at {address} is unreachable "
                             f"({exc.message})") from exc


def _refused(what: str, exc: KataIpuError) -> KataIpuError:
    err = type(exc)(f"kata-ipu: {what} failed: {exc.message}")
    err.__cause__ = exc
    return err


_kept: dict[str, Client] = {}  # address -> a connection made ahead (keep_connection)


async def keep_connection(address: str) -> None:
    """Connect to kata-ipud ahead of a ``Prepare``, for the next :func:`prepare` on this event
    loop (an idle kata-ipu-shimd spare does this on the loop its start will run on): that
    ``Prepare`` then skips the connect and the daemon's accept. Failures only mean that
    ``Prepare`` connects itself."""
    try:
        _kept[address] = await Client.connect(address, timeout=CONNECT_TIMEOUT)
    except KataIpuError as exc:
        log.debug("no connection kept to %s: %s", address, exc)


def has_kept(address: str) -> bool:
    kept = _kept.get(address)
    return kept is not None and not kept.closed


async def drop_kept() -> None:
    """Close kept connections no ``Prepare`` used: a spare's, once its start is done (a
    proxy that later containers join keeps its own for the next one), and the proxy's when
    it exits."""
    kept = list(_kept.values())
    _kept.clear()
    for client in kept:
        await client.close()


async def _call_prepare(client: Client, req: pb.PrepareRequest, timeout: float, *,
                        kept: bool = False) -> pb.PrepareResponse | None:
    """One ``Prepare`` on ``client`` (closed afterwards). None: ``client`` was a kept
    connection the daemon closed meanwhile (it restarted while a spare idled); ``Prepare``
    of a key is idempotent, so the caller asks again on a new connection."""
    async with client:
        try:
            return await client.call_message(api.ROOTFS_SERVICE, "Prepare", req,
                                             pb.PrepareResponse, timeout=timeout)
        except KataIpuError as exc:
            if kept and isinstance(exc, ConnectionClosed):
                log.debug("the kept connection to kata-ipud was closed: %s", exc.message)
                return None
            raise _refused(f"Prepare of {req.image} for {req.container_id}", exc) from None


async def prepare(address: str, key: str, image: str, export: str,
                  annotations: dict[str, str], timeout: float, *, layers: int = 0,
                  read_only: bool = False) -> Prepared:
    """A clone of ``image``'s base (of its first ``layers`` layers if not 0) for ``key``.
    ``read_only``: the caller mounts it read-only (the clone is still a private one)."""
    req = pb.PrepareRequest(container_id=key, image=image, export=EXPORT_KINDS[export],
                            annotations=annotations, options=pb.PrepareOptions(layers=layers))
    resp = None
    if (kept := _kept.pop(address, None)) is not None and not kept.closed:
        resp = await _call_prepare(kept, req, timeout, kept=True)
    if resp is None:
        resp = await _call_prepare(await _connect(address), req, timeout)
    if resp is None:  # only a kept connection answers None; a new one raises instead
        raise IpuUnreachable(f"kata-ipu: the IPU service at {address} closed the connection")
    dev = resp.rootfs.device
    prepared = Prepared(
        key=key, image=image, image_digest=resp.rootfs.image_digest,
        volume_id=resp.rootfs.volume_id, path=dev.path, major=dev.major, minor=dev.minor,
        fstype=pb.FsType.Name(dev.fstype).lower() if dev.fstype else "ext4",
        options=tuple(dev.mount_options) + (("ro",) if dev.read_only or read_only else ()),
        cold=resp.cold)
    if not prepared.path.startswith("/dev/"):
        # Kata detects a block rootfs only for a node under /dev (notes/kata.md §1).
        await release(address, key, timeout)
        raise FailedPrecondition(f"kata-ipu: export {export} of {key} gave no block device "
                                 f"under /dev ({prepared.path!r}): it cannot be a rootfs")
    return prepared


async def _once(address: str, service: str, method: str, req: Message, resp: MessageParser[M],
                timeout: float, what: str) -> M:
    """One call on a connection of its own; a refusal says ``what`` was asked."""
    client = await _connect(address)
    async with client:
        try:
            return await client.call_message(service, method, req, resp, timeout=timeout)
        except KataIpuError as exc:
            raise _refused(what, exc) from None


async def release(address: str, key: str, timeout: float = 60.0) -> None:
    await _once(address, api.ROOTFS_SERVICE, "Release", pb.ReleaseRequest(container_id=key),
                pb.ReleaseResponse, timeout, f"Release of {key}")


@dataclass(frozen=True, slots=True)
class Pulled:
    """An image the IPU holds, with what containerd's chain ids are computed from."""

    image: str  # as asked for
    digest: str  # the IPU's manifest digest (OCI form)
    layers: tuple[str, ...]  # layer digests, lowest first
    diff_ids: tuple[str, ...]


async def pull(address: str, image: str, timeout: float) -> Pulled:
    """Have the IPU pull ``image`` and build its base; returns when the base is ready."""
    resp = await _once(address, api.IMAGE_SERVICE, "Pull", pb.PullRequest(image=image),
                       pb.PullResponse, timeout, f"Pull of {image}")
    img = resp.image
    return Pulled(image, img.digest, tuple(img.layers), tuple(img.diff_ids))


async def remove_image(address: str, image: str, timeout: float = 60.0) -> None:
    """Remove ``image`` from the IPU unless clones of it live (FAILED_PRECONDITION then)."""
    await _once(address, api.IMAGE_SERVICE, "Remove", pb.RemoveImageRequest(image=image),
                pb.RemoveImageResponse, timeout, f"Remove of {image}")
