"""The gRPC face of the snapshotter: ``containerd.services.snapshots.v1.Snapshots``.

Handlers translate protobuf to :class:`~shim_hooks.snapshotter.snapshotter.Snapshotter`
calls and project errors to status codes by their class (:mod:`kata_ipu.errors` codes are
gRPC's); anything else is INTERNAL and logged with its traceback. containerd's proxy client
turns the codes back into its ``errdefs`` classes. The server listens on a unix socket only
(mode 0600: containerd runs as root).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from kata_ipu import log as jsonlog
from kata_ipu.errors import KataIpuError
from kata_ipu.osutil import unixsock
from shim_hooks.snapshotter.model import Info, Kind, Mount
from shim_hooks.snapshotter.proto import mount_pb2
from shim_hooks.snapshotter.proto import snapshots_pb2 as pb
from shim_hooks.snapshotter.snapshotter import Snapshotter

log = logging.getLogger("shim_hooks.snapshotter.service")

SERVICE = "containerd.services.snapshots.v1.Snapshots"
LIST_BATCH = 100  # infos per List message, as containerd's own service sends them

Req = TypeVar("Req")
Resp = TypeVar("Resp")
if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def info_message(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind),  # type: ignore[arg-type]
                   created_at=_ts(info.created), updated_at=_ts(info.updated),
                   labels=info.labels)


def mount_messages(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


class SnapshotsService:
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[[Any, Ctx], Awaitable[Any]],
                  req: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(fn), request_deserializer=req.FromString,
                response_serializer=lambda m: m.SerializeToString())

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Prepare": unary(self.prepare, pb.PrepareSnapshotRequest),
            "View": unary(self.view, pb.ViewSnapshotRequest),
            "Mounts": unary(self.mounts, pb.MountsRequest),
            "Commit": unary(self.commit, pb.CommitSnapshotRequest),
            "Remove": unary(self.remove, pb.RemoveSnapshotRequest),
            "Stat": unary(self.stat, pb.StatSnapshotRequest),
            "Update": unary(self.update, pb.UpdateSnapshotRequest),
            "Usage": unary(self.usage, pb.UsageRequest),
            "Cleanup": unary(self.cleanup, pb.CleanupRequest),
            "List": grpc.unary_stream_rpc_method_handler(
                self.list, request_deserializer=pb.ListSnapshotsRequest.FromString,
                response_serializer=lambda m: m.SerializeToString()),
        })

    @staticmethod
    def _guard(fn: Callable[[Req, Ctx], Awaitable[Resp]]
               ) -> Callable[[Req, Ctx], Awaitable[Resp]]:
        name = fn.__name__

        async def guarded(req: Req, ctx: Ctx) -> Resp:
            t0 = time.monotonic()
            key = getattr(req, "key", "") or getattr(getattr(req, "info", None), "name", "")
            with jsonlog.bind(method=name, key=key):
                try:
                    resp = await fn(req, ctx)
                except KataIpuError as exc:
                    code = grpc.StatusCode[exc.code.name]
                    level = logging.DEBUG if code in (
                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS) else (
                        logging.WARNING)
                    log.log(level, "%s %s: %s", name, code.name, exc)
                    await ctx.abort(code, str(exc))
                except Exception as exc:
                    log.exception("%s failed", name)
                    await ctx.abort(grpc.StatusCode.INTERNAL, f"{name}: {exc}")
                log.debug("%s done", name, extra={"seconds": round(time.monotonic() - t0, 6)})
                return resp
        return guarded

    async def prepare(self, req: pb.PrepareSnapshotRequest,
                      ctx: Ctx) -> pb.PrepareSnapshotResponse:
        mounts = await self.sn.prepare(req.key, req.parent, dict(req.labels))
        return pb.PrepareSnapshotResponse(mounts=mount_messages(mounts))

    async def view(self, req: pb.ViewSnapshotRequest,
                   ctx: Ctx) -> pb.ViewSnapshotResponse:
        mounts = await self.sn.view(req.key, req.parent, dict(req.labels))
        return pb.ViewSnapshotResponse(mounts=mount_messages(mounts))

    async def mounts(self, req: pb.MountsRequest,
                     ctx: Ctx) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=mount_messages(await self.sn.mounts(req.key)))

    async def commit(self, req: pb.CommitSnapshotRequest,
                     ctx: Ctx) -> empty_pb2.Empty:
        await self.sn.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    async def remove(self, req: pb.RemoveSnapshotRequest,
                     ctx: Ctx) -> empty_pb2.Empty:
        await self.sn.remove(req.key)
        return empty_pb2.Empty()

    async def stat(self, req: pb.StatSnapshotRequest,
                   ctx: Ctx) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_message(await self.sn.stat(req.key)))

    async def update(self, req: pb.UpdateSnapshotRequest,
                     ctx: Ctx) -> pb.UpdateSnapshotResponse:
        i = req.info
        info = Info(i.name, i.parent, Kind(i.kind), 0.0, 0.0, dict(i.labels))
        updated = await self.sn.update(info, list(req.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_message(updated))

    async def usage(self, req: pb.UsageRequest,
                    ctx: Ctx) -> pb.UsageResponse:
        u = await self.sn.usage(req.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    async def cleanup(self, req: pb.CleanupRequest,
                      ctx: Ctx) -> empty_pb2.Empty:
        await self.sn.cleanup()
        return empty_pb2.Empty()

    async def list(self, req: pb.ListSnapshotsRequest,
                   ctx: Ctx) -> AsyncIterator[pb.ListSnapshotsResponse]:
        try:
            infos = await self.sn.walk(list(req.filters))
        except KataIpuError as exc:
            log.warning("List %s: %s", exc.code.name, exc)
            await ctx.abort(grpc.StatusCode[exc.code.name], str(exc))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_message(x)
                                                 for x in infos[i:i + LIST_BATCH]])


def bind_socket(path: Path) -> None:
    """Make room for the socket: a stale one (nobody answers) is removed, a live one is an
    error (another snapshotter serves there)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    state = unixsock.clear_stale_socket(str(path))
    if state is unixsock.PathState.SERVING:
        raise OSError(f"{path}: another snapshotter is listening there")
    if state is unixsock.PathState.NOT_A_SOCKET:
        raise OSError(f"{path}: exists and is not a socket")


async def start_server(snapshotter: Snapshotter, path: Path) -> grpc.aio.Server:
    bind_socket(path)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20),
                                      ("grpc.max_send_message_length", 16 << 20)])
    server.add_generic_rpc_handlers((SnapshotsService(snapshotter).handler(),))
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise OSError(f"cannot listen on {path}")
        await server.start()
    finally:
        os.umask(old)
    return server
