"""What the OCI hook needs from the runtime: the state JSON on stdin and the bundle's
``config.json``; the disk and fstype come from annotations set by whoever hot-plugged it.

Only the VMM side knows the PCI slot it chose, so only it can set the PCI path: the project's
Kata-semantics driver does (vhost-user-blk roots, which Kata's runtimes take only as volumes).
Kata's own runtime never sets these annotations; it hands the agent a ``Storage`` with the
same PCI path and the agent mounts the disk itself, so the hook has nothing to do there and
skips the container.

Annotations (state ``annotations`` first, then ``config.json``)::

    io.katacontainers.ipu.rootfs.pci-path    Kata PCI path, e.g. 02/01 (required)
    io.katacontainers.ipu.rootfs.fstype      ext4 (default) | erofs | xfs
    io.katacontainers.ipu.rootfs.readonly    "true": read-only disk under an overlay
    io.katacontainers.ipu.rootfs.timeout     seconds to wait for the disk (default 3)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from guest_hooks.device import Locator
from guest_hooks.errors import InvalidArgument, NotAnnotated
from guest_hooks.pcipath import PciPath

PREFIX = "io.katacontainers.ipu.rootfs."
PCI_PATH = PREFIX + "pci-path"
FSTYPE = PREFIX + "fstype"
READONLY = PREFIX + "readonly"
TIMEOUT = PREFIX + "timeout"


@dataclass(frozen=True)
class HookRequest:
    container_id: str
    status: str
    root: str  # absolute container root path
    locator: Locator
    fstype: str
    readonly: bool
    timeout: float


def parse_state(text: str) -> dict[str, Any]:
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"OCI state on stdin is not JSON: {exc}") from exc
    if not isinstance(state, dict):
        raise InvalidArgument("OCI state on stdin is not a JSON object")
    for key in ("id", "bundle"):
        if not isinstance(state.get(key), str) or not state[key]:
            raise InvalidArgument(f"OCI state has no {key!r}")
    return state


def hook_request(state: dict[str, Any]) -> HookRequest:
    """Resolve the container root from the bundle and the disk from annotations."""
    bundle = str(state["bundle"])
    config_path = os.path.join(bundle, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"cannot read {config_path}: {exc}") from exc
    root = (config.get("root") or {}).get("path")
    if not isinstance(root, str) or not root:
        raise InvalidArgument(f"{config_path} has no root.path")
    if not os.path.isabs(root):
        root = os.path.join(bundle, root)
    notes: dict[str, str] = {}
    for source in (config.get("annotations") or {}, state.get("annotations") or {}):
        if isinstance(source, dict):
            notes.update({str(k): str(v) for k, v in source.items()})
    pci = notes.get(PCI_PATH)
    if not pci:
        raise NotAnnotated(f"{PCI_PATH} is not annotated")
    locator = Locator(PciPath.parse(pci))
    try:
        timeout = float(notes.get(TIMEOUT, "3"))
    except ValueError as exc:
        raise InvalidArgument(f"{TIMEOUT}={notes[TIMEOUT]!r} is not a number") from exc
    return HookRequest(str(state["id"]), str(state.get("status", "")), os.path.normpath(root),
                       locator, notes.get(FSTYPE, "ext4"),
                       notes.get(READONLY, "false").lower() == "true", timeout)
