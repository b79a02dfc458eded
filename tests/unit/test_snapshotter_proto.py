"""The ipu snapshotter's copy of containerd's snapshots API: generated code in sync with its
.proto, and every message, field and method wire-identical to what containerd itself was
built with (the descriptors compiled into /usr/bin/containerd are the oracle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from kata_ipu.testing.cri import containerd_binary, embedded_descriptors
from kata_ipu.testing.prereq import require_programs
from shim_hooks.snapshotter.proto import mount_pb2, snapshots_pb2

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "shim_hooks" / "snapshotter" / "proto"


def test_generated_code_is_in_sync_with_the_protos(tmp_path: Path) -> None:
    protos = [str(PROTO_DIR.relative_to(REPO) / n) for n in ("mount.proto", "snapshots.proto")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", *protos], check=True, cwd=REPO)
    for name in ("mount_pb2.py", "mount_pb2.pyi", "snapshots_pb2.py", "snapshots_pb2.pyi"):
        generated = tmp_path / "shim_hooks" / "snapshotter" / "proto" / name
        assert generated.read_bytes() == (PROTO_DIR / name).read_bytes(), (
            f"{name} is stale: run scripts/gen-proto and commit the result")


def _shape(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """What goes on the wire: messages (nested ones too), fields, enums and methods."""
    def fields(m: descriptor_pb2.DescriptorProto, prefix: str) -> dict[str, object]:
        out: dict[str, object] = {prefix + m.name: sorted(
            (f.name, f.number, f.type, f.label, f.type_name) for f in m.field)}
        for n in m.nested_type:
            out.update(fields(n, prefix + m.name + "."))
        return out

    shape: dict[str, object] = {}
    for m in fd.message_type:
        shape.update(fields(m, ""))
    for e in fd.enum_type:
        shape[f"enum {e.name}"] = sorted((v.name, v.number) for v in e.value)
    for s in fd.service:
        shape[f"service {s.name}"] = sorted(
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in s.method)
    return shape


def _ours(module: object) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)  # type: ignore[attr-defined]
    return fd


def test_the_api_is_wire_identical_to_containerds() -> None:
    require_programs("containerd")
    binary = containerd_binary()
    theirs = {fd.name.rsplit("/", 1)[-1]: fd for pkg in ("containerd.services.snapshots.v1",
                                                        "containerd.types")
              for fd in embedded_descriptors(binary, pkg)}
    assert {"snapshots.proto", "mount.proto"} <= set(theirs)
    for name, module in (("snapshots.proto", snapshots_pb2), ("mount.proto", mount_pb2)):
        ours, real = _ours(module), theirs[name]
        assert ours.package == real.package
        assert _shape(ours) == _shape(real), name
    assert snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].full_name == (
        "containerd.services.snapshots.v1.Snapshots")
