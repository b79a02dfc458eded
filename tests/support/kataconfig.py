"""Load a Kata configuration the way Kata's runtimes do, and say what kata-ipu needs from it.

Kata's Go runtime cannot run on these machines (no vhost-vsock, no KVM) and its config loader
cannot be built offline (it pulls in virtcontainers), so this is a model of the steps that
decide what kata-ipu's configs do, each traced to Kata 3.19.1's source:

Go (``src/runtime/pkg/katautils/config.go``):
  1. ``decodeConfig``: ``ResolvePath(configPath)`` follows symlinks (``filepath.EvalSymlinks``),
     so ``config.d`` is looked up beside the *resolved* file.
  2. ``toml.Decode`` of that file.
  3. ``decodeDropIns``: ``os.ReadDir(<dir>/config.d)`` (sorted by name; every entry, whatever
     its suffix; a missing directory is fine), then ``updateFromDropIn`` per file: each key the
     drop-in sets replaces that key's value (the ``hypervisor``/``agent`` maps are merged key
     by key through ``applyKey``, plain tables by the decoder); arrays and strings are
     replaced whole, never appended to.
  4. ``updateRuntimeConfigHypervisor`` → ``newQemuHypervisorConfig``: ``blockDeviceDriver()``
     accepts ``virtio-scsi, virtio-blk, virtio-mmio, nvdimm, virtio-blk-ccw`` ("" means
     ``virtio-scsi``); ``sharedFS()`` defaults to ``virtio-fs``, which needs
     ``virtio_fs_daemon`` ("cannot enable virtio-fs without daemon path in configuration
     file").

runtime-rs (``src/libs/kata-types/src/config/``):
  1. ``TomlConfig::load_raw_from_file``: ``fs::canonicalize`` (symlinks followed, as in Go).
  2. ``drop_in::load``: parse the base file into a ``toml::Value``; ``config.d`` entries sorted
     by file name, each must be a regular file; ``toml_tree_ops::merge``: tables merge
     recursively, any other value is replaced.
  3. ``Hypervisor::validate`` (``hypervisor/mod.rs``): unless ``disable_block_device_use``,
     ``block_device_driver`` must be one of ``virtio-blk-pci, virtio-blk-ccw, virtio-blk-mmio,
     virtio-pmem, virtio-scsi``; and ``adjust_config`` blanks the driver when block devices
     are disabled.

Not modelled: file existence of the hypervisor, kernel and image paths (a test machine has no
``/opt/kata``), annotations, and every check that does not bear on a block-device rootfs.
"""

from __future__ import annotations

import enum
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GO_BLOCK_DRIVERS = ("virtio-scsi", "virtio-blk", "virtio-mmio", "nvdimm", "virtio-blk-ccw")
RS_BLOCK_DRIVERS = ("virtio-blk-pci", "virtio-blk-ccw", "virtio-blk-mmio", "virtio-pmem",
                    "virtio-scsi")
VIRTIO_FS = ("virtio-fs", "virtio-fs-nydus")


class Runtime(enum.Enum):
    GO = "go"
    RUST = "runtime-rs"


class KataConfigError(Exception):
    """Kata itself would refuse this configuration (the message is Kata's, where it has one)."""


@dataclass(frozen=True)
class Loaded:
    """One merged configuration and where it came from."""

    runtime: Runtime
    path: Path                    # the file Kata really read (symlinks resolved)
    drop_ins: tuple[Path, ...]    # in the order Kata applied them
    tree: dict[str, Any]

    def qemu(self) -> dict[str, Any]:
        hypervisor: dict[str, Any] = self.tree.get("hypervisor", {})
        qemu: dict[str, Any] = hypervisor.get("qemu", {})
        return qemu


def _merge(base: dict[str, Any], drop_in: dict[str, Any]) -> None:
    # both runtimes: a table merges into a table, anything else replaces (a drop-in's
    # kernel_params is the whole new string, not an addition)
    for key, value in drop_in.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _parse(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KataConfigError(f"error decoding file {str(path)!r}: {exc}") from exc


def load(config_path: Path, runtime: Runtime) -> Loaded:
    """Read ``config_path`` and its ``config.d`` as ``runtime`` would (module docstring)."""
    resolved = Path(os.path.realpath(config_path))
    if not resolved.is_file():
        raise KataConfigError(f"Cannot find usable config file ({config_path})")
    tree = _parse(resolved)
    dropin_dir = resolved.parent / "config.d"
    applied: list[Path] = []
    if dropin_dir.is_dir():
        for entry in sorted(dropin_dir.iterdir(), key=lambda p: p.name):
            if not entry.is_file():
                raise KataConfigError(
                    f"{entry}: drop-in cfg file can only be a regular file or a symlink")
            _merge(tree, _parse(entry))
            applied.append(entry)
    return Loaded(runtime, resolved, tuple(applied), tree)


def validate(cfg: Loaded) -> None:
    """Raise :class:`KataConfigError` where Kata's own loader would refuse ``cfg``."""
    qemu = cfg.qemu()
    driver = qemu.get("block_device_driver", "")
    if cfg.runtime is Runtime.GO:
        if driver and driver not in GO_BLOCK_DRIVERS:
            raise KataConfigError(
                f"Invalid hypervisor block storage driver {driver} specified "
                f"(supported drivers: {list(GO_BLOCK_DRIVERS)})")
        shared_fs = qemu.get("shared_fs") or "virtio-fs"
        if shared_fs in VIRTIO_FS and not qemu.get("virtio_fs_daemon"):
            raise KataConfigError(
                "cannot enable virtio-fs without daemon path in configuration file")
    elif not qemu.get("disable_block_device_use", False) and driver not in RS_BLOCK_DRIVERS:
        raise KataConfigError(f"{driver} is unsupported block device type.")


def block_rootfs_problems(cfg: Loaded, stock_kernel_params: str) -> list[str]:
    """What stops ``cfg`` from hot-plugging kata-ipu's block rootfs (empty: nothing).

    ``stock_kernel_params`` is Kata's own default (the stock configuration's value); every one
    of its parameters must survive the drop-ins.
    """
    qemu = cfg.qemu()
    problems = []
    if qemu.get("disable_block_device_use", False):  # both runtimes: false when absent
        problems.append("disable_block_device_use is true: the rootfs would be shared over "
                        "virtio-fs, not hot-plugged")
    if qemu.get("machine_type") != "q35":
        problems.append(f"machine_type is {qemu.get('machine_type')!r}: Kata's QEMU hot-plugs "
                        "block devices on q35 only")
    wanted = "virtio-blk" if cfg.runtime is Runtime.GO else "virtio-blk-pci"
    if qemu.get("block_device_driver") != wanted:
        problems.append(f"block_device_driver is {qemu.get('block_device_driver')!r}, not "
                        f"{wanted!r}: the guest finds the disk by its PCI path")
    params = str(qemu.get("kernel_params", "")).split()
    lost = [p for p in stock_kernel_params.split() if p not in params]
    if lost:
        problems.append(f"kernel_params lost Kata's defaults {lost}: a drop-in's kernel_params "
                        "replaces the whole string")
    timeout = [int(m.group(1)) for p in params
               if (m := re.fullmatch(r"agent\.hotplug_timeout=(\d+)", p))]
    if not timeout or timeout[-1] <= 3:
        problems.append("agent.hotplug_timeout is Kata's 3 s default: too short for a hot-plug "
                        "on a busy host")
    return problems
