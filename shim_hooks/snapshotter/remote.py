"""When a layer comes from the IPU instead of the host, and what happens when it cannot.

:meth:`RemoteChains.pull` is called on each unpack Prepare that carries CRI's image labels. On
the first layer of an image it asks the IPU to pull and build ``<repo>@<manifest digest>``
(never the tag: the image containerd resolved is the one the IPU builds) and waits; the other
layers of the same image find the answer cached. What the IPU says decides the layer's fate:

================================  =================================================
IPU answer                        the layer is
================================  =================================================
the image, built                  remote (if its chain id is the one containerd wants)
unreachable, UNAVAILABLE,         prepared on the host (:class:`FallBack`): containerd
DEADLINE_EXCEEDED, NOT_FOUND,     fetches and unpacks it as with overlayfs — the
UNAUTHENTICATED, PERMISSION_      host may see a registry, mirror or credentials
DENIED, RESOURCE_EXHAUSTED, ...   (imagePullSecrets reach only CRI) the IPU does not
INVALID_ARGUMENT, DATA_LOSS       refused (:class:`Refused`): the image is broken or
                                  hostile; PullImage fails with the IPU's reason
================================  =================================================

With ``fallback = "never"`` every failure refuses. A fallback is remembered for the image
for ``fallback_seconds``, so its other layers do not each wait for an unreachable IPU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from kata_ipu.errors import DataLoss, FailedPrecondition, InvalidArgument, KataIpuError
from kata_ipu.image.reference import parse_reference
from shim_hooks import ipu
from shim_hooks.snapshotter.model import (
    CRI_IMAGE_REF,
    CRI_LAYER,
    CRI_MANIFEST,
    SNAPSHOT_REF,
    RemoteImage,
    chain_id,
)

log = logging.getLogger("shim_hooks.snapshotter.remote")


class FallBack(Exception):
    """The layer is to be prepared on the host; ``str()`` says why."""


class Refused(InvalidArgument):
    """The IPU refused the image for what it is (broken or hostile content)."""


@dataclass(frozen=True, slots=True)
class LayerRequest:
    """What CRI's labels on one unpack Prepare say."""

    target: str     # the chain id to commit
    image_ref: str  # as the user wrote it (a tag, usually)
    manifest: str   # the manifest digest containerd resolved
    layer: str      # this layer's (compressed) digest

    @classmethod
    def of(cls, labels: Mapping[str, str]) -> LayerRequest | None:
        values = [labels.get(k, "") for k in (SNAPSHOT_REF, CRI_IMAGE_REF, CRI_MANIFEST,
                                              CRI_LAYER)]
        return cls(*values) if all(values) else None

    @property
    def reference(self) -> str:
        """``registry/repo@<manifest digest>``: the image containerd resolved, pinned."""
        return f"{parse_reference(self.image_ref).name}@{self.manifest}"


class RemoteChains:
    def __init__(self, address: str, *, timeout: float = 1800.0, fallback: str = "overlay",
                 fallback_seconds: float = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self.fallback = fallback
        self.fallback_seconds = fallback_seconds
        self._pulls: dict[str, asyncio.Future[ipu.Pulled]] = {}
        self._pulled: dict[str, ipu.Pulled] = {}
        self._fell_back: dict[str, tuple[float, str]] = {}

    async def image(self, req: LayerRequest, depth: int) -> RemoteImage:
        """The remote image of layer ``depth`` (1 = the lowest) of ``req``'s image, pulled
        and built by the IPU; :class:`FallBack` or :class:`Refused` otherwise."""
        try:
            reference = req.reference
        except KataIpuError as exc:
            raise FallBack(f"image reference {req.image_ref!r}: {exc}") from exc
        pulled = await self._pull(req.manifest, reference)
        if not 0 < depth <= len(pulled.layers) or len(pulled.diff_ids) != len(pulled.layers):
            raise FallBack(f"the IPU's {reference} has {len(pulled.layers)} layers, and "
                           f"containerd unpacks layer {depth}")
        if pulled.layers[depth - 1] != req.layer:
            raise FallBack(f"layer {depth} of the IPU's {reference} is "
                           f"{pulled.layers[depth - 1]}, not {req.layer}")
        chain = chain_id(pulled.diff_ids[:depth])
        if chain != req.target:
            raise FallBack(f"the chain of the first {depth} layers of the IPU's {reference} "
                           f"is {chain}, not {req.target}")
        return RemoteImage(reference, req.manifest, depth, len(pulled.layers))

    async def _pull(self, manifest: str, reference: str) -> ipu.Pulled:
        if (done := self._pulled.get(manifest)) is not None:
            return done
        fell = self._fell_back.get(manifest)
        if fell is not None and time.monotonic() - fell[0] < self.fallback_seconds:
            raise FallBack(fell[1])
        fut = self._pulls.get(manifest)
        if fut is None:
            fut = asyncio.ensure_future(self._pull_now(manifest, reference))
            self._pulls[manifest] = fut
            fut.add_done_callback(lambda _f: self._pulls.pop(manifest, None))
        return await asyncio.shield(fut)

    async def _pull_now(self, manifest: str, reference: str) -> ipu.Pulled:
        t0 = time.monotonic()
        try:
            pulled = await ipu.pull(self.address, reference, self.timeout)
        except KataIpuError as exc:
            if isinstance(exc, InvalidArgument | DataLoss) or self.fallback == "never":
                log.error("the IPU refused %s: %s", reference, exc)
                raise Refused(f"{exc}") from exc
            reason = f"the IPU could not pull {reference} ({exc.code.name}): {exc}"
            self._fell_back[manifest] = (time.monotonic(), reason)
            raise FallBack(reason) from exc
        self._fell_back.pop(manifest, None)
        self._pulled[manifest] = pulled
        log.info("image ready on the IPU", extra={"image": reference, "digest": pulled.digest,
                                                  "layers": len(pulled.layers),
                                                  "seconds": round(time.monotonic() - t0, 3)})
        return pulled

    def forget(self, manifest: str) -> None:
        """The host no longer has snapshots of ``manifest``: pull it again next time."""
        self._pulled.pop(manifest, None)

    async def remove_image(self, image: RemoteImage) -> None:
        """Ask the IPU to remove an image the host no longer uses; refused while clones of
        it live (another host's containers, say) — then it stays for the IPU's own GC."""
        self.forget(image.manifest)
        try:
            await ipu.remove_image(self.address, image.reference)
        except FailedPrecondition as exc:
            log.info("the IPU keeps %s: %s", image.reference, exc)
        except KataIpuError as exc:
            log.warning("the IPU did not remove %s: %s", image.reference, exc)
        else:
            log.info("image removed from the IPU", extra={"image": image.reference})
