"""Where a container's start spends its time: ``bench_shim --quick`` under the kernel's tracer.

    .venv/bin/python -m tests.bench.trace_start [--runs 10] [--keep TRACE_FILE]

Not a benchmark of its own (``python -m tests.bench`` does not run it) but the instrument
behind the breakdowns in docs/benchmarks.md: it turns on tracefs events — process exec and
exit, every context switch, user page faults — runs ``bench_shim --quick`` with
``KATA_IPU_BENCH_MARK`` pointing at ``trace_marker`` (bench_shim names each measured run
there), and prints per variant the medians of four phases of ``ctr run``:

    A  ctr's exec -> the shim's exec (containerd: container, snapshot, bundle)
    B  the shim's exec -> runc's first exec (``start``, Create up to runc create)
    C  runc create (-> its exit)
    D  runc create's exit -> the container's ``/bin/sh``

then the CPU (ms) each process name used within B, and the copy-on-write page faults (write to
a present page, error code 0x7) of kata-ipu's processes within B. The trace's own cost is on
every variant alike; its absolute times are not the benchmark's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("sched/sched_process_exec", "sched/sched_process_exit", "sched/sched_switch",
          "exceptions/page_fault_user")
LINE = re.compile(r"\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+\S+\s+(?P<t>[\d.]+): "
                  r"(?P<event>\w+): (?P<rest>.*)")
SWITCH = re.compile(r"prev_comm=(?P<pc>.+?) prev_pid=(?P<pp>\d+) .*==> "
                    r"next_comm=(?P<nc>.+?) next_pid=(?P<np>\d+)")
PHASES = (("A ctr -> shim", "ctr", "shim"), ("B shim -> runc create", "shim", "runc"),
          ("C runc create", "runc", "runc_exit"), ("D -> container's sh", "runc_exit", "sh"))


@dataclass
class Run:
    variant: str
    ctr: float
    shim: float | None = None
    runc: float | None = None
    runc_exit: float | None = None
    sh: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    cow_faults: int = 0

    def complete(self) -> bool:
        return None not in (self.shim, self.runc, self.runc_exit, self.sh)

    def at(self, name: str) -> float:
        value = getattr(self, name)
        assert isinstance(value, float)
        return value


@contextlib.contextmanager
def tracing(buffer_kb: int = 131072) -> Iterator[Path]:
    """The events on, into a fresh buffer; everything as it was afterwards."""
    if not (TRACEFS / "trace_marker").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    saved_kb = (TRACEFS / "buffer_size_kb").read_text().strip()
    saved_clock = re.search(r"\[(\w+)\]", (TRACEFS / "trace_clock").read_text())
    (TRACEFS / "tracing_on").write_text("0")
    (TRACEFS / "buffer_size_kb").write_text(str(buffer_kb))
    (TRACEFS / "trace_clock").write_text("mono")
    (TRACEFS / "trace").write_text("")
    for event in EVENTS:
        (TRACEFS / "events" / event / "enable").write_text("1")
    (TRACEFS / "tracing_on").write_text("1")
    try:
        yield TRACEFS / "trace_marker"
    finally:
        (TRACEFS / "tracing_on").write_text("0")
        for event in EVENTS:
            (TRACEFS / "events" / event / "enable").write_text("0")
        (TRACEFS / "buffer_size_kb").write_text(saved_kb)
        if saved_clock:
            (TRACEFS / "trace_clock").write_text(saved_clock.group(1))


def parse(lines: Iterator[str]) -> list[Run]:
    """Runs from a trace: each measured run begins at the first ``ctr`` exec after its
    bench_shim marker; its shim is the first shim binary exec'd after that."""
    runs: list[Run] = []
    variant: str | None = None
    current: Run | None = None
    last: dict[str, tuple[float, str, str]] = {}  # cpu -> since when, comm, pid running
    for line in lines:
        m = LINE.match(line)
        if m is None:
            continue
        t, event, rest = float(m["t"]), m["event"], m["rest"]
        if event == "tracing_mark_write" and rest.startswith("kipu-bench "):
            variant = rest.removeprefix("kipu-bench ").strip()
        elif event == "sched_process_exec":
            name = rest.split("filename=", 1)[1].split()[0]
            if name.endswith("/ctr") and variant is not None:
                current = Run(variant, t)
                runs.append(current)
                variant = None
            elif current is not None:
                _exec_step(current, name, t)
        elif (event == "sched_process_exit" and current is not None
              and current.runc is not None and current.runc_exit is None
              and "comm=runc " in rest and "group_dead=true" in rest):
            current.runc_exit = t  # runc create's last thread (runc init is runc:[...])
        elif event == "page_fault_user" and current is not None and current.shim is not None \
                and current.runc is None and m["comm"].startswith("kata-ipu-") \
                and "error_code=0x7" in rest:
            current.cow_faults += 1
        elif event == "sched_switch":
            _switch_step(current, last, m["cpu"], t, rest)
    return [r for r in runs if r.complete()]


