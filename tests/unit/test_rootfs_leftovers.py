"""The rootfs writer's own cleanup of a killed build (recovery only calls it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kata_ipu.executor import CommandFailed, Completed, Executor
from kata_ipu.rootfs import leftovers


class Recording(Executor):
    def __init__(self, busy: set[str]) -> None:
        self.busy = busy
        self.argvs: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], **_: Any) -> Completed:
        argv = tuple(argv)
        self.argvs.append(argv)
        result = Completed(argv, 0, b"", b"", 0.0)
        if argv[1] != "--lazy" and argv[-1] in self.busy:
            raise CommandFailed(Completed(argv, 32, b"", b"target is busy", 0.0))
        return result


def test_cleanup_unmounts_detaches_and_deletes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    build = tmp_path / "build"
    (build / ".rootfs-mnt-x").mkdir(parents=True)
    (build / ".rootfs-stage-y" / "etc").mkdir(parents=True)
    (build / "b1.img").write_bytes(b"x")
    mnt = str(build / ".rootfs-mnt-x")
    monkeypatch.setattr(leftovers.mountinfo, "mounts_under", lambda _d: [mnt])
    monkeypatch.setattr(leftovers.loop, "find_under", lambda _d: [(5, str(build / "b1.img"))])
    detached: list[int] = []
    monkeypatch.setattr(leftovers.loop, "detach",
                        lambda minor, _f: detached.append(minor) or True)
    ex = Recording(busy={mnt})

    done = leftovers.cleanup_leftovers(build, executor=ex)

    assert ex.argvs == [("umount", mnt), ("umount", "--lazy", mnt)]
    assert detached == [5]
    assert done == ["unmounted partial build .rootfs-mnt-x",
                    "detached /dev/loop5 of partial build b1.img",
                    "removed partial build .rootfs-mnt-x", "removed partial build .rootfs-stage-y",
                    "removed partial build b1.img"]
    assert build.is_dir() and list(build.iterdir()) == []


def test_nothing_to_clean_without_a_build_directory(tmp_path: Path) -> None:
    assert leftovers.cleanup_leftovers(tmp_path / "absent") == []
