"""A hand-written codec for the few Kata agent messages the VM tests use (``package grpc``).

Field numbers follow Kata's ``src/libs/protocols/protos/agent.proto`` and ``oci.proto``
(shared/notes/kata.md §7). Hand-written because the guest's Debian python3-protobuf 3.21 cannot
load current generated code; this module imports only the stdlib and
:mod:`kata_ipu.protowire`, so it runs on both sides of the VM boundary.
Unknown fields are skipped on decode (protobuf's rule); proto3 defaults are not encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kata_ipu import protowire
from kata_ipu.protowire import iter_fields

SERVICE = "grpc.AgentService"
EMPTY = b""  # google.protobuf.Empty

_varint = protowire.varint
_len = protowire.len_field
_str = protowire.str_field
_int = protowire.int_field


def _strs(number: int, values: list[str]) -> bytes:
    return b"".join(_len(number, v.encode()) for v in values)


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ValueError("expected a length-delimited string field")
    return value.decode()


def _blob(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("expected a length-delimited field")
    return value


def _num(value: int | bytes, bits: int = 64, signed: bool = False) -> int:
    if isinstance(value, bytes):
        raise ValueError("expected a varint field")
    value &= (1 << bits) - 1
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


@dataclass
class Storage:
    """``grpc.Storage``: driver=1 driver_options=2 source=3 fstype=4 options=5 mount_point=6."""

    driver: str = ""
    source: str = ""
    fstype: str = ""
    mount_point: str = ""
    options: list[str] = field(default_factory=list)
    driver_options: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return (_str(1, self.driver) + _strs(2, self.driver_options) + _str(3, self.source)
                + _str(4, self.fstype) + _strs(5, self.options) + _str(6, self.mount_point))

    @classmethod
    def decode(cls, data: bytes) -> Storage:
        s = cls()
        for number, _wt, value in iter_fields(data):
            if number == 1:
                s.driver = _text(value)
            elif number == 2:
                s.driver_options.append(_text(value))
            elif number == 3:
                s.source = _text(value)
            elif number == 4:
                s.fstype = _text(value)
            elif number == 5:
                s.options.append(_text(value))
            elif number == 6:
                s.mount_point = _text(value)
        return s


@dataclass
class Process:
    """``grpc.Process`` (oci.proto): Terminal=1 Args=4 Env=5 Cwd=6."""

    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    terminal: bool = False

    def encode(self) -> bytes:
        return (_int(1, int(self.terminal)) + _strs(4, self.args) + _strs(5, self.env)
                + _str(6, self.cwd))

    @classmethod
    def decode(cls, data: bytes) -> Process:
        p = cls(cwd="")
        for number, _wt, value in iter_fields(data):
            if number == 1:
                p.terminal = bool(_num(value))
            elif number == 4:
                p.args.append(_text(value))
            elif number == 5:
                p.env.append(_text(value))
            elif number == 6:
                p.cwd = _text(value)
        return p


@dataclass
class Spec:
    """``grpc.Spec`` (oci.proto): Version=1 Process=2 Root{Path=1,Readonly=2}=3 Hostname=4
    Annotations=7 (map<string,string>)."""

    version: str = "1.0.2"
    process: Process | None = None
    root_path: str = ""
    root_readonly: bool = False
    hostname: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        out = _str(1, self.version)
        if self.process is not None:
            out += _len(2, self.process.encode())
        out += _len(3, _str(1, self.root_path) + _int(2, int(self.root_readonly)))
        out += _str(4, self.hostname)
        for key, value in sorted(self.annotations.items()):
            out += _len(7, _str(1, key) + _str(2, value))
        return out

    @classmethod
    def decode(cls, data: bytes) -> Spec:
        s = cls(version="")
        for number, _wt, value in iter_fields(data):
            if number == 1:
                s.version = _text(value)
            elif number == 2:
                s.process = Process.decode(_blob(value))
            elif number == 3:
                s.root_path, s.root_readonly = _decode_root(_blob(value), s)
            elif number == 4:
                s.hostname = _text(value)
            elif number == 7:
                key, val = _decode_annotation(_blob(value))
                s.annotations[key] = val
        return s


def _decode_root(data: bytes, s: Spec) -> tuple[str, bool]:
    """Root{path=1 readonly=2}, over the values ``s`` already has."""
    path, readonly = s.root_path, s.root_readonly
    for n, _w, v in iter_fields(data):
        if n == 1:
            path = _text(v)
        elif n == 2:
            readonly = bool(_num(v))
    return path, readonly


def _decode_annotation(data: bytes) -> tuple[str, str]:
    """A map entry {key=1 value=2}."""
    key = val = ""
    for n, _w, v in iter_fields(data):
        if n == 1:
            key = _text(v)
        elif n == 2:
            val = _text(v)
    return key, val


@dataclass
class CreateContainerRequest:
    """container_id=1 exec_id=2 storages=5 OCI=6 (devices=4 and the rest are not used)."""

    container_id: str = ""
    exec_id: str = ""
    storages: list[Storage] = field(default_factory=list)
    oci: Spec | None = None

    def encode(self) -> bytes:
        out = _str(1, self.container_id) + _str(2, self.exec_id)
        out += b"".join(_len(5, s.encode()) for s in self.storages)
        if self.oci is not None:
            out += _len(6, self.oci.encode())
        return out

    @classmethod
    def decode(cls, data: bytes) -> CreateContainerRequest:
        r = cls()
        for number, _wt, value in iter_fields(data):
            if number == 1:
                r.container_id = _text(value)
            elif number == 2:
                r.exec_id = _text(value)
            elif number == 5:
                r.storages.append(Storage.decode(_blob(value)))
            elif number == 6:
                r.oci = Spec.decode(_blob(value))
        return r


@dataclass
class ContainerRequest:
    """``StartContainerRequest`` / ``RemoveContainerRequest`` (container_id=1, timeout=2) /
    ``WaitProcessRequest`` (container_id=1, exec_id=2) / ``ReadStreamRequest``
    (container_id=1, exec_id=2, len=3): one shape, unused fields stay at their defaults."""

    container_id: str = ""
    exec_id: str = ""
    timeout: int = 0  # RemoveContainerRequest.timeout (field 2, uint32)
    length: int = 0  # ReadStreamRequest.len (field 3, uint32)

    def encode_remove(self) -> bytes:
        return _str(1, self.container_id) + _int(2, self.timeout)

    def encode(self) -> bytes:
        return _str(1, self.container_id) + _str(2, self.exec_id) + _int(3, self.length)

    @classmethod
    def decode(cls, data: bytes, *, remove: bool = False) -> ContainerRequest:
        r = cls()
        for number, _wt, value in iter_fields(data):
            if number == 1:
                r.container_id = _text(value)
            elif number == 2 and remove:
                r.timeout = _num(value, 32)
            elif number == 2:
                r.exec_id = _text(value)
            elif number == 3:
                r.length = _num(value, 32)
        return r


def encode_wait_response(status: int) -> bytes:
    """``WaitProcessResponse{int32 status = 1}``."""
    return _int(1, status)


def decode_wait_response(data: bytes) -> int:
    status = 0
    for number, _wt, value in iter_fields(data):
        if number == 1:
            status = _num(value, 32, signed=True)
    return status


def encode_read_response(data: bytes) -> bytes:
    """``ReadStreamResponse{bytes data = 1}``."""
    return _len(1, data) if data else b""


def decode_read_response(data: bytes) -> bytes:
    out = b""
    for number, _wt, value in iter_fields(data):
        if number == 1:
            out = _blob(value)
    return out


@dataclass
class CopyFileRequest:
    """``CopyFileRequest``: path=1 file_size=2 offset=7 data=8 (modes and owner not used)."""

    path: str = ""
    file_size: int = 0
    offset: int = 0
    data: bytes = b""

    def encode(self) -> bytes:
        return (_str(1, self.path) + _int(2, self.file_size) + _int(7, self.offset)
                + (_len(8, self.data) if self.data else b""))

    @classmethod
    def decode(cls, data: bytes) -> CopyFileRequest:
        r = cls()
        for number, _wt, value in iter_fields(data):
            if number == 1:
                r.path = _text(value)
            elif number == 2:
                r.file_size = _num(value, signed=True)
            elif number == 7:
                r.offset = _num(value, signed=True)
            elif number == 8:
                r.data = _blob(value)
        return r
