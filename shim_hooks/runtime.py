"""``kata-ipu-runtime``: a runc-compatible OCI runtime that gives containers an IPU rootfs.

Set it as the runc shim's ``BinaryName`` (``ctr run --runtime io.containerd.runc.v2
--runc-binary kata-ipu-runtime``, or ``options.BinaryName`` of a CRI handler). It accepts
runc's command line as containerd's go-runc writes it and:

``create``
    Finds the image: the one the container's snapshot stacks on when the runc shim mounted a
    lower of the ipu snapshotter at ``<bundle>/rootfs`` (by digest), else the bundle's
    annotations (:mod:`shim_hooks.bundle`). Asks kata-ipud to ``Prepare`` the image's
    rootfs, mounts the block device at ``<bundle>/kata-ipu-rootfs``, points ``root.path``
    there, records the volume (in the bundle and in ``state_dir``) and runs ``runc create``
    with the unchanged argv. If runc fails, the mount and the volume are undone.
``delete``
    Runs ``runc delete``; once the container is gone, unmounts and releases its volume.
everything else
    ``exec``s runc with the unchanged argv: stdio, exit codes, signals and error text are runc's.

Every runc command goes through here, so only ``create`` and ``delete`` of an IPU container
load the ttrpc client (asyncio, protobuf); everything else execs runc after a few light imports.

Its own failures are written as ``{"level":"error","msg":...}`` JSON lines to ``--log`` (the
shim reports the last one), and on stderr; the exit code is then 1. A CRI sandbox container,
and a CRI container whose image was unpacked on the host, is left alone; a container without
an image annotation fails unless ``fallback = "passthrough"``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from kata_ipu.errors import KataIpuError
from shim_hooks import bundle as bundles
from shim_hooks import config as shimconfig
from shim_hooks import hostmount
from shim_hooks.runccli import RuncArgs, parse
from shim_hooks.snapshotter import chain as chains

if TYPE_CHECKING:
    from shim_hooks.ipu import Prepared

MOUNTPOINT = "kata-ipu-rootfs"
USAGE = """usage: kata-ipu-runtime [runc global options] COMMAND [options] [ID] [args]

runc-compatible OCI runtime wrapper: swaps the bundle rootfs for a kata-ipu block device, then
runs runc. `create` prepares and mounts the rootfs, `delete` unmounts and releases it; every
other command is handed to runc unchanged (see `runc --help`).

