"""The few ``containerd.task.v2.Task`` messages the proxy reads or rewrites, hand-coded.

Field numbers follow containerd 1.6/1.7 ``runtime/v2/task/shim.proto`` and
``api/types/mount.proto``::

    message Mount { string type = 1; string source = 2; string target = 3;
                    repeated string options = 4; }
    message CreateTaskRequest { string id = 1; string bundle = 2; repeated Mount rootfs = 3;
                                bool terminal = 4; string stdin = 5; ... Any options = 10; }
    message DeleteRequest  { string id = 1; string exec_id = 2; }
    message DeleteResponse { uint32 pid = 1; uint32 exit_status = 2;
                             google.protobuf.Timestamp exited_at = 3; }
    message ConnectRequest { string id = 1; }
    message ConnectResponse { uint32 shim_pid = 1; uint32 task_pid = 2; string version = 3; }
    message ShutdownRequest { string id = 1; bool now = 2; }

Every other call is forwarded as opaque bytes. :func:`replace_rootfs` keeps every field of a
``CreateTaskRequest`` it does not own byte for byte (unknown ones included) and swaps only
field 3, so a newer containerd's additions survive the proxy; :func:`options_for_runc` drops
only field 10.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kata_ipu.protowire import (
    WireError,
    as_str,
    as_uint,
    encode_field,
    int_field,
    iter_fields,
    len_field,
    str_field,
)
from shim_hooks import runtimeopts

TASK_SERVICE = "containerd.task.v2.Task"
TASK_METHODS = ("State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
                "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
                "Shutdown")


_text = as_str
_uint = as_uint


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return (str_field(1, self.type) + str_field(2, self.source) +
                str_field(3, self.target) +
                b"".join(len_field(4, o.encode()) for o in self.options))

    @classmethod
    def decode(cls, data: bytes) -> Mount:
        typ = source = target = ""
        options: list[str] = []
        for number, _wt, value in iter_fields(data):
            if number == 1:
                typ = _text(1, value)
            elif number == 2:
                source = _text(2, value)
            elif number == 3:
                target = _text(3, value)
            elif number == 4:
                options.append(_text(4, value))
        return cls(typ, source, target, tuple(options))


@dataclass(frozen=True, slots=True)
class CreateTaskRequest:
    id: str
    bundle: str
    rootfs: tuple[Mount, ...] = ()
    raw: bytes = field(default=b"", repr=False)

    @classmethod
    def decode(cls, data: bytes) -> CreateTaskRequest:
        cid = bundle = ""
        rootfs: list[Mount] = []
        for number, _wt, value in iter_fields(data):
            if number == 1:
                cid = _text(1, value)
            elif number == 2:
                bundle = _text(2, value)
            elif number == 3:
                if not isinstance(value, bytes):
                    raise WireError("field 3: expected a Mount")
                rootfs.append(Mount.decode(value))
        return cls(cid, bundle, tuple(rootfs), bytes(data))


def replace_rootfs(data: bytes, mounts: tuple[Mount, ...]) -> bytes:
    """The same CreateTaskRequest with field 3 (rootfs) replaced by ``mounts``."""
    kept = [encode_field(n, wt, v) for n, wt, v in iter_fields(data) if n != 3]
    return b"".join(kept) + b"".join(len_field(3, m.encode()) for m in mounts)


def options_for_runc(data: bytes) -> bytes:
    """The same CreateTaskRequest without its ``options`` (field 10) unless they are runc's
    own: CRI fills them with the handler's ``runtimeoptions.v1.Options`` for any runtime type
    it does not know (kata-ipu's), which the runc shim cannot decode ("type with url
    runtimeoptions.v1.Options: not found") and does not need."""
    fields = list(iter_fields(data))
    options = [v for n, _wt, v in fields if n == 10]
    if not options or all(isinstance(v, bytes) and
                          runtimeopts.parse(v).type_url.endswith(runtimeopts.RUNC_OPTIONS)
                          for v in options):
        return data
    return b"".join(encode_field(n, wt, v) for n, wt, v in fields if n != 10)


def id_request(cid: str, exec_id: str = "") -> bytes:
    """DeleteRequest / StateRequest / ConnectRequest / WaitRequest: ``id=1, exec_id=2``."""
    return str_field(1, cid) + str_field(2, exec_id)


def decode_id_request(data: bytes) -> tuple[str, str]:
    """``(id, exec_id)`` of a DeleteRequest (and every request shaped like it)."""
    cid = exec_id = ""
    for number, _wt, value in iter_fields(data):
        if number == 1:
            cid = _text(1, value)
        elif number == 2:
            exec_id = _text(2, value)
    return cid, exec_id


def shutdown_request(cid: str, now: bool = False) -> bytes:
    return str_field(1, cid) + int_field(2, int(now))


@dataclass(frozen=True, slots=True)
class DeleteResponse:
    pid: int = 0
    exit_status: int = 0
    exited_seconds: int = 0
    exited_nanos: int = 0

    def encode(self) -> bytes:
        ts = int_field(1, self.exited_seconds) + int_field(2, self.exited_nanos)
        return (int_field(1, self.pid) + int_field(2, self.exit_status) +
                (len_field(3, ts) if ts else b""))

    @classmethod
    def decode(cls, data: bytes) -> DeleteResponse:
        pid = status = secs = nanos = 0
        for number, _wt, value in iter_fields(data):
            if number == 1:
                pid = _uint(1, value)
            elif number == 2:
                status = _uint(2, value)
            elif number == 3:
                if not isinstance(value, bytes):
                    raise WireError("field 3: expected a Timestamp")
                for n2, _w2, v2 in iter_fields(value):
                    if n2 == 1:
                        secs = _uint(1, v2)
                    elif n2 == 2:
                        nanos = _uint(2, v2)
        return cls(pid, status, secs, nanos)


def decode_connect_response(data: bytes) -> tuple[int, int, str]:
    """``(shim_pid, task_pid, version)``."""
    shim_pid = task_pid = 0
    version = ""
    for number, _wt, value in iter_fields(data):
        if number == 1:
            shim_pid = _uint(1, value)
        elif number == 2:
            task_pid = _uint(2, value)
        elif number == 3:
            version = _text(3, value)
    return shim_pid, task_pid, version
