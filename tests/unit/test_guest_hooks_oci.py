"""The OCI hook's inputs (state JSON, bundle config, annotations), superblock detection,
/proc/mounts parsing and the command line's error reporting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from guest_hooks import __main__ as cli
from guest_hooks import oci
from guest_hooks.errors import InvalidArgument, WrongFilesystem
from guest_hooks.mount import detect_fstype, mount_rootfs, mountpoints
from guest_hooks.pcipath import PciPath


def _bundle(tmp: Path, annotations: dict[str, str], root: str = "rootfs") -> Path:
    bundle = tmp / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"root": {"path": root}, "annotations": annotations}))
    return bundle


def test_hook_request_from_state_and_config(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, {oci.PCI_PATH: "06/00", oci.FSTYPE: "erofs"})
    state = oci.parse_state(json.dumps({"ociVersion": "1.0.2", "id": "c1", "status":
                                        "creating", "bundle": str(bundle),
                                        "annotations": {oci.TIMEOUT: "7"}}))
    req = oci.hook_request(state)
    assert req.root == str(bundle / "rootfs")
    assert req.locator.pci_path == PciPath((6, 0))
    assert (req.fstype, req.timeout, req.readonly, req.status) == ("erofs", 7.0, False,
                                                                   "creating")


def test_state_annotations_override_and_absolute_root(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, {oci.PCI_PATH: "02/01"}, root="/run/c1/rootfs")
    req = oci.hook_request({"id": "c1", "bundle": str(bundle),
                            "annotations": {oci.PCI_PATH: "02/03", oci.READONLY: "true"}})
    assert req.locator.pci_path == PciPath((2, 3)) and req.readonly
    assert req.root == "/run/c1/rootfs"


@pytest.mark.parametrize("text,message", [
    ("not json", "not JSON"), ("[]", "not a JSON object"), ('{"id": "x"}', "no 'bundle'"),
])
def test_bad_state(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        oci.parse_state(text)


def test_missing_annotations_and_config(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, {})
    with pytest.raises(InvalidArgument, match="pci-path is not annotated"):
        oci.hook_request({"id": "c", "bundle": str(bundle)})
    with pytest.raises(InvalidArgument, match="cannot read"):
        oci.hook_request({"id": "c", "bundle": str(tmp_path / "nope")})
    (tmp_path / "other").mkdir()
    bad = _bundle(tmp_path / "other", {oci.PCI_PATH: "02/01", oci.TIMEOUT: "soon"})
    with pytest.raises(InvalidArgument, match="not a number"):
        oci.hook_request({"id": "c", "bundle": str(bad)})


def test_detect_fstype(tmp_path: Path) -> None:
    ext4 = tmp_path / "ext4"
    ext4.write_bytes(b"\0" * 1080 + b"\x53\xef" + b"\0" * 966)
    erofs = tmp_path / "erofs"
    erofs.write_bytes(b"\0" * 1024 + b"\xe2\xe1\xf5\xe0" + b"\0" * 1020)
    xfs = tmp_path / "xfs"
    xfs.write_bytes(b"XFSB" + b"\0" * 2044)
    zero = tmp_path / "zero"
    zero.write_bytes(b"\0" * 4096)
    assert [detect_fstype(str(p)) for p in (ext4, erofs, xfs, zero)] == [
        "ext4", "erofs", "xfs", None]


def test_wrong_fstype_refused_before_any_mount(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"\0" * 1080 + b"\x53\xef" + b"\0" * 966)
    with pytest.raises(WrongFilesystem, match="expected a erofs filesystem, found ext4"):
        mount_rootfs(str(disk), str(tmp_path / "target"), "erofs")
    with pytest.raises(InvalidArgument, match="unsupported fstype"):
        mount_rootfs(str(disk), str(tmp_path / "target"), "btrfs")


def test_mountpoints_decodes_escapes(tmp_path: Path) -> None:
    f = tmp_path / "mounts"
    f.write_text("/dev/vdb /run/with\\040space ext4 rw 0 0\n")
    assert mountpoints(str(f)) == [("/dev/vdb", "/run/with space", "ext4")]


def test_cli_reports_kind_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mount", "--pci-path", "zz", "--target", "/x"]) == 1
    assert "guest_hooks: invalid-argument:" in capsys.readouterr().err


def test_hook_skips_containers_without_ipu_annotations(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _bundle(tmp_path, {"other": "x"})
    result = cli.run(["hook"], json.dumps({"id": "c9", "bundle": str(bundle)}))
    assert result["id"] == "c9" and "pci-path is not annotated" in str(result["skipped"])
    monkeypatch.setattr("sys.stdin", io.StringIO("{"))
    assert cli.main(["hook"]) == 1
    assert "invalid-argument: OCI state on stdin is not JSON" in capsys.readouterr().err
