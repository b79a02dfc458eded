"""The ground floor (kata_ipu.osutil): unix socket paths and peers, atomic files, sd_notify."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from kata_ipu.osutil import notify
from kata_ipu.osutil.atomicfile import fsync_dir, temp_path, write_atomic
from kata_ipu.osutil.unixsock import (
    PathState,
    clear_stale_socket,
    is_serving,
    peer_credentials,
)


def _listener(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_a_missing_path_is_free(tmp_path: Path) -> None:
    assert clear_stale_socket(str(tmp_path / "none.sock")) is PathState.FREE


def test_a_stale_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    _listener(path).close()  # the file stays, nobody listens
    assert path.exists() and not is_serving(str(path))
    assert clear_stale_socket(str(path)) is PathState.FREE
    assert not path.exists()


def test_a_live_server_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with _listener(path):
        assert is_serving(str(path))
        assert clear_stale_socket(str(path)) is PathState.SERVING
        assert path.exists()


def test_a_live_seqpacket_server_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with _listener(path, socket.SOCK_SEQPACKET):
        assert is_serving(str(path), socket.SOCK_SEQPACKET)
        assert clear_stale_socket(str(path), socket.SOCK_SEQPACKET) is PathState.SERVING


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("data")
    assert clear_stale_socket(str(path)) is PathState.NOT_A_SOCKET
    assert path.read_text() == "data"
    assert not is_serving(str(path))


def test_peer_credentials_name_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_credentials(a)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())


@pytest.mark.parametrize("durable", [False, True])
def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "rec.json"
    path.write_bytes(b"old")
    write_atomic(path, b"new", durable=durable)
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]


def test_write_atomic_creates_a_missing_file(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a", b"x", durable=True)
    assert (tmp_path / "a").read_bytes() == b"x"
    fsync_dir(tmp_path)


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    path.write_bytes(b"old")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "d", b"new")  # rename(2) of a file over a directory
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "rec"]


def test_concurrent_writers_use_their_own_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    names: set[Path] = set()

    def write(i: int) -> None:
        names.add(temp_path(path))
        for _ in range(50):
            write_atomic(path, str(i).encode() * 100)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 4
    data = path.read_bytes()
    assert data == data[:1] * 100


def test_sd_notify_sends_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.ready("recovered 3 volumes")
    msg = sock.recv(4096).decode().split("\n")
    assert msg[0] == "READY=1" and f"MAINPID={os.getpid()}" in msg
    assert "STATUS=recovered 3 volumes" in msg
    sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify.ready()



_MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:5 / /proc rw,nosuid shared:2 - proc proc rw
41 22 7:3 / {root}/a\\040b rw - ext4 /dev/loop3 rw
42 41 0:40 / {root}/a\\040b/deep rw - tmpfs tmp\\134fs rw
43 22 7:4 / {root}/ab rw - xfs /dev/loop4 rw
44 22 7:5 / {root}/other rw - ext4 /dev/loop5 rw
45 44 7:6 / {root}/other rw - erofs /dev/loop6 ro
"""


def _table(tmp_path: Path) -> str:
    root = os.path.realpath(tmp_path)
    path = tmp_path / "mountinfo"
    path.write_text(_MOUNTINFO.format(root=root))
    return str(path)


def test_mounts_under_a_prefix_deepest_first(tmp_path: Path) -> None:
    from kata_ipu.osutil.mountinfo import mounts_under

    table, root = _table(tmp_path), os.path.realpath(tmp_path)
    assert mounts_under(tmp_path / "a b", table=table) == [f"{root}/a b/deep", f"{root}/a b"]
    assert mounts_under(tmp_path / "a", table=table) == []  # "a b" and "ab" are not below "a"
    assert mounts_under(tmp_path / "none", table=table) == []


def test_mount_source_is_the_topmost_mount(tmp_path: Path) -> None:
    from kata_ipu.osutil.mountinfo import mount_source

    table = _table(tmp_path)
    assert mount_source(tmp_path / "a b" / "deep", table=table) == ("tmp\\fs", "tmpfs")
    assert mount_source(tmp_path / "other", table=table) == ("/dev/loop6", "erofs")
    assert mount_source(tmp_path / "none", table=table) is None


def test_device_is_mounted(tmp_path: Path) -> None:
    from kata_ipu.osutil.mountinfo import device_is_mounted

    table = _table(tmp_path)
    assert device_is_mounted(7, 3, table=table)
    assert not device_is_mounted(7, 9, table=table)


def test_the_live_table_has_proc() -> None:
    from kata_ipu.osutil.mountinfo import mount_source, mounts_under

    assert mount_source("/proc") is not None and mount_source("/proc")[1] == "proc"
    assert "/proc" in mounts_under("/proc")
