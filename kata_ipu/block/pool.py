"""Creating and opening pools: ``create_pool`` writes ``<root>/pool.json`` once, ``open_pool``
reads it, mounts what must be mounted and runs recovery, so every handle starts from a state
consistent with what exists on disk and in the kernel."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kata_ipu.block import fsutil, xfspool
from kata_ipu.block.engine import StoreTarget
from kata_ipu.block.errors import PoolNotFound
from kata_ipu.block.filebackend import POOL_CONFIG, POOL_IMAGE, FileTarget
from kata_ipu.block.model import Pool
from kata_ipu.block.qsdbackend import QsdTarget
from kata_ipu.errors import AlreadyExists, InvalidArgument
from kata_ipu.executor import DEFAULT, Executor

BACKENDS: dict[str, type[StoreTarget]] = {"file": FileTarget, "qsd": QsdTarget}
DEFAULT_RUN_ROOT = Path("/run/kata-ipu/block")


def _run_dir(root: Path, run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir
    # unix socket paths are limited to 107 bytes: keep the run directory short
    return DEFAULT_RUN_ROOT / hashlib.sha256(str(root).encode()).hexdigest()[:12]


def create_pool(root: str | os.PathLike[str], *, backend: str = "file", size: int,
                run_dir: str | os.PathLike[str] | None = None,
                executor: Executor = DEFAULT) -> StoreTarget:
    """Create a pool of ``size`` bytes under ``root`` (idempotent for the same parameters).

    ``file``: if ``root`` supports reflink the pool lives in ``root/data``; otherwise a sparse
    ``root/pool.xfs`` of ``size`` bytes is formatted XFS ``reflink=1`` and loop-mounted on
    ``root/data``. ``qsd``: ``root/data`` on any filesystem, ``size`` is the space budget.
    """
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown block backend {backend!r}; known: {sorted(BACKENDS)}")
    if size <= 0:
        raise InvalidArgument(f"pool size must be positive, not {size}")
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / POOL_CONFIG
    if config_path.exists():
        config = json.loads(config_path.read_text())
        if config["backend"] != backend or config["size"] != size:
            raise AlreadyExists(f"pool at {root} exists with backend {config['backend']!r} "
                                f"and size {config['size']}")
        return open_pool(root, run_dir=run_dir, executor=executor)
    layout = "dir"
    if backend == "file" and not fsutil.supports_reflink(root):
        layout = "xfs-file"
        if (root / POOL_IMAGE).exists():  # a creation interrupted before pool.json
            xfspool.unmount(root / POOL_IMAGE, root / "data", executor)
            fsutil.unlink_quiet(root / POOL_IMAGE)
        xfspool.create(root / POOL_IMAGE, size, executor)
    config = {"backend": backend, "size": size, "layout": layout, "version": 1}
    tmp = root / (POOL_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, sort_keys=True))
    tmp.rename(config_path)
    return open_pool(root, run_dir=run_dir, executor=executor)


def open_pool(root: str | os.PathLike[str], *, run_dir: str | os.PathLike[str] | None = None,
              executor: Executor = DEFAULT) -> StoreTarget:
    """Open an existing pool: mount it if needed, then reconcile it (:meth:`recover`)."""
    root = Path(root).absolute()
    try:
        config = json.loads((root / POOL_CONFIG).read_text())
    except FileNotFoundError as exc:
        raise PoolNotFound(root) from exc
    data = root / "data"
    if config["layout"] == "xfs-file":
        xfspool.mount(root / POOL_IMAGE, data, executor)
    else:
        data.mkdir(exist_ok=True)
    size = config["size"]
    if config["layout"] == "xfs-file":
        size = fsutil.statvfs_space(data)[0]
    pool = Pool(root=root, backend=config["backend"], capacity=size, data_dir=data)
    target = BACKENDS[config["backend"]](
        pool, _run_dir(root, Path(run_dir) if run_dir else None), executor)
    target._prepare_dirs()
    target.recover()
    return target
