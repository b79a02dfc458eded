"""The shim v2 proxy: a ttrpc ``containerd.task.v2.Task`` server in front of a delegate shim.

Every call is forwarded to the delegate (``containerd-shim-runc-v2`` or
``containerd-shim-kata-v2``) as opaque bytes with its metadata (containerd's namespace) and its
remaining deadline; replies and error statuses come back unchanged. Two calls do more:

``Create``
    The image is the one the container's snapshot stacks on when the ipu snapshotter made it
    (one of its lowers in ``CreateTaskRequest.rootfs``: that image by digest, that many of its
    layers), else the one the bundle's annotations name (:func:`shim_hooks.bundle.plan`).
    kata-ipud has been asked to ``Prepare`` a clone while the delegate started
    (:class:`EarlyPrepare`, from the snapshotter's hint for the container, or the annotations;
    Create checks it against the mounts; for a pod's later containers, which share the proxy,
    the proxy asks now). The proxy replaces
    ``CreateTaskRequest.rootfs`` with one mount of the exported block device (``ext4
    /dev/loopN``), points ``root.path`` at ``rootfs``, records the volume in the bundle and
    forwards. runc's shim mounts that device as the container root;
    Kata's shim sees a block device under ``/dev`` and hot-plugs it (virtio-blk) for the agent
    to mount. A failed forward releases the volume again. Without an image, or when the IPU
    refuses, Create fails with the reason, unless ``fallback = "passthrough"``. A CRI sandbox,
    and a CRI container whose image was unpacked on the host (its name a tag, its rootfs on no
    lower), keep containerd's rootfs. The runc delegate never gets CRI's generic runtime
    options (``runtimeoptions.v1.Options``), which it cannot decode.
``Delete`` (of a container, not of an exec)
    Forwarded first; then the volume is released.

``kataipu.shim.v1.Proxy/Expect`` (the proxy's own socket, root only)
    A pod's later containers join its proxy: kata-ipu-shimd's spare that runs such a
    container's ``start`` tells the proxy serving the pod which container and bundle are
    coming, and the proxy prepares that rootfs at once (an :class:`EarlyPrepare`), so that
    the container's ``Create`` finds it ready. Not claimed by a Create within
    :data:`EXPECT_TTL`, it is released.

The proxy lives as long as its delegate: when the delegate's connection closes (``Shutdown``,
a crash) the proxy stops serving and exits, and containerd sees the shim gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_ipu import log as jsonlog
from kata_ipu.errors import KataIpuError
from kata_ipu.osutil import unixsock
from kata_ipu.protowire import WireError
from kata_ipu.ttrpc import NAMESPACE_KEY, CallContext, Client, Metadata, Server, UnixListener
from kata_ipu.ttrpc.errors import ConnectionClosed
from shim_hooks import bundle as bundles
from shim_hooks import hostmount, ipu, katarules
from shim_hooks.config import ShimConfig
from shim_hooks.snapshotter import chain as chains
from shim_hooks.taskapi import (
    TASK_METHODS,
    TASK_SERVICE,
    CreateTaskRequest,
    Mount,
    decode_connect_response,
    decode_id_request,
    id_request,
    options_for_runc,
    replace_rootfs,
)

log = logging.getLogger("shim_hooks.proxy")

Handler = Callable[[CallContext, bytes], Awaitable[bytes]]
REMEMBER_DELAY = 0.5  # seconds to wait for containerd's Connect before asking the delegate
PROXY_SERVICE = "kataipu.shim.v1.Proxy"
EXPECT_TTL = 120.0  # seconds an expected container's rootfs waits for its Create
KEEP_DELAY = 0.25  # seconds after an Expect before the proxy connects ahead to kata-ipud


@dataclass
class _Volume:
    key: str
    bundle: Path
    mountpoint: str = ""


def find_chain(cfg: ShimConfig, namespace: str, cid: str,
               rootfs: tuple[Mount, ...] | None) -> chains.ChainImage | None:
    """The image (and layer count) the container's snapshot stacks on, if it is one lower of
    the ipu snapshotter: from the ``rootfs`` mounts of Create, or before them (None) from the
    snapshotter's hint for the container."""
    if not cfg.snapshotter_root:
        return None
    root = Path(cfg.snapshotter_root)
    if rootfs is None:
        return chains.read_hint(root, namespace, cid)
    return chains.image_of_mounts(root, ((m.type, m.source, m.options) for m in rootfs))


