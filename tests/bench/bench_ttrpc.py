"""ttrpc unary round trip, 1 KiB payload, unix socket: kata-ipu's Python ttrpc vs Go ttrpc.

Each side's server runs in its own process and its client in another, so the two cores are
used the same way for both. Prints median/p99 RTT of sequential calls and calls/s with 64
calls in flight on one connection, plus the cross pairs (Py client -> Go server, Go client
-> Py server) and the ratios against Go.

    .venv/bin/python -m tests.bench.bench_ttrpc [--n 5000] [--inflight 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from kata_ipu.ttrpc import CallContext, Client, Server
from tests.support.gopeer import build_goecho

SERVICE = "test.echo.v1.Echo"


def _bytes_value(data: bytes) -> bytes:
    # google.protobuf.BytesValue{value=1}: the Go peer's "Bytes" method echoes it back.
    n = len(data)
    length = bytearray()
    while n >= 0x80:
        length.append((n & 0x7F) | 0x80)
        n >>= 7
    length.append(n)
    return b"\x0a" + bytes(length) + data


async def _serve(path: str, eager: bool) -> None:
    async def echo(ctx: CallContext, payload: bytes) -> bytes:
        return payload

    server = Server()
    server.register(SERVICE, {"Bytes": echo}, eager=eager)
    await server.listen(path)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _py_client(path: str, n: int, inflight: int, size: int) -> dict[str, float]:
    payload = _bytes_value(b"\x00" * size)
    async with await Client.connect(path) as c:
        for _ in range(200):  # warm-up
            await c.call(SERVICE, "Bytes", payload)
        rtts = []
        for _ in range(n):
            t = time.perf_counter()
            await c.call(SERVICE, "Bytes", payload)
            rtts.append((time.perf_counter() - t) * 1e6)
        rtts.sort()
        total = n * 4
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await c.call(SERVICE, "Bytes", payload)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - start
    return {"median_rtt_us": statistics.median(rtts), "p99_rtt_us": rtts[len(rtts) * 99 // 100],
            "calls_per_s": total / elapsed}


def _start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"{argv[0]} did not start: {line!r}")
    return proc


def run(n: int, inflight: int, size: int, rounds: int
        ) -> list[tuple[str, dict[str, float]]]:
    goecho = str(build_goecho())
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ttrpc-") as tmp:
        go_sock, py_sock = os.path.join(tmp, "go.sock"), os.path.join(tmp, "py.sock")
        task_sock = os.path.join(tmp, "py-task.sock")
        go_srv = _start([goecho, "server", "-socket", go_sock])
        py_srv = _start([sys.executable, "-m", "tests.bench.bench_ttrpc", "serve", py_sock,
                         "eager"])
        task_srv = _start([sys.executable, "-m", "tests.bench.bench_ttrpc", "serve", task_sock,
                           "task"])
        try:
            def go_client(sock: str) -> dict[str, float]:
                out = subprocess.run([goecho, "bench", "-socket", sock, "-n", str(n),
                                      "-inflight", str(inflight), "-size", str(size)],
                                     capture_output=True, text=True, check=True)
                result: dict[str, float] = json.loads(out.stdout)
                return result

            pairs = [
                ("Go client   -> Go server", lambda: go_client(go_sock)),
                ("Py client   -> Py server",
                 lambda: asyncio.run(_py_client(py_sock, n, inflight, size))),
                ("  same, task-per-call srv",
                 lambda: asyncio.run(_py_client(task_sock, n, inflight, size))),
                ("Py client   -> Go server",
                 lambda: asyncio.run(_py_client(go_sock, n, inflight, size))),
                ("Go client   -> Py server", lambda: go_client(py_sock)),
            ]
            # Interleave the pairs over several rounds and keep each metric's median, so a
            # noisy neighbour hurts every pair alike instead of one.
            samples: dict[str, list[dict[str, float]]] = {name: [] for name, _ in pairs}
            for _ in range(rounds):
                for name, fn in pairs:
                    samples[name].append(fn())
            for name, _ in pairs:
                rows.append((name, {k: statistics.median(r[k] for r in samples[name])
                                    for k in samples[name][0]}))
        finally:
            for proc in (go_srv, py_srv, task_srv):
                proc.kill()
                proc.wait()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        asyncio.run(_serve(args[1], args[2] == "eager"))
        return 0
    p = argparse.ArgumentParser(prog="bench_ttrpc")
    p.add_argument("--n", type=int, default=3000, help="sequential calls (x4 for throughput)")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    opts = p.parse_args(args)
    rows = run(opts.n, opts.inflight, opts.size, opts.rounds)
    go = rows[0][1]
    print(f"ttrpc unary, {opts.size} B payload, unix socket, {opts.n} sequential calls, "
          f"{opts.n * 4} calls at {opts.inflight} in flight, median of {opts.rounds} "
          f"interleaved rounds; {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"{'pair':<26}{'median RTT µs':>14}{'p99 µs':>9}{'calls/s':>10}"
          f"{'RTT vs Go':>11}{'calls/s vs Go':>15}")
    for name, r in rows:
        print(f"{name:<26}{r['median_rtt_us']:>14.1f}{r['p99_rtt_us']:>9.1f}"
              f"{r['calls_per_s']:>10.0f}{r['median_rtt_us'] / go['median_rtt_us']:>10.2f}x"
              f"{r['calls_per_s'] / go['calls_per_s']:>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
