"""kataipu.v1: the committed generated code matches the schema, and the schema is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kata_ipu import api
from kata_ipu.api import kataipu_pb2

API_DIR = Path(api.__file__).parent


def test_generated_code_is_in_sync_with_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{API_DIR}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", str(API_DIR / "kataipu.proto")],
        check=True,
    )
    for name in ("kataipu_pb2.py", "kataipu_pb2.pyi"):
        assert (tmp_path / name).read_bytes() == (API_DIR / name).read_bytes(), (
            f"{name} is stale: run scripts/gen-proto and commit the result")


def test_services_and_methods_match_the_constants() -> None:
    services = kataipu_pb2.DESCRIPTOR.services_by_name
    assert services["ImageService"].full_name == api.IMAGE_SERVICE
    assert services["RootfsService"].full_name == api.ROOTFS_SERVICE
    assert tuple(m.name for m in services["ImageService"].methods) == api.IMAGE_METHODS
    assert tuple(m.name for m in services["RootfsService"].methods) == api.ROOTFS_METHODS
    assert services["SystemService"].full_name == api.SYSTEM_SERVICE
    assert tuple(m.name for m in services["SystemService"].methods) == api.SYSTEM_METHODS


def test_export_kinds_and_device_descriptor() -> None:
    assert set(kataipu_pb2.ExportKind.keys()) >= {"HOST_BLOCK", "VHOST_USER_BLK", "VFIO_PCI",
                                                  "NBD"}
    fields = set(kataipu_pb2.Device.DESCRIPTOR.fields_by_name)
    assert fields >= {"path", "major", "minor", "fstype", "read_only", "serial",
                      "vhost_socket", "pci_address", "size_bytes"}
    dev = kataipu_pb2.Device(kind=kataipu_pb2.HOST_BLOCK, path="/dev/loop7", major=7,
                             minor=7, fstype=kataipu_pb2.EXT4, serial="kipu-abc",
                             size_bytes=1 << 30)
    again = kataipu_pb2.Device.FromString(dev.SerializeToString())
    assert again == dev