def _exec_step(current: Run, name: str, t: float) -> None:
    """An exec during ``current``: the shim, then runc, then (after runc exits) the shell."""
    if current.shim is None and "containerd-shim-" in name:
        current.shim = t
    elif current.shim is not None and current.runc is None and name.endswith("/runc"):
        current.runc = t
    elif current.runc_exit is not None and current.sh is None and name == "/bin/sh":
        current.sh = t


def _switch_step(current: Run | None, last: dict[str, tuple[float, str, str]], cpu: str,
                 t: float, rest: str) -> None:
    """A context switch on ``cpu``: charge the task switched out to ``current`` for its time
    between the shim's exec and runc's, and remember who runs now."""
    s = SWITCH.search(rest)
    if s is None:
        return
    if current is not None and cpu in last and current.shim is not None:
        since, comm, pid = last[cpu]
        end = t if current.runc is None else min(t, current.runc)
        if pid != "0" and end > max(since, current.shim):
            current.cpu[comm] = (current.cpu.get(comm, 0.0)
                                 + (end - max(since, current.shim)) * 1000)
    last[cpu] = (t, s["nc"], s["np"])


def label(variant: str) -> str:
    """bench_shim's row name, short: "io.containerd.runc.v2", "kata-ipu.v2"..."""
    return variant.removeprefix("warm: ").split(" (")[0].split(",")[0]


def report(runs: list[Run]) -> None:
    by: dict[str, list[Run]] = collections.defaultdict(list)
    for r in sorted(runs, key=lambda r: ("runc.v2 (" not in r.variant, r.variant)):
        by[label(r.variant)].append(r)
    print(f"{'phase (median ms)':<24}" + "".join(f"{v:>26}" for v in by)
          + f"   (runs: {', '.join(str(len(rs)) for rs in by.values())})")
    for name, start, end in PHASES:
        print(f"{name:<24}" + "".join(
            f"{statistics.median((r.at(end) - r.at(start)) * 1000 for r in rs):>26.1f}"
            for rs in by.values()))
    print("CPU within B (median ms per process name; >= 0.3):")
    for variant, rs in by.items():
        names = {c for r in rs for c in r.cpu}
        used = sorted(((statistics.median(r.cpu.get(c, 0.0) for r in rs), c) for c in names),
                      reverse=True)
        print(f"  {variant}: " + ", ".join(f"{c} {ms:.1f}" for ms, c in used if ms >= 0.3))
    print("copy-on-write faults of kata-ipu processes within B (median): " + ", ".join(
        f"{v} {statistics.median(r.cow_faults for r in rs):.0f}" for v, rs in by.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trace_start")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--keep", type=Path, default=None, help="also write the raw trace here")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("trace_start: needs root (tracefs, and bench_shim's containerd)")
        return 1
    with tracing() as marker:
        bench = subprocess.run(
            [sys.executable, "-m", "tests.bench.bench_shim", "--quick", "--runs", str(a.runs)],
            env={**os.environ, "KATA_IPU_BENCH_MARK": str(marker)}, check=False)
        (TRACEFS / "tracing_on").write_text("0")
        with open(TRACEFS / "trace", encoding="utf-8", errors="replace") as trace:
            text = trace.read()
    if a.keep is not None:
        a.keep.write_text(text)
    if bench.returncode != 0:
        return bench.returncode
    runs = parse(iter(text.splitlines()))
    if not runs:
        print("trace_start: no complete run in the trace (buffer too small?)")
        return 1
    report(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
