"""A typed CRI (``runtime.v1``) client for tests: what kubelet says to containerd, nothing more.

The lifecycle a test drives, in kubelet's order::

    RunPodSandbox      -> pod id     (the CRI plugin pulls ``sandbox_image`` and starts it)
    PullImage          -> image ref  (resolve, fetch, unpack into the configured snapshotter)
    CreateContainer    -> container id (snapshot prepared, OCI spec generated)
    StartContainer                   (the runtime handler's shim runs it)
    ExecSync           -> ExecResult (a process in the running container, output captured)
    StopPodSandbox                   (every container of the pod and the sandbox are killed)
    RemovePodSandbox                 (containers, snapshots, /dev/shm and state are removed)

and ``RemoveImage`` when the image is no longer wanted. :class:`CriClient` has one method per
RPC, taking and returning small frozen dataclasses (:class:`PodSpec`, :class:`ContainerSpec`,
:class:`ImageInfo`, :class:`ContainerStatus`, ...). Every call has a deadline (``deadline``
seconds; :data:`DEFAULT_DEADLINE`, PullImage :data:`PULL_DEADLINE`) and every gRPC failure
becomes one :class:`CriError` (method, status code, details; the ``grpc.RpcError`` is kept as
its ``__cause__``).

Where the protocol comes from: no ``.proto`` is kept here and no message is written by hand.
A Go binary registers the gzipped ``FileDescriptorProto`` of every protobuf file it was built
with, so the ``runtime.v1`` ``api.proto`` that containerd itself serves is inside the
``containerd`` executable. On first use (never at import) :func:`runtime_v1_descriptor` scans
the binary for gzip members, keeps the one whose descriptor has package ``runtime.v1``
(containerd 1.6 also carries ``runtime.v1alpha2``, under the same file name), drops its
dependency on ``gogo.proto`` (the gogo options become unknown fields) and adds it to a private
``DescriptorPool``; message classes come from ``message_factory.GetMessageClass``. This costs
about 0.1 s and is cached per process and binary. Messages are therefore dynamic (``Any`` to
mypy); they never leave this module.

Size (over ~400 lines): one method and one small dataclass per CRI RPC, plus the descriptor
loader; each is short, and together they are the one typed surface of the protocol.
"""

from __future__ import annotations

import enum
import functools
import mmap
import shutil
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

DEFAULT_DEADLINE = 120.0
"""Seconds an RPC may take unless the call says otherwise."""
PULL_DEADLINE = 600.0
"""Seconds PullImage may take unless the call says otherwise."""

_GZIP_MEMBER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"  # deflate, no flags, mtime 0: Go's gzip
_PACKAGE = "runtime.v1"
_MAX_DESCRIPTOR = 4 << 20


class CriError(Exception):
    """A CRI call failed: ``method`` (e.g. ``RunPodSandbox``), the gRPC status ``code``
    (None when the call never reached containerd, e.g. no descriptor could be loaded) and the
    server's ``details``. The original exception is the ``__cause__``."""

    def __init__(self, method: str, code: grpc.StatusCode | None, details: str) -> None:
        self.method = method
        self.code = code
        self.details = details
        super().__init__(method, code, details)

    @property
    def code_name(self) -> str:
        return self.code.name if self.code is not None else "NO_RPC"

    @property
    def not_found(self) -> bool:
        return bool(self.code == grpc.StatusCode.NOT_FOUND)

    def __str__(self) -> str:
        return f"CRI {self.method} failed: {self.code_name}: {self.details}"


# -- descriptors -------------------------------------------------------------------------


def _gzip_members(data: mmap.mmap) -> Iterator[bytes]:
    """Yield the decompressed bytes of every gzip member that starts with Go's header."""
    pos = data.find(_GZIP_MEMBER)
    while pos != -1:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(data[pos:pos + (1 << 20)], _MAX_DESCRIPTOR)
        except zlib.error:
            out = b""
        if out and inflater.eof:
            yield out
        pos = data.find(_GZIP_MEMBER, pos + 1)


def containerd_binary() -> Path:
    """The ``containerd`` on ``PATH`` (whose embedded descriptors describe its CRI)."""
    found = shutil.which("containerd")
    if found is None:
        raise FileNotFoundError("containerd is not on PATH (install Debian's containerd)")
    return Path(found)


