"""Layer application into a temp dir from in-memory tar streams (umoci's TestUnpack* style).

The applier sets foreign owners and makes device nodes, so these tests need root (CAP_CHOWN,
CAP_MKNOD); they need no mounts, loop devices or external programs.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kata_ipu.rootfs.apply import Applier
from kata_ipu.testing.ocibuild import FIXED_MTIME, LayerBuilder
from kata_ipu.testing.prereq import require_root
from tests.support.images import CAP_NET_BIND_SERVICE


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def apply(root: Path, *layers: bytes) -> None:
    with Applier(str(root)) as a:
        for layer in layers:
            a.apply_layer(io.BytesIO(layer))


def test_file_metadata_setuid_owner_mtime_xattrs(tmp_path: Path) -> None:
    layer = (LayerBuilder()
             .file("bin/su", b"x" * 3000, mode=0o4755, uid=0, gid=0)
             .file("bin/wall", b"w", mode=0o2755, uid=5, gid=6)
             .dir("tmp", mode=0o1777)
             .file("bin/ping", b"p", mode=0o755, uid=1234, gid=4321, mtime=1_600_000_000,
                   xattrs={"security.capability": CAP_NET_BIND_SERVICE, "user.a": b"\x00\x01v"})
             .build())
    apply(tmp_path, layer)
    st = os.lstat(tmp_path / "bin/su")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_size == 3000
    st = os.lstat(tmp_path / "bin/wall")
    assert stat.S_IMODE(st.st_mode) == 0o2755 and (st.st_uid, st.st_gid) == (5, 6)
    assert stat.S_IMODE(os.lstat(tmp_path / "tmp").st_mode) == 0o1777
    st = os.lstat(tmp_path / "bin/ping")
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (1234, 4321, 1_600_000_000)
    assert os.getxattr(tmp_path / "bin/ping", "security.capability") == CAP_NET_BIND_SERVICE
    assert os.getxattr(tmp_path / "bin/ping", "user.a") == b"\x00\x01v"
    # Directory mtimes are set after their children were created.
    assert int(os.lstat(tmp_path / "tmp").st_mtime) == FIXED_MTIME


def test_devices_fifo_symlink(tmp_path: Path) -> None:
    apply(tmp_path, LayerBuilder().device("dev/null", "char", 1, 3, mode=0o666)
          .device("dev/sda", "block", 8, 0).fifo("run/ctl", mode=0o600)
          .symlink("lib", "usr/lib", uid=7, gid=8).build())
    st = os.lstat(tmp_path / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(tmp_path / "dev/sda")
    assert stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == 8
    assert stat.S_ISFIFO(os.lstat(tmp_path / "run/ctl").st_mode)
    st = os.lstat(tmp_path / "lib")
    assert os.readlink(tmp_path / "lib") == "usr/lib" and (st.st_uid, st.st_gid) == (7, 8)


def test_hardlink_to_file_from_lower_layer(tmp_path: Path) -> None:
    apply(tmp_path, LayerBuilder().file("usr/bin/python3.11", b"py", mode=0o755).build(),
          LayerBuilder().hardlink("usr/bin/python3", "usr/bin/python3.11").build())
    a, b = os.lstat(tmp_path / "usr/bin/python3.11"), os.lstat(tmp_path / "usr/bin/python3")
    assert a.st_ino == b.st_ino and a.st_nlink == 2


def test_whiteout_removes_lower_file_and_dir(tmp_path: Path) -> None:
    apply(tmp_path,
          LayerBuilder().file("etc/a", b"a").file("etc/b", b"b").file("var/cache/x/y", b"y")
          .build(),
          LayerBuilder().whiteout("etc/a").whiteout("var/cache").whiteout("nothing/here")
          .build())
    assert not (tmp_path / "etc/a").exists() and (tmp_path / "etc/b").exists()
    assert not (tmp_path / "var/cache").exists() and (tmp_path / "var").is_dir()
    assert not (tmp_path / "nothing").exists()  # a whiteout never creates its parent
    assert not any(p.name.startswith(".wh.") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_same_layer_whiteout_spares_entry_of_that_layer(tmp_path: Path,
                                                        whiteout_first: bool) -> None:
    upper = LayerBuilder()
    if whiteout_first:
        upper.whiteout("f").file("f", b"new")
    else:
        upper.file("f", b"new").whiteout("f")
    apply(tmp_path, LayerBuilder().file("f", b"old").build(), upper.build())
    assert (tmp_path / "f").read_bytes() == b"new"


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_hides_lower_keeps_same_layer(tmp_path: Path, marker_first: bool) -> None:
    lower = LayerBuilder().file("d/old", b"o").file("d/sub/deep", b"x").file("d/sub/keep", b"k")
    upper = LayerBuilder().dir("d")
    if marker_first:
        upper.opaque("d").file("d/new", b"n").file("d/sub/mine", b"m")
    else:
        upper.file("d/new", b"n").file("d/sub/mine", b"m").opaque("d")
    apply(tmp_path, lower.build(), upper.build())
    names = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "d").rglob("*"))
    # d/sub survives only as the parent of d/sub/mine; its lower children are hidden.
    assert names == ["d/new", "d/sub", "d/sub/mine"]


def test_dir_replaced_by_file_and_file_by_dir(tmp_path: Path) -> None:
    apply(tmp_path,
          LayerBuilder().file("a/x", b"x").file("b", b"b").build(),
          LayerBuilder().file("a", b"now a file").dir("b", mode=0o700).file("b/c", b"c").build())
    assert (tmp_path / "a").read_bytes() == b"now a file"
    assert (tmp_path / "b").is_dir() and (tmp_path / "b/c").read_bytes() == b"c"
    assert stat.S_IMODE(os.lstat(tmp_path / "b").st_mode) == 0o700


def test_symlinked_parent_is_followed_inside_root(tmp_path: Path) -> None:
    # Debian's usrmerge (bin -> usr/bin) and /var/run -> /run (absolute): later layers write
    # through them, and the files must land where the container will see them.
    apply(tmp_path,
          LayerBuilder().dir("usr/bin").symlink("bin", "usr/bin").dir("run")
          .dir("var").symlink("var/run", "/run").build(),
          LayerBuilder().file("bin/true", b"t").file("var/run/pid", b"1").build())
    assert (tmp_path / "usr/bin/true").read_bytes() == b"t"
    assert (tmp_path / "run/pid").read_bytes() == b"1"
    assert os.path.islink(tmp_path / "bin") and os.path.islink(tmp_path / "var/run")


def test_redeclared_dir_replaces_xattrs_and_mode(tmp_path: Path) -> None:
    apply(tmp_path,
          LayerBuilder().dir("d", mode=0o755, xattrs={"user.x": b"1"}).file("d/f", b"f").build(),
          LayerBuilder().dir("d", mode=0o750, uid=3).build())
    st = os.lstat(tmp_path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_uid == 3
    assert os.listxattr(tmp_path / "d") == [] and (tmp_path / "d/f").exists()


def test_file_over_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    apply(tmp_path, LayerBuilder().file("target", b"keep").symlink("l", "target").build(),
          LayerBuilder().file("l", b"mine").build())
    assert (tmp_path / "target").read_bytes() == b"keep"
    assert not os.path.islink(tmp_path / "l") and (tmp_path / "l").read_bytes() == b"mine"


def test_pax_long_names_and_gnu_sparse_kept_sparse(tmp_path: Path) -> None:
    long = "d/" + "n" * 200 + "/" + "f" * 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(long)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        add_gnu_sparse(tf, "sparse", real_size=1 << 30, offset=(1 << 30) - 4, data=b"tail")
    apply(tmp_path, buf.getvalue())
    assert (tmp_path / long).read_bytes() == b"abc"
    st = os.lstat(tmp_path / "sparse")
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < (1 << 20)
    with open(tmp_path / "sparse", "rb") as f:
        f.seek((1 << 30) - 4)
        assert f.read() == b"tail"


def add_gnu_sparse(tf: tarfile.TarFile, name: str, *, real_size: int, offset: int,
                   data: bytes) -> None:
    """A PAX 1.0 GNU sparse member, as ``tar --sparse --format=posix`` writes it."""
    sparse_map = f"1\n{offset}\n{len(data)}\n".encode()
    payload = sparse_map + b"\0" * (512 - len(sparse_map)) + data
    info = tarfile.TarInfo("GNUSparseFile.0/" + name)
    info.size = len(payload)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name, "GNU.sparse.realsize": str(real_size)}
    tf.addfile(info, io.BytesIO(payload))
