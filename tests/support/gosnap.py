"""containerd's own snapshotter conformance suite, run as an independent oracle.

``gosnapsuite/suite_test.go`` wraps ``testsuite.SnapshotterSuite`` from Debian's containerd
1.6.20 sources (package ``golang-github-containerd-containerd-dev``) in one Go test,
``TestSnapshotterSuite``, whose 21 sub-tests are the suite's. :func:`build_snapshot_suite`
compiles it with ``go test -c`` (GO111MODULE=off, GOPATH=/usr/share/gocode) and caches the
binary under the test cache by a hash of the Go source, the Go version and the containerd
sources' package version; a miss just rebuilds (about 35 s cold on 2 cores, 2 s with a warm Go
build cache), so the cache is never required.

:func:`run_snapshot_suite` runs the binary in one of two modes:

* proxy mode (``command``): every sub-test starts ``command`` (``{root}`` and ``{socket}`` in
  its arguments replaced by the sub-test's fresh root directory and a unix socket inside it),
  waits up to 20 s for the socket to accept a gRPC connection, drives it through containerd's
  ``snapshots/proxy`` client, then sends SIGTERM; a non-zero exit (or death by the signal) fails
  the sub-test.
* containerd mode (``containerd_socket``): the suite goes through a running containerd's
  snapshot service (its metadata layer over ``snapshotter``), as containerd's integration test
  ``TestSnapshotterClient`` does.

The sub-tests mount and unmount the returned mounts themselves, so the suite needs root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.cache import cache_dir, locked

SOURCE_DIR = Path(__file__).with_name("gosnapsuite")
SOURCE = SOURCE_DIR / "suite_test.go"
GOCODE = "/usr/share/gocode"
CONTAINERD_DEV = "golang-github-containerd-containerd-dev"
TOP_TEST = "TestSnapshotterSuite"
_MODE_VARS = ("KIPU_SNAP_CMD", "KIPU_SNAP_CONTAINERD", "KIPU_SNAP_SNAPSHOTTER",
              "KIPU_SNAP_NAMESPACE")

_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(", re.MULTILINE)


@dataclass(frozen=True)
class SuiteResult:
    """Outcome of one suite run.

    ``passed``/``failed``/``skipped`` hold sub-test names without the ``TestSnapshotterSuite/``
    prefix (``"Basic"``, ``"128LayersMount"``...), in the order they finished. The top-level
    test appears in ``failed`` only if it failed on its own (no sub-test failed), e.g. for a bad
    configuration. ``output`` is the binary's combined stdout and stderr, ``seconds`` the wall
    time of the run, ``returncode`` the binary's exit status (non-zero for any failure, 2 for a
    panic or ``-test.timeout``).
    """

    passed: tuple[str, ...]
    failed: tuple[str, ...]
    skipped: tuple[str, ...]
    output: str
    seconds: float
    returncode: int = 0

    @property
    def ok(self) -> bool:
        """True when the binary exited 0 and no sub-test failed."""
        return self.returncode == 0 and not self.failed


def parse_results(output: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The (passed, failed, skipped) sub-test names in ``go test -v`` output."""
    buckets: dict[str, list[str]] = {"PASS": [], "FAIL": [], "SKIP": []}
    top_failed = False
    prefix = TOP_TEST + "/"
    for verdict, name in _RESULT.findall(output):
        if name == TOP_TEST:
            top_failed = top_failed or verdict == "FAIL"
        elif name.startswith(prefix):
            buckets[verdict].append(name[len(prefix):])
    if top_failed and not buckets["FAIL"]:
        buckets["FAIL"].append(TOP_TEST)
    return tuple(buckets["PASS"]), tuple(buckets["FAIL"]), tuple(buckets["SKIP"])


def _go_env() -> dict[str, str]:
    return dict(os.environ, GO111MODULE="off", GOPATH=GOCODE, GOFLAGS="",
                GOCACHE=str(cache_dir("go-build")))


