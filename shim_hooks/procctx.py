"""Take on another process's execution context: what a child of that process would inherit.

The resident shim server forks the shim's ``start`` from its own process, but the shim (and the
delegate shim, runc and the container it starts) must run as if containerd had executed it:
with containerd's environment, working directory (the bundle), umask, resource limits, OOM
score, nice value and cgroups. :func:`adopt` copies those from the launcher, a process
containerd did start and which is still waiting for the answer, so reading ``/proc/<pid>`` is
race-free.

What cannot be copied raises :class:`ContextError` naming the part; the cgroup move is the one
best-effort step (a cgroup can be gone, or not writable in a nested container) and is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("shim_hooks.procctx")

_RLIMITS = tuple(getattr(resource, name) for name in dir(resource)
                 if name.startswith("RLIMIT_"))


class ContextError(OSError):
    """Part of the caller's context could not be taken over."""


@dataclass(frozen=True, slots=True)
class CgroupMount:
    root: str  # the cgroup path mounted there (``/`` on the host)
    point: str  # where it is mounted
    controllers: frozenset[str]  # empty for the cgroup2 (unified) hierarchy


def known_controllers(proc_cgroups: str) -> frozenset[str]:
    """Controller names from ``/proc/cgroups`` (its first column)."""
    return frozenset(line.split()[0] for line in proc_cgroups.splitlines()
                     if line and not line.startswith("#"))


def cgroup_mounts(mountinfo: str, known: frozenset[str]) -> list[CgroupMount]:
    """cgroup v1 and v2 mounts from ``/proc/self/mountinfo``; a v1 hierarchy is named by its
    controllers among ``known`` (its super options also hold flags like ``xattr``) or by
    its ``name=``."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.append(CgroupMount(fields[3], fields[4], frozenset()))
        elif fstype == "cgroup":
            out.append(CgroupMount(fields[3], fields[4], frozenset(
                o for o in options if o in known or o.startswith("name="))))
    return out


def cgroup_targets(proc_cgroup: str, mounts: list[CgroupMount]) -> list[Path]:
    """The ``cgroup.procs`` files that put a process where ``/proc/<pid>/cgroup`` says."""
    targets = []
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hid or not path:
            continue
        wanted = frozenset(controllers.split(",")) if controllers else frozenset()
        for m in mounts:
            if m.controllers != wanted or not (path == m.root or path.startswith(
                    m.root.rstrip("/") + "/") or m.root == "/"):
                continue
            rel = path[len(m.root):] if m.root != "/" else path
            targets.append(Path(m.point) / rel.lstrip("/") / "cgroup.procs")
            break
    return targets


def _umask_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise ContextError(f"/proc/{pid}/status has no Umask line")


def renice(value: int) -> None:
    """Give every thread of this process nice ``value``: on Linux a nice value belongs to a
    thread (``setpriority(PRIO_PROCESS, 0)`` changes only the caller), and a spare has a
    worker thread started ahead of time."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, int(tid), value)


def adopt(pid: int, environ: Mapping[str, str], cwd: str) -> None:
    """Make this process look like a child of ``pid`` that was given ``environ`` and ``cwd``."""
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise ContextError(f"working directory {cwd}: {exc.strerror}") from exc
    os.environ.clear()
    os.environ.update(environ)
    try:
        os.umask(_umask_of(pid))
        for rlimit in _RLIMITS:
            resource.setrlimit(rlimit, resource.prlimit(pid, rlimit))
        score = Path(f"/proc/{pid}/oom_score_adj").read_text().strip()
        Path("/proc/self/oom_score_adj").write_text(score)
        renice(os.getpriority(os.PRIO_PROCESS, pid))
    except (OSError, ValueError) as exc:
        raise ContextError(f"cannot take over the context of process {pid}: {exc}") from exc
    try:
        wanted = Path(f"/proc/{pid}/cgroup").read_text()
        ours = set(Path("/proc/self/cgroup").read_text().splitlines())
        moves = "\n".join(line for line in wanted.splitlines() if line not in ours)
        if not moves:  # the common case: the server runs where containerd does
            return
        mounts = cgroup_mounts(Path("/proc/self/mountinfo").read_text(),
                               known_controllers(Path("/proc/cgroups").read_text()))
    except OSError as exc:
        log.warning("cgroups of process %d unknown: %s", pid, exc)
        return
    for procs in cgroup_targets(moves, mounts):
        try:
            procs.write_text(str(os.getpid()))
        except OSError as exc:
            log.warning("cannot join cgroup %s: %s", procs.parent, exc.strerror)