async def prepare(cfg: ShimConfig, namespace: str, cid: str, bundle: Path,
                  spec: dict[str, Any] | None = None,
                  chain: chains.ChainImage | None = None) -> ipu.Prepared | None:
    """Have the IPU prepare container ``cid``'s rootfs, as its snapshot's ``chain`` or else
    its bundle asks.

    None: leave the rootfs alone (a CRI sandbox, an image unpacked on the host). Raises
    :class:`bundles.NoImage` when the container names no image, and the IPU's error (its gRPC
    class kept) when it refuses. The volume is recorded in the bundle at once, so the
    ``delete`` action releases it even if this process dies before ``Create`` is answered.
    ``spec``: the bundle's ``config.json`` if the caller has read it already.
    """
    if spec is None:
        spec = bundles.read_spec(bundle)
    plan = bundles.plan(spec, cfg.export, chain)
    if plan.image is None:
        if plan.keep:
            log.info("rootfs left alone: %s", plan.reason)
            return None
        raise bundles.NoImage(f"kata-ipu: container {cid} has {plan.reason}: "
                              "the IPU cannot prepare its rootfs")
    key = bundles.volume_key(namespace, cid)
    t0 = time.monotonic()
    sandbox = ({bundles.SANDBOX_ID: plan.annotations[bundles.SANDBOX_ID]}
               if bundles.SANDBOX_ID in plan.annotations else {})
    prepared = await ipu.prepare(
        cfg.address, key, plan.image, plan.export,
        {"containerd.io/namespace": namespace, "containerd.io/id": cid, **sandbox},
        cfg.timeout, layers=plan.layers)
    try:
        katarules.check_export(cfg.delegate, prepared.fstype, key)
    except KataIpuError:
        await ipu.release(cfg.address, key, cfg.timeout)
        raise
    if premounts(cfg, prepared):
        # recorded before it is mounted: the delete action unmounts whatever is there
        prepared = dataclasses.replace(prepared, mountpoint=str(bundle / "rootfs"))
    bundles.write_json(bundle / bundles.VOLUME_RECORD, {**prepared.record(),
                                                        "address": cfg.address})
    if prepared.mountpoint:
        try:
            await asyncio.to_thread(premount, prepared, bundle, spec)
        except (OSError, KataIpuError) as exc:
            log.warning("mounting the rootfs ahead of Create failed, the delegate will: %s",
                        exc)
            prepared = dataclasses.replace(prepared, mountpoint="")
    log.info("rootfs prepared", extra={
        "image": prepared.image, "device": prepared.path, "cold": prepared.cold,
        "why": plan.reason, "layers": plan.layers or None,
        "mounted": bool(prepared.mountpoint),
        "prepare_seconds": round(time.monotonic() - t0, 6)})
    return prepared


def premounts(cfg: ShimConfig, prepared: ipu.Prepared) -> bool:
    """runc's shim would mount the device as its first step of ``Create``; the proxy does it
    already, while the delegate starts. Kata's shim must get the device itself (it hot-plugs
    it into the VM)."""
    return cfg.delegate == "runc" and prepared.path.startswith("/dev/")


def premount(prepared: ipu.Prepared, bundle: Path, spec: dict[str, Any]) -> None:
    """Mount the device at ``<bundle>/rootfs`` and point ``root.path`` there."""
    target = Path(prepared.mountpoint)
    target.mkdir(mode=0o711, exist_ok=True)
    if (spec.get("root") or {}).get("path") != "rootfs":
        bundles.set_root_path(bundle, "rootfs")
    hostmount.mount_clone(prepared.path, target, prepared.fstype, prepared.options)


