"""shim_hooks.hostmount: mount options, path resolution inside a container root, prefetch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shim_hooks import hostmount


def test_mount_options_split_into_flags_and_data() -> None:
    flags, data = hostmount.split_options(("ro", "nodev", "noatime", "errors=remount-ro",
                                           "discard", ""))
    assert flags == hostmount.MS_RDONLY | hostmount.MS_NODEV | hostmount.MS_NOATIME
    assert data == "errors=remount-ro,discard"
    assert hostmount.split_options(()) == (0, "")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "bin").mkdir(parents=True)
    (r / "usr" / "bin").mkdir(parents=True)
    (r / "bin" / "busybox").write_bytes(b"not elf")
    (r / "bin" / "sh").symlink_to("busybox")  # relative
    (r / "usr" / "bin" / "env").symlink_to("/bin/busybox")  # absolute: inside the root
    (r / "bin" / "escape").symlink_to("../../../../etc/passwd")  # .. stops at the root
    (r / "bin" / "loop").symlink_to("loop")
    return r


@pytest.mark.parametrize(("path", "expected"), [
    ("/bin/sh", "bin/busybox"),
    ("bin/sh", "bin/busybox"),
    ("/usr/bin/env", "bin/busybox"),
    ("/usr/bin/../../bin/./sh", "bin/busybox"),
    ("/bin/escape", None),  # would be /etc/passwd of the root, which does not exist
    ("/bin/loop", None),
    ("/nope", None),
])
def test_paths_resolve_without_leaving_the_root(root: Path, path: str,
                                                expected: str | None) -> None:
    got = hostmount.resolve_in_root(root, path)
    assert got == (root / expected if expected else None)


def test_prefetch_finds_the_program_in_path_and_its_elf_interpreter(root: Path) -> None:
    ls = shutil.which("ls")
    assert ls is not None
    shutil.copy(ls, root / "usr" / "bin" / "ls")
    loader = hostmount._elf_interpreter_of(root / "usr" / "bin" / "ls")
    assert loader is not None and loader.startswith("/lib")  # a dynamic executable
    target = root / loader.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(loader).resolve(), target)
    spec = {"process": {"args": ["ls", "-l"], "env": ["PATH=/usr/local/bin:/usr/bin"]}}
    assert hostmount.prefetch_entrypoint(root, spec) == [root / "usr/bin/ls", target]
    static = {"process": {"args": ["/bin/sh", "-c", "true"]}}
    assert hostmount.prefetch_entrypoint(root, static) == [root / "bin/busybox"]
    assert hostmount.prefetch_entrypoint(root, {"process": {"args": ["missing"]}}) == []
    assert hostmount.prefetch_entrypoint(root, {}) == []
