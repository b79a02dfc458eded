"""A worker process for the crash tests: opens a pool and clones volumes until it is killed.

``python -m tests.root.block_worker ROOT RUN_DIR BASE PREFIX COUNT [CRASH_ID [STAGE]]``:
clones ``PREFIX0..PREFIX{COUNT-1}`` of ``BASE``, printing each id when done; with ``CRASH_ID``
it then clones that id (STAGE ``clone``, the default) or clones and exports it as a host block
device (STAGE ``export``) and SIGKILLs itself between the data change and the record that
would commit it.

``python -m tests.root.block_worker churn ROOT RUN_DIR BASE PREFIX COUNT SEED``: races
clone/export/destroy of ``PREFIX0..`` against other processes doing the same.
"""

from __future__ import annotations

import os
import random
import signal
import sys

from kata_ipu.block import ExportKind, VolumeNotFound, open_pool


def churn(root: str, run_dir: str, base: str, prefix: str, count: int, seed: int) -> None:
    """Clone, export and destroy ``PREFIX0..`` in a shuffled order, racing other churners."""
    target = open_pool(root, run_dir=run_dir)
    ops = [(op, f"{prefix}{i}") for i in range(count) for op in ("clone", "export", "destroy")]
    random.Random(seed).shuffle(ops)
    for op, vid in ops:
        try:
            if op == "clone":
                target.clone(base, vid)
            elif op == "export":
                target.export(vid, ExportKind.HOST_BLOCK)
            else:
                target.destroy(vid, missing_ok=True)
        except VolumeNotFound:
            pass
    print("done", flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "churn":
        churn(*argv[1:5], int(argv[5]), int(argv[6]))
        return
    root, run_dir, base, prefix, count = argv[:5]
    crash_id = argv[5] if len(argv) > 5 else None
    crash_stage = argv[6] if len(argv) > 6 else "clone"
    target = open_pool(root, run_dir=run_dir)

    def die_midway(stage: str, volume_id: str) -> None:
        if volume_id == crash_id and stage == crash_stage:
            os.kill(os.getpid(), signal.SIGKILL)

    target._crash_point = die_midway  # type: ignore[method-assign]
    print("ready", flush=True)
    for i in range(int(count)):
        target.clone(base, f"{prefix}{i}")
        print(f"{prefix}{i}", flush=True)
    if crash_id:
        vol = target.clone(base, crash_id)
        target.export(vol, ExportKind.HOST_BLOCK)


if __name__ == "__main__":
    main(sys.argv[1:])