configuration: /etc/kata-ipu/shim.toml ($KATA_IPU_SHIM_CONFIG), $KATA_IPU_ADDRESS
"""


class RuntimeLog:
    """runc-style JSON lines in the ``--log`` file (``level``, ``msg``, ``time``)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, level: str, msg: str, **fields: object) -> None:
        line = json.dumps({"level": level, "msg": msg,
                           "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           **fields}, default=str)
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass
        if level == "error":
            print(f"kata-ipu-runtime: {msg}", file=sys.stderr)


def _exec_runc(runc: str, args: RuncArgs) -> NoReturn:
    os.execvp(runc, [runc, *args.argv])


def _state_file(cfg: shimconfig.ShimConfig, root: str, cid: str) -> Path:
    digest = hashlib.sha256(f"{os.path.abspath(root)}\0{cid}".encode()).hexdigest()[:32]
    return Path(cfg.state_dir) / f"{digest}.json"


def _volume_key(root: str, cid: str) -> str:
    # go-runc's root is <runc root>/<containerd namespace>: keep the namespace in the key.
    return bundles.volume_key(Path(root).name, cid)


def _prepare(cfg: shimconfig.ShimConfig, key: str, image: str, export: str,
             root: str, layers: int) -> Prepared:
    import asyncio  # noqa: PLC0415 - only IPU containers pay for the ttrpc client

    from shim_hooks import ipu  # noqa: PLC0415

    return asyncio.run(ipu.prepare(cfg.address, key, image, export, {"runc.root": root},
                                   cfg.timeout, layers=layers))


def _release(address: str, key: str) -> None:
    import asyncio  # noqa: PLC0415 - only IPU containers pay for the ttrpc client

    from shim_hooks import ipu  # noqa: PLC0415

    asyncio.run(ipu.release(address, key))


def create(args: RuncArgs, cfg: shimconfig.ShimConfig, rlog: RuntimeLog) -> int:
    cid = args.container_id
    if not cid:
        _exec_runc(cfg.runc, args)  # let runc report the usage error
    bundle = Path(args.bundle or os.getcwd()).resolve()
    spec = bundles.read_spec(bundle)
    chain = None
    if cfg.snapshotter_root:  # the runc shim mounted the snapshot at <bundle>/rootfs
        rootfs = chains.mounted_at(bundle / "rootfs")
        chain = chains.image_of_mounts(Path(cfg.snapshotter_root),
                                       [rootfs] if rootfs is not None else [])
    plan = bundles.plan(spec, cfg.export, chain)
    if plan.image is None:
        if plan.keep or cfg.fallback == "passthrough":
            _exec_runc(cfg.runc, args)
        raise bundles.NoImage(f"container {cid} has {plan.reason}: the IPU cannot prepare "
                              "its rootfs")
    key = _volume_key(args.root, cid)
    try:
        prepared = _prepare(cfg, key, plan.image, plan.export, args.root, plan.layers)
    except KataIpuError as exc:
        if cfg.fallback == "passthrough":
            rlog.write("warning", f"IPU rootfs unavailable, keeping the bundle's: {exc}")
            _exec_runc(cfg.runc, args)
        raise
    target = bundle / MOUNTPOINT
    state = _state_file(cfg, args.root, cid)
    record = {**prepared.record(), "address": cfg.address, "bundle": str(bundle),
              "mountpoint": str(target)}
    try:
        target.mkdir(exist_ok=True)
        hostmount.mount_clone(prepared.path, target, prepared.fstype, prepared.options)
        record["root_path"] = bundles.set_root_path(bundle, str(target))
        state.parent.mkdir(parents=True, exist_ok=True)
        bundles.write_json(state, record)
        bundles.write_json(bundle / bundles.VOLUME_RECORD, record)
        rlog.write("info", "rootfs prepared", container_id=cid, device=prepared.path,
                   image=prepared.image, cold=prepared.cold)
        rc = subprocess.run([cfg.runc, *args.argv], check=False).returncode
    except BaseException:
        _undo(cfg, record, state, rlog)
        raise
    if rc != 0:
        _undo(cfg, record, state, rlog)
    return rc


def _undo(cfg: shimconfig.ShimConfig, record: dict[str, object], state: Path,
          rlog: RuntimeLog) -> None:
    target = Path(str(record["mountpoint"]))
    try:
        hostmount.umount(target)
    except hostmount.MountError as exc:
        rlog.write("error", str(exc))
    try:
        target.rmdir()
    except OSError:
        pass
    bundle = Path(str(record["bundle"]))
    if "root_path" in record:
        try:
            bundles.set_root_path(bundle, str(record["root_path"]))
        except KataIpuError:
            pass
    try:
        _release(str(record["address"]), str(record["key"]))
    except KataIpuError as exc:
        rlog.write("error", f"the rootfs volume {record['key']} was not released: {exc}")
        return
    bundles.remove(state)
    bundles.remove(bundle / bundles.VOLUME_RECORD)
    rlog.write("info", "rootfs released", key=record["key"])


def _container_exists(cfg: shimconfig.ShimConfig, args: RuncArgs, cid: str) -> bool:
    argv = [cfg.runc, *(f"--{k}={v}" for k, v in args.globals.items() if k == "root"),
            "state", cid]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def delete(args: RuncArgs, cfg: shimconfig.ShimConfig, rlog: RuntimeLog) -> int:
    cid = args.container_id
    if not cid:
        _exec_runc(cfg.runc, args)
    state = _state_file(cfg, args.root, cid)
    record = bundles.read_json(state)
    if record is None:
        _exec_runc(cfg.runc, args)
    rc = subprocess.run([cfg.runc, *args.argv], check=False).returncode
    if rc != 0 and _container_exists(cfg, args, cid):
        return rc  # still there (e.g. running without --force): keep its rootfs
    _undo(cfg, record, state, rlog)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw in (["--help"], ["-h"]):
        sys.stdout.write(USAGE)
        return 0
    args = parse(raw)
    rlog = RuntimeLog(args.log)
    try:
        cfg = shimconfig.load()
        if args.command == "create":
            return create(args, cfg, rlog)
        if args.command == "delete":
            return delete(args, cfg, rlog)
        _exec_runc(cfg.runc, args)
    except (KataIpuError, OSError) as exc:
        rlog.write("error", str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
