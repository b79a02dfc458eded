"""Teardown assertions: no mount and no loop device left that involves a test's directory.

Other tests (and other people) may mount things on the same host concurrently, so the check is
scoped to a path prefix: mount points under it, and loop devices whose backing file is under it.
"""

from __future__ import annotations

import os
import subprocess

from kata_ipu.osutil.mountinfo import mounts_under


def leftovers(prefix: str | os.PathLike[str]) -> list[str]:
    root = os.path.realpath(prefix)
    out = [f"mount left behind: {target}" for target in mounts_under(root)]
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout
    for line in loops.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip().removesuffix(" (deleted)")
        if back == root or back.startswith(root + "/"):
            out.append(f"loop device left behind: {name} -> {back}")
    return out