def _cache_key() -> str:
    go_version = subprocess.run(["go", "version"], capture_output=True, text=True,
                                check=True).stdout.strip()
    try:
        sources = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", CONTAINERD_DEV],
                                 capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:  # not Debian: the Go source and Go version still key it
        sources = ""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), go_version.encode(), sources.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def build_snapshot_suite() -> Path:
    """Return the path of the built suite binary, building it with ``go test -c`` if needed.

    Raises :class:`FileNotFoundError` when containerd's Go sources are not installed and
    :class:`RuntimeError` (with the compiler's output) when the build fails.
    """
    if not Path(GOCODE, "src/github.com/containerd/containerd/snapshots/testsuite").is_dir():
        raise FileNotFoundError(f"containerd's Go sources missing: install {CONTAINERD_DEV}")
    target = cache_dir() / f"gosnapsuite-{_cache_key()}.test"
    if target.exists():
        return target
    with locked(cache_dir() / "gosnapsuite.lock"):
        if target.exists():  # built by a concurrent process while we waited
            return target
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        res = subprocess.run(["go", "test", "-c", "-o", str(tmp), "."], cwd=SOURCE_DIR,
                             env=_go_env(), capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"go test -c failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        tmp.replace(target)
    return target


def run_snapshot_suite(*, command: Sequence[str] | None = None,
                       containerd_socket: Path | None = None, snapshotter: str = "overlayfs",
                       namespace: str = "testsuite", run: str | None = None,
                       timeout: float = 600) -> SuiteResult:
    """Run containerd's snapshotter suite against a snapshotter and parse the verdicts.

    Exactly one of ``command`` (proxy mode: argv of the snapshotter under test, with
    ``{root}``/``{socket}`` placeholders) and ``containerd_socket`` (containerd mode) must be
    given. ``snapshotter`` is the name in every request (containerd mode: which of containerd's
    snapshotters). ``namespace`` is the containerd namespace of every call (the suite's own is
    ``testsuite``; in containerd mode use a fresh one per run, because several sub-tests leave
    their snapshots behind, labelled as GC roots, under fixed names). ``run`` is a Go regular
    expression selecting sub-tests by name (``"^(Basic|Walk)$"``). ``timeout`` bounds the whole
    run (passed to the binary as ``-test.timeout``, which then panics with a goroutine dump).
    """
    if (command is None) == (containerd_socket is None):
        raise ValueError("give exactly one of command (proxy mode) and containerd_socket")
    if command is not None and not command:
        raise ValueError("command must not be empty")
    binary = build_snapshot_suite()
    # KIPU_SNAP_START_TIMEOUT / KIPU_SNAP_STOP_TIMEOUT pass through from the environment.
    env = {k: v for k, v in os.environ.items() if k not in _MODE_VARS}
    env.update(KIPU_SNAP_SNAPSHOTTER=snapshotter, KIPU_SNAP_NAMESPACE=namespace)
    if command is not None:
        env["KIPU_SNAP_CMD"] = json.dumps(list(command))
    else:
        env["KIPU_SNAP_CONTAINERD"] = str(containerd_socket)
    argv = [str(binary), "-test.v", f"-test.timeout={max(1, int(timeout))}s"]
    argv.append(f"-test.run=^{TOP_TEST}$" + (f"/{run}" if run else ""))
    start = time.monotonic()
    # Own session, so that a timeout kills the suite and every snapshotter it started.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        text = out.decode(errors="replace")
        raise TimeoutError(f"snapshot suite still running after {timeout + 30}s:\n"
                           f"{text[-5000:]}") from None
    seconds = time.monotonic() - start
    output = out.decode(errors="replace")
    passed, failed, skipped = parse_results(output)
    return SuiteResult(passed=passed, failed=failed, skipped=skipped, output=output,
                       seconds=seconds, returncode=proc.returncode)
