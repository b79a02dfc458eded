"""The shim v2 proxy: a ttrpc ``containerd.task.v2.Task`` server in front of a delegate shim.

Every call is forwarded to the delegate (``containerd-shim-runc-v2`` or
``containerd-shim-kata-v2``) as opaque bytes with its metadata (containerd's namespace) and its
remaining deadline; replies and error statuses come back unchanged. Two calls do more:

``Create``
    The bundle's annotations name the image (:func:`shim_hooks.bundle.plan`). The proxy asks
    kata-ipud to ``Prepare`` a clone, replaces ``CreateTaskRequest.rootfs`` with one mount of
    the exported block device (``ext4 /dev/loopN``), points ``root.path`` at ``rootfs``, records
    the volume in the bundle and forwards. runc's shim mounts that device as the container root;
    Kata's shim sees a block device under ``/dev`` and hot-plugs it (virtio-blk) for the agent
    to mount. A failed forward releases the volume again. Without an image, or when the IPU
    refuses, Create fails with the reason, unless ``fallback = "passthrough"``.
``Delete`` (of a container, not of an exec)
    Forwarded first; then the volume is released.

The proxy lives as long as its delegate: when the delegate's connection closes (``Shutdown``,
a crash) the proxy stops serving and exits, and containerd sees the shim gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from kata_ipu import log as jsonlog
from kata_ipu.errors import KataIpuError
from kata_ipu.ttrpc import NAMESPACE_KEY, CallContext, Client, Server
from kata_ipu.ttrpc.errors import ConnectionClosed
from shim_hooks import bundle as bundles
from shim_hooks import ipu
from shim_hooks.config import ShimConfig
from shim_hooks.taskapi import (
    TASK_METHODS,
    TASK_SERVICE,
    CreateTaskRequest,
    decode_id_request,
    replace_rootfs,
)

log = logging.getLogger("shim_hooks.proxy")

Handler = Callable[[CallContext, bytes], Awaitable[bytes]]


@dataclass
class _Volume:
    key: str
    bundle: Path


class TaskProxy:
    """Forwards the Task API to ``delegate``; owns the container → IPU volume mapping."""

    def __init__(self, cfg: ShimConfig, delegate: Client, namespace: str) -> None:
        self.cfg = cfg
        self.delegate = delegate
        self.namespace = namespace
        self.volumes: dict[str, _Volume] = {}

    def handlers(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {m: self._forwarder(m) for m in TASK_METHODS}
        out["Create"] = self.create
        out["Delete"] = self.delete
        out["Shutdown"] = self.shutdown
        return out

    def _forwarder(self, method: str) -> Handler:
        async def forward(ctx: CallContext, payload: bytes) -> bytes:
            return await self.forward(method, ctx, payload)
        return forward

    async def forward(self, method: str, ctx: CallContext, payload: bytes) -> bytes:
        return await self.delegate.call(TASK_SERVICE, method, payload, timeout=ctx.timeout,
                                        metadata=ctx.metadata)

    # -- Create ------------------------------------------------------------------------------
    async def create(self, ctx: CallContext, payload: bytes) -> bytes:
        req = CreateTaskRequest.decode(payload)
        namespace = ctx.metadata.first(NAMESPACE_KEY) or self.namespace
        with jsonlog.bind(container_id=req.id, namespace=namespace):
            try:
                spec = bundles.read_spec(req.bundle)
                plan = bundles.plan(spec, self.cfg.export)
                if plan.image is None:
                    if plan.annotations.get(bundles.CONTAINER_TYPE) == "sandbox":
                        log.info("rootfs left alone: %s", plan.reason)
                        return await self.forward("Create", ctx, payload)
                    raise bundles.NoImage(f"kata-ipu: container {req.id} has {plan.reason}: "
                                          "the IPU cannot prepare its rootfs")
                key = bundles.volume_key(namespace, req.id)
                t0 = time.monotonic()
                prepared = await ipu.prepare(
                    self.cfg.address, key, plan.image, plan.export,
                    {"containerd.io/namespace": namespace, "containerd.io/id": req.id,
                     **({bundles.SANDBOX_ID: plan.annotations[bundles.SANDBOX_ID]}
                        if bundles.SANDBOX_ID in plan.annotations else {})},
                    self.cfg.timeout)
            except KataIpuError as exc:
                if self.cfg.fallback == "passthrough":
                    log.warning("IPU rootfs unavailable, passing the original rootfs through: "
                                "%s", exc)
                    return await self.forward("Create", ctx, payload)
                log.error("%s", exc)
                raise
            bundle = Path(req.bundle)
            self.volumes[req.id] = _Volume(key, bundle)
            bundles.write_json(bundle / bundles.VOLUME_RECORD,
                               {**prepared.record(), "address": self.cfg.address})
            log.info("rootfs prepared", extra={
                "image": prepared.image, "device": prepared.path, "cold": prepared.cold,
                "prepare_seconds": round(time.monotonic() - t0, 6)})
            try:
                if (spec.get("root") or {}).get("path") != "rootfs":
                    bundles.set_root_path(bundle, "rootfs")
                return await self.forward("Create", ctx,
                                          replace_rootfs(payload, (prepared.mount(),)))
            except BaseException as exc:
                log.error("Create failed in the delegate, releasing the rootfs: %s", exc)
                await self._release(req.id)
                raise

    # -- Delete / Shutdown ---------------------------------------------------------------------
    async def delete(self, ctx: CallContext, payload: bytes) -> bytes:
        reply = await self.forward("Delete", ctx, payload)
        cid, exec_id = decode_id_request(payload)
        if not exec_id:
            with jsonlog.bind(container_id=cid):
                await self._release(cid)
        return reply

    async def _release(self, cid: str) -> None:
        vol = self.volumes.pop(cid, None)
        if vol is None:
            return
        try:
            await ipu.release(self.cfg.address, vol.key)
        except (KataIpuError, OSError) as exc:
            log.error("kata-ipu: the rootfs volume %s was not released: %s", vol.key, exc)
            return
        bundles.remove(vol.bundle / bundles.VOLUME_RECORD)
        log.info("rootfs released", extra={"key": vol.key})

    async def shutdown(self, ctx: CallContext, payload: bytes) -> bytes:
        try:
            return await self.forward("Shutdown", ctx, payload)
        except ConnectionClosed:
            return b""  # the delegate exited while answering: that is what was asked


async def serve(cfg: ShimConfig, delegate_address: str, listen: str, namespace: str,
                ready: Callable[[], None]) -> None:
    """Serve until the delegate goes away (or SIGTERM)."""
    delegate = await Client.connect(delegate_address)
    proxy = TaskProxy(cfg, delegate, namespace)
    server = Server()
    server.register(TASK_SERVICE, proxy.handlers())
    await server.listen(listen, mode=0o600)
    ready()
    log.info("proxy serving", extra={"address": listen, "delegate": delegate_address})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closed = asyncio.ensure_future(delegate.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    stopped.cancel()
    log.info("delegate gone, proxy exiting" if not stop.is_set() else "signalled, exiting")
    await server.shutdown(timeout=5)
    await delegate.close()
    if not stop.is_set():
        # The runc shim removes the socket named in <bundle>/address on exit, which is ours;
        # its own is left behind: remove it once nobody answers there.
        _remove_dead_socket(delegate_address)


def _remove_dead_socket(address: str) -> None:
    if not address.startswith("unix://"):
        return
    path = address.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
