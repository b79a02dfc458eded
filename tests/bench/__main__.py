"""Run every benchmark in tests/bench (``tox -e bench``): ``python -m tests.bench [names]``.

Each ``bench_*.py`` module has ``main(argv)``; it is called with no arguments (its defaults)
and prints its own side-by-side table.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    wanted = set(sys.argv[1:])
    here = Path(__file__).parent
    status = 0
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if not info.name.startswith("bench_") or (wanted and info.name not in wanted):
            continue
        print(f"\n=== {info.name} ===", flush=True)
        module = importlib.import_module(f"tests.bench.{info.name}")
        entry = module.main
        takes_argv = bool(inspect.signature(entry).parameters)
        saved = sys.argv
        sys.argv = [info.name]
        try:
            rc = entry([]) if takes_argv else entry()
        finally:
            sys.argv = saved
        status |= int(rc or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
