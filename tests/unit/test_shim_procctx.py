"""shim_hooks.procctx: a forked process takes on another process's context.

The oracle is the kernel: the values are read back from /proc of the process that adopted
them, and compared with those of the process it adopted them from.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from shim_hooks import procctx

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 31 0:40 /kubepods /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
"""
KNOWN = frozenset({"cpu", "cpuacct", "memory", "pids", "devices"})


def test_cgroup_v1_and_v2_hierarchies_map_to_their_cgroup_procs() -> None:
    mounts = procctx.cgroup_mounts(MOUNTINFO, KNOWN)
    assert [(m.point, sorted(m.controllers)) for m in mounts] == [
        ("/sys/fs/cgroup/cpu,cpuacct", ["cpu", "cpuacct"]),
        ("/sys/fs/cgroup/memory", ["memory"]),
        ("/sys/fs/cgroup/systemd", ["name=systemd"]),  # "xattr" is a flag, not a controller
        ("/sys/fs/cgroup/unified", []),
        ("/sys/fs/cgroup/pids", ["pids"]),
    ]
    proc_cgroup = ("12:pids:/kubepods/pod1\n4:memory:/system.slice/containerd.service\n"
                   "3:cpu,cpuacct:/system.slice/containerd.service\n"
                   "1:name=systemd:/system.slice/containerd.service\n"
                   "0::/system.slice/containerd.service\n"
                   "7:devices:/unmounted\n")
    assert [str(p) for p in procctx.cgroup_targets(proc_cgroup, mounts)] == [
        "/sys/fs/cgroup/pids/pod1/cgroup.procs",  # mounted from /kubepods
        "/sys/fs/cgroup/memory/system.slice/containerd.service/cgroup.procs",
        "/sys/fs/cgroup/cpu,cpuacct/system.slice/containerd.service/cgroup.procs",
        "/sys/fs/cgroup/systemd/system.slice/containerd.service/cgroup.procs",
        "/sys/fs/cgroup/unified/system.slice/containerd.service/cgroup.procs",
    ]


def test_known_controllers_come_from_proc_cgroups() -> None:
    text = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\nmemory\t4\t90\t1\n"
    assert procctx.known_controllers(text) == {"cpu", "memory"}


_CHILD = r"""
import json, os, resource, sys, threading
from pathlib import Path
from shim_hooks import procctx
pid, cwd = int(sys.argv[1]), sys.argv[2]
done = threading.Event()
worker = threading.Thread(target=done.wait)  # a spare has its worker thread already
worker.start()
procctx.adopt(pid, {"ADOPTED": "yes", "PATH": "/usr/bin"}, cwd)
thread_nice = [int(Path(f"/proc/self/task/{t}/stat").read_text().rpartition(")")[2].split()[16])
               for t in os.listdir("/proc/self/task")]
done.set()
limits = {r: resource.getrlimit(getattr(resource, r)) for r in ("RLIMIT_CORE", "RLIMIT_NOFILE")}
umask = os.umask(0)
print(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                  "limits": limits,
                  "oom": Path("/proc/self/oom_score_adj").read_text().strip(),
                  "nice": os.getpriority(os.PRIO_PROCESS, 0), "thread_nice": thread_nice,
                  "cgroup": Path("/proc/self/cgroup").read_text()}))
"""


def test_adopt_takes_the_callers_cwd_env_umask_rlimits_oom_score_nice_and_cgroups(
        tmp_path: Path) -> None:
    def source_context() -> None:  # the "containerd" side: values nobody has by default
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_CORE, (4096, 8192))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 777), hard))
        Path("/proc/self/oom_score_adj").write_text("321")
        os.setpriority(os.PRIO_PROCESS, 0, 7)

    source = subprocess.Popen(["sleep", "60"], preexec_fn=source_context)  # noqa: PLW1509
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(source.pid), str(tmp_path)],
                             capture_output=True, text=True, check=True, timeout=60)
    finally:
        source.kill()
        source.wait()
    got = json.loads(out.stdout)
    assert got["cwd"] == str(tmp_path)
    assert got["env"] == {"ADOPTED": "yes", "PATH": "/usr/bin"}
    assert got["umask"] == 0o027
    assert got["limits"]["RLIMIT_CORE"] == [4096, 8192]
    assert got["limits"]["RLIMIT_NOFILE"][0] == 777
    assert got["oom"] == "321"
    assert got["nice"] == 7
    assert got["thread_nice"] == [7, 7]  # every thread's: a nice value is per thread
    assert got["cgroup"] == Path(f"/proc/{os.getpid()}/cgroup").read_text()


def test_adopt_names_a_missing_working_directory(tmp_path: Path) -> None:
    code = ("import os; from shim_hooks import procctx\n"
            f"procctx.adopt(os.getppid(), {{}}, {str(tmp_path / 'gone')!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 1
    assert f"working directory {tmp_path / 'gone'}" in out.stderr