@functools.cache
def runtime_v1_descriptor(binary: Path) -> descriptor_pb2.FileDescriptorProto:
    """containerd's own ``runtime.v1`` ``api.proto`` descriptor, read out of ``binary``
    (cached per process), with the ``gogo.proto`` dependency dropped."""
    with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for raw in _gzip_members(data):
            if _PACKAGE.encode() not in raw or b"RuntimeService" not in raw:
                continue
            proto = descriptor_pb2.FileDescriptorProto()
            try:
                proto.ParseFromString(raw)
            except DecodeError:  # not a descriptor after all
                continue
            if proto.package == _PACKAGE and any(s.name == "RuntimeService"
                                                 for s in proto.service):
                kept = [d for d in proto.dependency if not d.endswith("gogo.proto")]
                del proto.dependency[:]
                proto.dependency.extend(kept)
                return proto
    raise LookupError(f"no {_PACKAGE} FileDescriptorProto embedded in {binary}")


def embedded_descriptors(binary: Path, package: str) -> list[descriptor_pb2.FileDescriptorProto]:
    """Every ``FileDescriptorProto`` of protobuf package ``package`` that ``binary`` (a Go
    program) was built with, read out of it as :func:`runtime_v1_descriptor` does."""
    found = []
    with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for raw in _gzip_members(data):
            if package.encode() not in raw:
                continue
            proto = descriptor_pb2.FileDescriptorProto()
            try:
                proto.ParseFromString(raw)
            except DecodeError:
                continue
            if proto.package == package:
                found.append(proto)
    return found


