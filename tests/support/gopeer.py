"""Build the Go ttrpc reference peer (``goecho``) from Debian's ttrpc v1.1.1 sources.

The binary is cached by the hash of its source under the test cache directory
(``$KATA_IPU_TEST_CACHE``, default ``/var/cache/kata-ipu-tests``); a cache miss just builds it
again (about 5-15 s), so the cache is never required.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from tests.support.cache import cache_dir

SOURCE_DIR = Path(__file__).with_name("goecho")
GOCODE = "/usr/share/gocode"


def build_goecho() -> Path:
    """Return the path of a built goecho binary, building it if needed."""
    digest = hashlib.sha256((SOURCE_DIR / "main.go").read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"goecho-{digest}"
    if target.exists():
        return target
    if not Path(GOCODE, "src/github.com/containerd/ttrpc").is_dir():
        raise FileNotFoundError(
            "Go ttrpc sources missing: install golang-github-containerd-ttrpc-dev"
        )
    with tempfile.TemporaryDirectory(prefix="goecho-") as gopath:
        env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}:{GOCODE}", GOFLAGS="",
                   GOCACHE=str(cache_dir() / "go-build"))
        tmp = target.with_suffix(".tmp")
        subprocess.run(["go", "build", "-o", str(tmp), "."], cwd=SOURCE_DIR, env=env,
                       check=True, capture_output=True)
        tmp.replace(target)
    return target