def prefetch(mountpoint: str, bundle: Path) -> None:
    """Have the container's program read ahead (its pages are cold in a fresh clone) by a
    thread that nothing waits for. Started once the delegate's ``Create`` is done, while
    containerd sends ``Start``: started with the mount, its lookups and reads of the fresh
    clone competed with ``runc create`` for the two CPUs (a warm CRI start's ``runc
    create`` took ~12 ms longer, traced with sched_process_exec; docs/benchmarks.md)."""
    def run() -> None:
        try:
            spec = bundles.read_spec(bundle)
        except KataIpuError:
            return
        hostmount.prefetch_entrypoint(Path(mountpoint), spec)

    threading.Thread(target=run, name="prefetch", daemon=True).start()


async def release_volume(address: str, key: str, bundle: Path, mountpoint: str,
                         done: str) -> None:
    """Unmount (if the proxy mounted it) and release a volume, then drop its bundle record.
    Failures are logged, not raised: the caller is on its way out, and the ``delete`` action
    tries again from the record."""
    try:
        if mountpoint:
            await asyncio.to_thread(hostmount.umount, mountpoint)
        await ipu.release(address, key)
    except (KataIpuError, OSError) as exc:
        log.error("kata-ipu: the rootfs volume %s was not released: %s", key, exc)
        return
    bundles.remove(bundle / bundles.VOLUME_RECORD)
    log.info(done, extra={"key": key})