class _Protocol:
    """Message classes and enums of ``runtime.v1``, built in a private descriptor pool."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self.pool.Add(proto)
        self.file = self.pool.FindFileByName(proto.name)
        self._classes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def message(self, name: str) -> Any:
        with self._lock:
            cls = self._classes.get(name)
            if cls is None:
                desc = self.pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")
                cls = self._classes[name] = message_factory.GetMessageClass(desc)
            return cls

    def enum_name(self, enum_type: str, number: int) -> str:
        desc = self.pool.FindEnumTypeByName(f"{_PACKAGE}.{enum_type}")
        value = desc.values_by_number.get(number)
        return value.name if value is not None else str(number)

    def method(self, service: str, name: str) -> tuple[str, Any, Any]:
        """(path, request class, response class) of ``service``/``name``."""
        desc = self.file.services_by_name[service].methods_by_name[name]
        return (f"/{_PACKAGE}.{service}/{name}", self.message(desc.input_type.name),
                self.message(desc.output_type.name))


@functools.cache
def _protocol(binary: Path) -> _Protocol:
    return _Protocol(runtime_v1_descriptor(binary))


# -- the boundary's types ----------------------------------------------------------------


class SandboxState(enum.Enum):
    READY = "SANDBOX_READY"
    NOTREADY = "SANDBOX_NOTREADY"


class ContainerState(enum.Enum):
    CREATED = "CONTAINER_CREATED"
    RUNNING = "CONTAINER_RUNNING"
    EXITED = "CONTAINER_EXITED"
    UNKNOWN = "CONTAINER_UNKNOWN"


@dataclass(frozen=True)
class PodSpec:
    """What kubelet puts in ``PodSandboxConfig``. ``host_network`` (the only kind that works
    without CNI) shares the node's network and UTS namespaces, so no hostname is sent (runc
    refuses to set one without a private UTS namespace). A privileged pod may hold privileged
    containers."""

    name: str
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    namespace: str = "default"
    attempt: int = 0
    log_directory: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = True
    hostname: str = ""
    privileged: bool = False
    cgroup_parent: str = ""


@dataclass(frozen=True)
class HostMount:
    host_path: str
    container_path: str
    readonly: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """What kubelet puts in ``ContainerConfig``. ``log_path`` is relative to the pod's
    ``log_directory`` (CRI writes a log only when both are set)."""

    name: str
    image: str
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    working_dir: str = ""
    envs: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    log_path: str = ""
    readonly_rootfs: bool = False
    privileged: bool = False
    mounts: Sequence[HostMount] = ()
    attempt: int = 0


@dataclass(frozen=True)
class RuntimeVersion:
    version: str
    runtime_name: str
    runtime_version: str
    runtime_api_version: str


@dataclass(frozen=True)
class RuntimeCondition:
    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: SandboxState
    created_at: int
    """Nanoseconds since the epoch."""
    runtime_handler: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    ip: str = ""
    """Only from :meth:`CriClient.pod_sandbox_status` (empty for host-network pods)."""


@dataclass(frozen=True)
class ImageInfo:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    """Bytes, as the CRI plugin reports it (containerd: the image's content size)."""


@dataclass(frozen=True)
class ContainerInfo:
    """One row of ListContainers."""

    id: str
    pod_sandbox_id: str
    name: str
    attempt: int
    image: str
    image_ref: str
    state: ContainerState
    created_at: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class ContainerStatus:
    id: str
    name: str
    attempt: int
    state: ContainerState
    exit_code: int
    image: str
    image_ref: str
    reason: str
    message: str
    created_at: int
    started_at: int
    finished_at: int
    log_path: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class FilesystemUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp: int


# -- the client --------------------------------------------------------------------------


class CriClient:
    """CRI ``RuntimeService`` and ``ImageService`` over containerd's gRPC unix socket.

    A context manager; :meth:`close` closes the channel. Thread-safe as gRPC channels are.
    ``deadline`` (seconds) bounds every call unless the call passes its own; PullImage gets
    ``pull_deadline``. ``binary`` is the containerd whose descriptors are used (default: the
    one on ``PATH``); the descriptors are loaded on the first call, not here.
    """

    def __init__(self, socket: Path, *, deadline: float = DEFAULT_DEADLINE,
                 pull_deadline: float = PULL_DEADLINE, binary: Path | None = None) -> None:
        self.socket = socket
        self.deadline = deadline
        self.pull_deadline = pull_deadline
        self._binary = binary
        self._channel: Any = grpc.insecure_channel(
            f"unix://{Path(socket).absolute()}",
            options=[("grpc.max_receive_message_length", 16 << 20),
                     ("grpc.max_send_message_length", 16 << 20)])
        self._stubs: dict[str, tuple[Callable[..., Any], Any]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _proto(self, method: str) -> _Protocol:
        try:
            return _protocol(self._binary or containerd_binary())
        except (OSError, LookupError) as err:
            raise CriError(method, None, f"cannot load the runtime.v1 descriptors: {err}"
                           ) from err

    def _call(self, service: str, method: str, deadline: float | None,
              **fields: Any) -> Any:
        proto = self._proto(method)
        with self._lock:
            stub = self._stubs.get(method)
            if stub is None:
                path, req_cls, resp_cls = proto.method(service, method)
                rpc = self._channel.unary_unary(path,
                                                request_serializer=req_cls.SerializeToString,
                                                response_deserializer=resp_cls.FromString)
                stub = self._stubs[method] = (rpc, req_cls)
        rpc, req_cls = stub
        request = req_cls(**fields)
        try:
            return rpc(request, timeout=self.deadline if deadline is None else deadline)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
            raise CriError(method, code, details) from err

    def _runtime(self, method: str, deadline: float | None, **fields: Any) -> Any:
        return self._call("RuntimeService", method, deadline, **fields)

    def _image(self, method: str, deadline: float | None, **fields: Any) -> Any:
        return self._call("ImageService", method, deadline, **fields)

    def _enum(self, enum_type: str, number: int) -> str:
        return self._proto(enum_type).enum_name(enum_type, number)

    # -- RuntimeService

    def version(self, *, deadline: float | None = None) -> RuntimeVersion:
        r = self._runtime("Version", deadline, version="v1")
        return RuntimeVersion(r.version, r.runtime_name, r.runtime_version,
                              r.runtime_api_version)

    def status(self, *, deadline: float | None = None) -> list[RuntimeCondition]:
        """The runtime's conditions (``RuntimeReady``, ``NetworkReady``: false without CNI)."""
        r = self._runtime("Status", deadline)
        return [RuntimeCondition(c.type, c.status, c.reason, c.message)
                for c in r.status.conditions]

    def run_pod_sandbox(self, config: PodSpec, runtime_handler: str = "", *,
                        deadline: float | None = None) -> str:
        """Start a pod sandbox (the pause container) with ``runtime_handler`` (a name under
        ``containerd.runtimes``; empty: the default). Returns the pod id."""
        r = self._runtime("RunPodSandbox", deadline, config=_pod_config(config),
                          runtime_handler=runtime_handler)
        pod_id: str = r.pod_sandbox_id
        return pod_id

    def stop_pod_sandbox(self, pod_id: str, *, deadline: float | None = None) -> None:
        """Kill every container of the pod and the sandbox; idempotent."""
        self._runtime("StopPodSandbox", deadline, pod_sandbox_id=pod_id)

    def remove_pod_sandbox(self, pod_id: str, *, deadline: float | None = None) -> None:
        """Remove a stopped pod, its containers and their state; idempotent."""
        self._runtime("RemovePodSandbox", deadline, pod_sandbox_id=pod_id)

    def pod_sandbox_status(self, pod_id: str, *, deadline: float | None = None) -> SandboxInfo:
        s = self._runtime("PodSandboxStatus", deadline, pod_sandbox_id=pod_id).status
        return SandboxInfo(s.id, s.metadata.name, s.metadata.namespace, s.metadata.uid,
                           s.metadata.attempt,
                           SandboxState(self._enum("PodSandboxState", s.state)),
                           s.created_at, s.runtime_handler, dict(s.labels),
                           dict(s.annotations), s.network.ip)

    def list_pod_sandboxes(self, *, deadline: float | None = None) -> list[SandboxInfo]:
        r = self._runtime("ListPodSandbox", deadline)
        return [SandboxInfo(s.id, s.metadata.name, s.metadata.namespace, s.metadata.uid,
                            s.metadata.attempt,
                            SandboxState(self._enum("PodSandboxState", s.state)),
                            s.created_at, s.runtime_handler, dict(s.labels),
                            dict(s.annotations))
                for s in r.items]

    def create_container(self, pod_id: str, pod: PodSpec, spec: ContainerSpec, *,
                         deadline: float | None = None) -> str:
        """Create (not start) a container in pod ``pod_id``, which was run from ``pod``.
        Returns the container id."""
        r = self._runtime("CreateContainer", deadline, pod_sandbox_id=pod_id,
                          config=_container_config(pod, spec), sandbox_config=_pod_config(pod))
        cid: str = r.container_id
        return cid

    def start_container(self, cid: str, *, deadline: float | None = None) -> None:
        self._runtime("StartContainer", deadline, container_id=cid)

    def stop_container(self, cid: str, timeout: int = 0, *,
                       deadline: float | None = None) -> None:
        """SIGTERM (the image's stop signal), SIGKILL after ``timeout`` seconds (0: at once).
        The RPC's deadline is ``timeout`` plus the default deadline."""
        self._runtime("StopContainer", self.deadline + timeout if deadline is None else deadline,
                      container_id=cid, timeout=timeout)

    def remove_container(self, cid: str, *, deadline: float | None = None) -> None:
        self._runtime("RemoveContainer", deadline, container_id=cid)

    def container_status(self, cid: str, *, deadline: float | None = None) -> ContainerStatus:
        s = self._runtime("ContainerStatus", deadline, container_id=cid).status
        return ContainerStatus(
            s.id, s.metadata.name, s.metadata.attempt,
            ContainerState(self._enum("ContainerState", s.state)), s.exit_code, s.image.image,
            s.image_ref, s.reason, s.message, s.created_at, s.started_at, s.finished_at,
            s.log_path, dict(s.labels), dict(s.annotations))

    def list_containers(self, pod_id: str | None = None, *,
                        deadline: float | None = None) -> list[ContainerInfo]:
        """Every container (of pod ``pod_id`` if given), whatever its state."""
        filt = {"filter": {"pod_sandbox_id": pod_id}} if pod_id is not None else {}
        r = self._runtime("ListContainers", deadline, **filt)
        return [ContainerInfo(c.id, c.pod_sandbox_id, c.metadata.name, c.metadata.attempt,
                              c.image.image, c.image_ref,
                              ContainerState(self._enum("ContainerState", c.state)),
                              c.created_at, dict(c.labels), dict(c.annotations))
                for c in r.containers]

    def exec_sync(self, cid: str, cmd: Sequence[str], timeout: int = 30, *,
                  deadline: float | None = None) -> ExecResult:
        """Run ``cmd`` in the running container and wait for it; ``timeout`` seconds is the
        CRI's own limit (0: none), the RPC's deadline is that plus 30 s (or the default)."""
        rpc_deadline = deadline if deadline is not None else (
            timeout + 30.0 if timeout else self.deadline)
        r = self._runtime("ExecSync", rpc_deadline, container_id=cid, cmd=list(cmd),
                          timeout=timeout)
        return ExecResult(r.exit_code, r.stdout, r.stderr)

    # -- ImageService

    def pull_image(self, ref: str, pod: PodSpec | None = None, *,
                   creds: tuple[str, str] | None = None,
                   deadline: float | None = None) -> str:
        """Pull and unpack ``ref`` (for ``pod``: snapshotters may see its annotations).
        Returns the image ref (containerd: the image id, ``sha256:`` of the config)."""
        fields: dict[str, Any] = {"image": {"image": ref}}
        if pod is not None:
            fields["sandbox_config"] = _pod_config(pod)
        if creds is not None:
            fields["auth"] = {"username": creds[0], "password": creds[1]}
        r = self._image("PullImage", self.pull_deadline if deadline is None else deadline,
                        **fields)
        image_ref: str = r.image_ref
        return image_ref

    def image_status(self, ref: str, *, deadline: float | None = None) -> ImageInfo | None:
        """The image named ``ref`` (tag, digest or id); None if there is none."""
        r = self._image("ImageStatus", deadline, image={"image": ref})
        return _image_info(r.image) if r.HasField("image") and r.image.id else None

    def list_images(self, *, deadline: float | None = None) -> list[ImageInfo]:
        return [_image_info(i) for i in self._image("ListImages", deadline).images]

    def remove_image(self, ref: str, *, deadline: float | None = None) -> None:
        """Remove the image named ``ref``; idempotent (a missing image is not an error)."""
        self._image("RemoveImage", deadline, image={"image": ref})

    def image_fs_info(self, *, deadline: float | None = None) -> list[FilesystemUsage]:
        """Usage of the snapshotter's filesystem, as the CRI plugin samples it."""
        r = self._image("ImageFsInfo", deadline)
        return [FilesystemUsage(u.fs_id.mountpoint, u.used_bytes.value, u.inodes_used.value,
                                u.timestamp)
                for u in r.image_filesystems]


def _image_info(i: Any) -> ImageInfo:
    return ImageInfo(i.id, tuple(i.repo_tags), tuple(i.repo_digests), i.size)


def _pod_config(pod: PodSpec) -> dict[str, Any]:
    ns: dict[str, Any] = {"network": "NODE"} if pod.host_network else {}
    linux: dict[str, Any] = {"security_context": {"namespace_options": ns,
                                                  "privileged": pod.privileged}}
    if pod.cgroup_parent:
        linux["cgroup_parent"] = pod.cgroup_parent
    return {
        "metadata": {"name": pod.name, "uid": pod.uid, "namespace": pod.namespace,
                     "attempt": pod.attempt},
        "hostname": "" if pod.host_network else pod.hostname,
        "log_directory": pod.log_directory,
        "labels": dict(pod.labels),
        "annotations": dict(pod.annotations),
        "linux": linux,
    }


def _container_config(pod: PodSpec, spec: ContainerSpec) -> dict[str, Any]:
    ns: dict[str, Any] = {"network": "NODE"} if pod.host_network else {}
    return {
        "metadata": {"name": spec.name, "attempt": spec.attempt},
        "image": {"image": spec.image},
        "command": list(spec.command),
        "args": list(spec.args),
        "working_dir": spec.working_dir,
        "envs": [{"key": k, "value": v} for k, v in spec.envs.items()],
        "mounts": [{"host_path": m.host_path, "container_path": m.container_path,
                    "readonly": m.readonly} for m in spec.mounts],
        "labels": dict(spec.labels),
        "annotations": dict(spec.annotations),
        "log_path": spec.log_path,
        "linux": {"security_context": {"namespace_options": ns,
                                       "privileged": spec.privileged,
                                       "readonly_rootfs": spec.readonly_rootfs}},
    }
