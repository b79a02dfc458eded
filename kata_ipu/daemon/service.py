"""The ``kataipu.v1`` ttrpc services of kata-ipud: protobuf in, the engine's collaborators
(:mod:`.engine`), protobuf out (:mod:`.wire`).

Handlers validate nothing themselves beyond the wire: the engine raises typed project errors
(InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted...), which the
ttrpc server maps to status codes through its one table. Calls arriving over TCP must carry
the shared token in the ``authorization`` metadata (``Bearer <token>``); unix-socket callers
are trusted by the socket's file mode.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kata_ipu import __version__, api
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.daemon.checks import run_checks
from kata_ipu.daemon.engine import Engine
from kata_ipu.daemon.volumes import Prepared
from kata_ipu.daemon.wire import FS, export_kind, image_message, platform_text, rootfs_message, ts
from kata_ipu.errors import FailedPrecondition, KataIpuError, Unauthenticated
from kata_ipu.ttrpc import CallContext, Server, unary

Req = TypeVar("Req")

TOKEN_KEY = "authorization"

log = logging.getLogger("kata_ipu.daemon")

class IpuServices:
    """Registers ImageService, RootfsService and SystemService on a ttrpc server."""

    def __init__(self, engine: Engine, token: str | None = None) -> None:
        self.engine = engine
        self.token = token

    def register(self, server: Server) -> None:
        guard = self._guard
        server.register(api.IMAGE_SERVICE, {
            "Pull": guard(unary(pb.PullRequest, self.pull)),
            "List": guard(unary(pb.ListImagesRequest, self.list_images)),
            "Remove": guard(unary(pb.RemoveImageRequest, self.remove_image)),
            "Status": guard(unary(pb.PullStatusRequest, self.status)),
        })
        server.register(api.ROOTFS_SERVICE, {
            "Prepare": guard(unary(pb.PrepareRequest, self.prepare)),
            "Release": guard(unary(pb.ReleaseRequest, self.release)),
            "List": guard(unary(pb.ListRootfsRequest, self.list_rootfs)),
            "Stat": guard(unary(pb.StatRootfsRequest, self.stat)),
        })
        server.register(api.SYSTEM_SERVICE, {
            "Check": guard(unary(pb.CheckRequest, self.check)),
            "Gc": guard(unary(pb.GcRequest, self.gc)),
            "Info": guard(unary(pb.InfoRequest, self.info)),
        })

    def _guard(self, handler: Callable[[CallContext, bytes], Awaitable[bytes]]
               ) -> Callable[[CallContext, bytes], Awaitable[bytes]]:
        async def guarded(ctx: CallContext, payload: bytes) -> bytes:
            if ctx.peer_uid is None and self.token is not None:  # TCP peer
                sent = ctx.metadata.first(TOKEN_KEY) or ""
                if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
                    raise Unauthenticated("missing or wrong token in 'authorization' metadata")
            return await handler(ctx, payload)
        return guarded

    # ------------------------------------------------------------------ ImageService
    async def pull(self, ctx: CallContext, req: pb.PullRequest) -> pb.PullResponse:
        img = await self.engine.images.pull(req.image, platform=platform_text(req.platform),
                                            fstype=FS[req.fstype], build=not req.skip_build)
        return pb.PullResponse(image=image_message(*await self.engine.images.describe_image(img),
                                                   await self._layers(img.digest)))

    async def _layers(self, digest: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        try:
            return await asyncio.to_thread(self.engine.images.image_layers, digest)
        except (KataIpuError, OSError) as exc:  # a listing shows what it can
            log.warning("layers of image %s unreadable: %s", digest, exc)
            return (), ()

    async def list_images(self, ctx: CallContext, req: pb.ListImagesRequest
                          ) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=[
            image_message(i, b, c, await self._layers(i.digest))
            for i, b, c in await self.engine.images.list_images(req.filter)])

    async def remove_image(self, ctx: CallContext, req: pb.RemoveImageRequest
                           ) -> pb.RemoveImageResponse:
        await self.engine.images.remove_image(req.image, force=req.force)
        return pb.RemoveImageResponse()

    async def status(self, ctx: CallContext, req: pb.PullStatusRequest
                     ) -> pb.PullStatusResponse:
        out = []
        for s in self.engine.images.status(req.image):
            blobs = []
            done = total = 0
            if s.progress is not None:
                for b in s.progress.snapshot():
                    blobs.append(pb.BlobProgress(digest=b.digest, media_type=b.media_type,
                                                 offset=b.offset, total=b.total, done=b.done))
                done, total = s.progress.done_bytes, s.progress.total_bytes
            phase = pb.BUILDING if s.phase == "building" else pb.DOWNLOADING
            out.append(pb.PullProgress(image=s.image, digest=s.digest, phase=phase, blobs=blobs,
                                       bytes_done=done, bytes_total=total,
                                       started_at=ts(s.started_at)))
        return pb.PullStatusResponse(pulls=out)

    # ------------------------------------------------------------------ RootfsService
    async def prepare(self, ctx: CallContext, req: pb.PrepareRequest) -> pb.PrepareResponse:
        if req.options.read_only:
            raise FailedPrecondition("read-only rootfs exports are not supported yet")
        if req.options.size_bytes:
            raise FailedPrecondition("per-container rootfs sizes are not supported yet; "
                                     "the size comes from the image and [rootfs] headroom")
        fstype = FS[req.options.fstype] or self.engine.config.rootfs.fstype
        start = time.monotonic()
        try:
            result: Prepared = await self.engine.volumes.prepare(
                req.container_id, req.image, export=export_kind(req.export), fstype=fstype,
                platform=platform_text(req.platform), annotations=dict(req.annotations),
                layers=req.options.layers)
        except Exception:
            self.engine.metrics.prepare_seconds.labels("error", "unknown").observe(
                time.monotonic() - start)
            raise
        self.engine.metrics.prepare_seconds.labels(
            "ok", "cold" if result.cold else "warm").observe(time.monotonic() - start)
        return pb.PrepareResponse(rootfs=rootfs_message(result.volume, fstype),
                                  cold=result.cold)

    async def release(self, ctx: CallContext, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        await self.engine.volumes.release(req.container_id)
        return pb.ReleaseResponse()

    async def list_rootfs(self, ctx: CallContext, req: pb.ListRootfsRequest
                          ) -> pb.ListRootfsResponse:
        vols = await self.engine.state.list_volumes()
        bases = {b.id: b for b in await self.engine.state.list_bases()}
        return pb.ListRootfsResponse(rootfs=[
            rootfs_message(v, bases[v.base_id].fstype if v.base_id in bases else "")
            for v in vols])

    async def stat(self, ctx: CallContext, req: pb.StatRootfsRequest) -> pb.StatRootfsResponse:
        vol = await self.engine.volumes.get_volume(req.container_id)
        base = await self.engine.state.get_base(vol.base_id)
        size, allocated = await asyncio.to_thread(self.engine.volumes.volume_usage, vol.volume_id)
        return pb.StatRootfsResponse(
            rootfs=rootfs_message(vol, base.fstype if base else ""),
            usage=pb.RootfsUsage(size_bytes=size, allocated_bytes=allocated))

    # ------------------------------------------------------------------ SystemService
    async def check(self, ctx: CallContext, req: pb.CheckRequest) -> pb.CheckResponse:
        results = await asyncio.to_thread(run_checks, self.engine.config.root, self.engine.target)
        return pb.CheckResponse(results=[pb.CheckResult(name=r.name, ok=r.ok, detail=r.detail)
                                         for r in results])

    async def gc(self, ctx: CallContext, req: pb.GcRequest) -> pb.GcResponse:
        bases, freed = await self.engine.collector.gc()
        return pb.GcResponse(bases_removed=bases, bytes_reclaimed=freed)

    async def info(self, ctx: CallContext, req: pb.InfoRequest) -> pb.InfoResponse:
        usage = await asyncio.to_thread(self.engine.target.usage)
        plat = self.engine.images.platform
        return pb.InfoResponse(
            version=__version__, backend=self.engine.target.pool.backend,
            root=str(self.engine.config.root), pool_capacity_bytes=usage.capacity,
            pool_used_bytes=usage.used, images=len(await self.engine.state.list_images()),
            volumes=len(await self.engine.state.list_volumes()),
            platform=pb.Platform(os=plat.os, architecture=plat.architecture,
                                 variant=plat.variant))


def read_token(path: str) -> str:
    """Read a shared token file; refuse one that others can read."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise FailedPrecondition(f"token file {path} must not be readable by group or others "
                                 f"(mode {st.st_mode & 0o777:o})")
    token = open(path, encoding="utf-8").read().strip()  # noqa: SIM115
    if len(token) < 16:
        raise FailedPrecondition(f"token in {path} is shorter than 16 characters")
    return token