class EarlyPrepare:
    """:func:`prepare` of container ``cid``, started during ``start`` (before ``Create``).

    Either already finished (:meth:`run`, in a ``start`` process that forks the proxy next)
    or still running in the proxy's own event loop (:meth:`begin`). ``Create`` of the same
    container takes it (:meth:`result`: the device, or what ``Prepare`` raised, as if
    ``Create`` had called it); if ``Create`` never comes, the proxy releases the volume on
    its way out (:meth:`release_async`).
    """

    def __init__(self, cfg: ShimConfig, bundle: Path,
                 task: asyncio.Task[ipu.Prepared | None] | None = None,
                 chain: chains.ChainImage | None = None) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.chain = chain  # the snapshotter's hint it prepared from (Create checks it)
        self._task = task
        self._prepared: ipu.Prepared | None = None
        self._error: KataIpuError | None = None

    @staticmethod
    def spec_if_applies(cid: str, bundle: Path) -> dict[str, Any] | None:
        """The bundle's spec if container ``cid`` is the one a new shim is started for. A pod's
        later containers join the shim of its group (the delegate answers with that shim's
        address) and their ``Create`` goes to the proxy already serving it, which prepares
        then."""
        try:
            spec = bundles.read_spec(bundle)
        except KataIpuError:
            return None  # Create reads the bundle again and says what is wrong
        return spec if bundles.shim_group(spec, cid) == cid else None

    @classmethod
    def run(cls, cfg: ShimConfig, namespace: str, cid: str,
            bundle: Path) -> EarlyPrepare | None:
        """Run :func:`prepare` to completion in its own event loop (nothing is left running:
        the caller forks next)."""
        spec = cls.spec_if_applies(cid, bundle)
        if spec is None:
            return None
        chain = find_chain(cfg, namespace, cid, None)
        early = cls(cfg, bundle, chain=chain)
        with jsonlog.bind(container_id=cid, namespace=namespace):
            try:
                early._prepared = asyncio.run(prepare(cfg, namespace, cid, bundle, spec,
                                                      chain))
            except KataIpuError as exc:
                early._error = exc
        return early

    @classmethod
    def begin(cls, cfg: ShimConfig, namespace: str, cid: str, bundle: Path, *,
              joining: bool = False) -> EarlyPrepare | None:
        """Start :func:`prepare` as a task of the running loop (its request goes out at the
        loop's next wait). ``joining``: for a container that joins this proxy's group (the
        proxy serving it was told by Expect)."""
        if joining:
            try:
                spec: dict[str, Any] | None = bundles.read_spec(bundle)
            except KataIpuError:
                return None
        else:
            spec = cls.spec_if_applies(cid, bundle)
        if spec is None:
            return None
        chain = find_chain(cfg, namespace, cid, None)

        async def bound() -> ipu.Prepared | None:
            with jsonlog.bind(container_id=cid, namespace=namespace):
                return await prepare(cfg, namespace, cid, bundle, spec, chain)

        return cls(cfg, bundle, asyncio.ensure_future(bound()), chain)

    async def _settle(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            self._prepared = await task
        except KataIpuError as exc:
            self._error = exc

    async def result(self) -> ipu.Prepared | None:
        await self._settle()
        if self._error is not None:
            raise self._error
        return self._prepared

    async def release_async(self) -> None:
        await self._settle()
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            await release_volume(self.cfg.address, prepared.key, self.bundle,
                                 prepared.mountpoint, "unused rootfs released")

    def discard(self) -> None:
        """Release synchronously (in a ``start`` process, after :meth:`run`)."""
        if self._prepared is not None:
            asyncio.run(self.release_async())


class TaskProxy:
    """Forwards the Task API to ``delegate``; owns the container → IPU volume mapping.

    ``delegate`` may be a connection still being made: calls wait for it (the proxy serves
    containerd's first call while it connects)."""

    def __init__(self, cfg: ShimConfig, delegate: Client | asyncio.Future[Client],
                 namespace: str, early: dict[str, EarlyPrepare] | None = None) -> None:
        self.cfg = cfg
        self._delegate = delegate
        self.namespace = namespace
        self.volumes: dict[str, _Volume] = {}
        self.early: dict[str, EarlyPrepare] = dict(early or {})
        self.on_delegate_pid: Callable[[int], None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._created: set[str] = set()  # containers whose Create has come (until Delete)
        self._keeping: asyncio.Future[None] | None = None  # a connect ahead under way

    async def close(self) -> None:
        """Release what was prepared for a ``Create`` that never came."""
        early, self.early = self.early, {}
        for e in early.values():
            await e.release_async()
        await ipu.drop_kept()

    def _keep_connection(self) -> None:
        """A pod whose later containers join this proxy (``Expect``) may have more: have a
        connection to kata-ipud open for the next one's ``Prepare``
        (:func:`ipu.keep_connection`; a new connection costs that container's start a
        connect and the daemon's accept). Made a moment later, not while this container
        starts. A proxy no container joins (a single container, a pod of one) keeps none."""
        def connect() -> None:
            # one at a time: a second connect while the first is under way would replace
            # the first's connection in ipu's table and leave it open, unused
            if ipu.has_kept(self.cfg.address) or (self._keeping is not None
                                                  and not self._keeping.done()):
                return
            task = self._keeping = asyncio.ensure_future(ipu.keep_connection(self.cfg.address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        asyncio.get_running_loop().call_later(KEEP_DELAY, connect)

    async def expect(self, ctx: CallContext, payload: bytes) -> bytes:
        """A container of this proxy's group is about to be created: prepare its rootfs
        (after this answer: the caller, a start on containerd's path, waits for it)."""
        cid, bundle = decode_id_request(payload)
        namespace = ctx.metadata.first(NAMESPACE_KEY) or self.namespace
        if cid and bundle:
            asyncio.get_running_loop().call_soon(self._expected, namespace, cid, Path(bundle))
        return b""

    def _expected(self, namespace: str, cid: str, bundle: Path) -> None:
        if cid in self.early or cid in self._created:
            return  # its Create came first (and prepares itself)
        with jsonlog.bind(container_id=cid, namespace=namespace):
            early = EarlyPrepare.begin(self.cfg, namespace, cid, bundle, joining=True)
        if early is not None:
            log.info("preparing the rootfs of an expected container",
                     extra={"container_id": cid, "namespace": namespace})
            self.early[cid] = early
            self._keep_connection()  # a pod with later containers: for the next one
            asyncio.get_running_loop().call_later(EXPECT_TTL,
                                                  lambda: self._unclaimed(cid, early))

    def _unclaimed(self, cid: str, early: EarlyPrepare) -> None:
        if self.early.get(cid) is early:
            del self.early[cid]
            log.warning("rootfs of container %s released: no Create came", cid)
            task = asyncio.ensure_future(early.release_async())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def handlers(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {m: self._forwarder(m) for m in TASK_METHODS}
        out["Create"] = self.create
        out["Delete"] = self.delete
        out["Shutdown"] = self.shutdown
        out["Connect"] = self.connect
        return out

    async def connect(self, ctx: CallContext, payload: bytes) -> bytes:
        """Forwarded; its reply names the delegate's pid, which the bundle records (so that
        the ``delete`` action can stop a delegate whose proxy was killed) once the reply is on
        its way: containerd's next call (``Start``) waits for it."""
        reply = await self.forward("Connect", ctx, payload)
        if self.on_delegate_pid is not None:
            with contextlib.suppress(WireError):
                pid = decode_connect_response(reply)[0]
                if pid:
                    asyncio.get_running_loop().call_soon(self.on_delegate_pid, pid)
                    self.on_delegate_pid = None
        return reply

    def _forwarder(self, method: str) -> Handler:
        async def forward(ctx: CallContext, payload: bytes) -> bytes:
            return await self.forward(method, ctx, payload)
        return forward

    async def delegate(self) -> Client:
        if not isinstance(self._delegate, Client):
            self._delegate = await self._delegate
        return self._delegate

    async def forward(self, method: str, ctx: CallContext, payload: bytes) -> bytes:
        delegate = await self.delegate()
        return await delegate.call(TASK_SERVICE, method, payload, timeout=ctx.timeout,
                                   metadata=ctx.metadata)

    # -- Create ------------------------------------------------------------------------------
    async def create(self, ctx: CallContext, payload: bytes) -> bytes:
        req = CreateTaskRequest.decode(payload)
        namespace = ctx.metadata.first(NAMESPACE_KEY) or self.namespace
        if self.cfg.delegate == "runc":
            payload = options_for_runc(payload)
        self._created.add(req.id)
        with jsonlog.bind(container_id=req.id, namespace=namespace):
            early = self.early.pop(req.id, None)
            chain = find_chain(self.cfg, namespace, req.id, req.rootfs)
            try:
                if early is not None and early.bundle == Path(req.bundle) and (
                        early.chain == chain):
                    prepared = await early.result()
                else:
                    if early is not None:
                        await early.release_async()
                    prepared = await prepare(self.cfg, namespace, req.id, Path(req.bundle),
                                             chain=chain)
            except KataIpuError as exc:
                if self.cfg.fallback == "passthrough":
                    katarules.check_passthrough(self.cfg.delegate, req.rootfs, req.id,
                                                exc.message)
                    log.warning("IPU rootfs unavailable, passing the original rootfs through: "
                                "%s", exc)
                    return await self.forward("Create", ctx, payload)
                log.error("%s", exc)
                raise
            if prepared is None:  # a CRI sandbox, or an image unpacked on the host
                return await self.forward("Create", ctx, payload)
            bundle = Path(req.bundle)
            self.volumes[req.id] = _Volume(prepared.key, bundle, prepared.mountpoint)
            try:
                if prepared.mountpoint:  # mounted already: no mounts for the delegate
                    reply = await self.forward("Create", ctx, replace_rootfs(payload, ()))
                    prefetch(prepared.mountpoint, bundle)
                    return reply
                spec = bundles.read_spec(bundle)
                readonly = katarules.needs_readonly_root(self.cfg.delegate, prepared.options,
                                                         spec)
                if (spec.get("root") or {}).get("path") != "rootfs" or readonly:
                    bundles.set_root_path(bundle, "rootfs", readonly=readonly)
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
            self._created.discard(cid)
            with jsonlog.bind(container_id=cid):
                await self._release(cid)
        return reply

    async def _release(self, cid: str) -> None:
        vol = self.volumes.pop(cid, None)
        if vol is not None:
            await release_volume(self.cfg.address, vol.key, vol.bundle, vol.mountpoint,
                                 "rootfs released")

    async def shutdown(self, ctx: CallContext, payload: bytes) -> bytes:
        try:
            return await self.forward("Shutdown", ctx, payload)
        except ConnectionClosed:
            return b""  # the delegate exited while answering: that is what was asked


async def serve(cfg: ShimConfig, delegate_address: str, listen: str, namespace: str,
                ready: Callable[[], None], *, cid: str = "", early: EarlyPrepare | None = None,
                bundle: Path | None = None, record: dict[str, object] | None = None,
                listener: UnixListener | None = None) -> None:
    """Serve until the delegate goes away (or SIGTERM).

    ``early`` is container ``cid``'s rootfs, prepared during ``start``. With ``bundle`` and
    ``record``, the delegate's pid is added to the bundle's shim record once serving, so that
    ``delete`` can stop a delegate whose proxy was killed. ``listener``: a socket bound while
    the delegate started; it is moved to ``listen`` and reported at once, and served while the
    proxy connects to the delegate (containerd's first call waits for that connection, not
    for the proxy to start reading). Without it, ``ready()`` comes once the proxy serves and
    is connected, so that a failed connection fails ``start``.
    """
    if listener is not None:
        listener.publish(listen)
        ready()
    connecting = asyncio.ensure_future(Client.connect(delegate_address))
    proxy = TaskProxy(cfg, connecting, namespace, {cid: early} if early is not None else None)
    server = Server()
    server.register(TASK_SERVICE, proxy.handlers())
    server.register(PROXY_SERVICE, {"Expect": proxy.expect})
    try:
        await server.listen(listener if listener is not None else listen, mode=0o600)
        delegate = await connecting
    except BaseException:
        connecting.cancel()
        if listener is not None:
            listener.close()
        await server.close()
        raise
    if listener is None:
        ready()
    log.debug("proxy serving", extra={"address": listen, "delegate": delegate_address})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Future[None]] = set()
    remember = (_remember_delegate_pid(proxy, delegate, bundle, record, cid, namespace, tasks)
                if bundle is not None and record is not None else None)
    closed = asyncio.ensure_future(delegate.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    stopped.cancel()
    if remember is not None:
        remember.cancel()
    log.info("delegate gone, proxy exiting" if not stop.is_set() else "signalled, exiting")
    await server.shutdown(timeout=5)
    await proxy.close()
    await delegate.close()
    if not stop.is_set():
        # The runc shim removes the socket named in <bundle>/address on exit, which is ours;
        # its own is left behind: remove it once nobody answers there.
        _remove_dead_socket(delegate_address)


def _remember_delegate_pid(proxy: TaskProxy, delegate: Client, bundle: Path,
                           record: dict[str, object], cid: str, namespace: str,
                           tasks: set[asyncio.Future[None]]) -> asyncio.TimerHandle:
    """Add the delegate's pid to the bundle's shim record (so that ``delete`` can stop a
    delegate whose proxy was killed): from containerd's own ``Connect`` (right after
    ``Create``), which tells it for free, or by asking the delegate after
    :data:`REMEMBER_DELAY` (asking at once would put a call on the container's critical
    path). Returns the timer of that question (cancelled when the proxy stops)."""
    remember: asyncio.TimerHandle | None = None

    def remember_pid(pid: int) -> None:
        if remember is not None:
            remember.cancel()
        bundles.write_json(bundle / bundles.SHIM_RECORD, {**record, "delegate_pid": pid})

    async def ask_pid() -> None:
        try:
            reply = await delegate.call(TASK_SERVICE, "Connect", id_request(cid), timeout=5,
                                        metadata=Metadata([(NAMESPACE_KEY, namespace)]))
        except KataIpuError as exc:
            log.debug("delegate Connect failed: %s", exc)
            return
        if proxy.on_delegate_pid is not None and (pid := decode_connect_response(reply)[0]):
            proxy.on_delegate_pid = None
            remember_pid(pid)

    proxy.on_delegate_pid = remember_pid
    remember = asyncio.get_running_loop().call_later(
        REMEMBER_DELAY, lambda: tasks.add(asyncio.ensure_future(ask_pid())))
    return remember


def _remove_dead_socket(address: str) -> None:
    if not address.startswith("unix://"):
        return
    with contextlib.suppress(OSError):  # a path it cannot probe is left alone
        unixsock.clear_stale_socket(address.removeprefix("unix://"))
