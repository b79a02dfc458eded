"""The OCI bundle as the front doors see it: annotations in, records and root.path out.

* :func:`plan` reads ``config.json`` and decides what a container needs from the IPU, with an
  export kind (``io.katacontainers.ipu.export`` overrides the configured one), in this order:

  1. a CRI sandbox (pause) container: nothing, its rootfs is kept;
  2. a rootfs on one lower of the ipu snapshotter (the ``chain`` the caller found,
     :mod:`shim_hooks.snapshotter.chain`): a clone of exactly that image, by digest, and of
     exactly that many of its layers;
  3. ``io.katacontainers.ipu.image``: that image, as the user named it;
  4. ``io.kubernetes.cri.image-name``: that image if it is pinned by digest. A tag is not
     resolved again — containerd resolved it at PullImage, and the tag may point elsewhere
     by now — so the rootfs containerd prepared is kept (``keep``);
  5. nothing names an image: the IPU cannot help (the caller refuses).
* Records are small JSON files in the bundle, written atomically: ``kata-ipu-shim.json`` (which
  delegate shim serves this bundle) and ``kata-ipu-volume.json`` (which IPU volume is the
  container's rootfs). containerd removes the bundle after the shim's ``delete``; the records
  let ``delete`` release what a dead shim held.
* :func:`set_root_path` points ``root.path`` at another directory (the runc wrapper's mount).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_ipu.errors import FailedPrecondition, InvalidArgument
from kata_ipu.osutil import atomicfile
from shim_hooks.snapshotter.chain import ChainImage

IPU_IMAGE = "io.katacontainers.ipu.image"
CRI_IMAGE = "io.kubernetes.cri.image-name"
IMAGE_ANNOTATIONS = (IPU_IMAGE, CRI_IMAGE)
EXPORT_ANNOTATION = "io.katacontainers.ipu.export"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# What the runc and Kata shims group a pod's containers by: one shim per group.
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", SANDBOX_ID)

SHIM_RECORD = "kata-ipu-shim.json"
VOLUME_RECORD = "kata-ipu-volume.json"

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class BundleError(InvalidArgument):
    """The bundle's config.json is missing or malformed."""


class NoImage(FailedPrecondition):
    """The container names no image, so the IPU cannot prepare its rootfs."""


@dataclass(frozen=True, slots=True)
class Plan:
    image: str | None  # None: nothing for the IPU to prepare
    export: str
    reason: str  # why (for the log)
    annotations: dict[str, str]
    layers: int = 0  # the image's first N layers only (0: all)
    keep: bool = False  # image None: keep containerd's rootfs (else: refuse, no image)


def read_spec(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: no OCI config in the bundle") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable OCI config: {exc}") from exc
    if not isinstance(spec, dict):
        raise BundleError(f"{path}: the OCI config is not a JSON object")
    return spec


def spec_annotations(spec: dict[str, Any]) -> dict[str, str]:
    raw = spec.get("annotations") or {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def plan(spec: dict[str, Any], default_export: str, chain: ChainImage | None = None) -> Plan:
    ann = spec_annotations(spec)
    export = ann.get(EXPORT_ANNOTATION) or default_export
    if ann.get(CONTAINER_TYPE) == "sandbox":
        return Plan(None, export, "CRI sandbox (pause) container", ann, keep=True)
    if chain is not None:
        return Plan(chain.reference, export, f"the ipu snapshotter's chain (its first "
                    f"{chain.layers} of {chain.total} layers)", ann, chain.prepare_layers)
    if ann.get(IPU_IMAGE):
        return Plan(ann[IPU_IMAGE], export, f"image from {IPU_IMAGE}", ann)
    cri = ann.get(CRI_IMAGE)
    if cri and "@sha256:" in cri:
        return Plan(cri, export, f"image from {CRI_IMAGE}, pinned by digest", ann)
    if cri:
        return Plan(None, export, f"{CRI_IMAGE} {cri} is not pinned by digest and the rootfs is "
                    "not on the ipu snapshotter's chain (the image was unpacked on the host): "
                    "containerd's rootfs is kept", ann, keep=True)
    return Plan(None, export, "no image annotation "
                f"({' or '.join(IMAGE_ANNOTATIONS)})", ann)


def shim_group(spec: dict[str, Any], container_id: str) -> str:
    """The shim group ``container_id`` belongs to (its own id unless it joins a pod's)."""
    ann = spec_annotations(spec)
    for key in GROUP_ANNOTATIONS:
        if ann.get(key):
            return ann[key]
    return container_id


def volume_key(namespace: str, container_id: str) -> str:
    """The IPU's container id for a containerd (namespace, id): readable when it fits."""
    key = f"{namespace}.{container_id}" if namespace else container_id
    if _KEY.match(key):
        return key
    return "h." + hashlib.sha256(key.encode()).hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a reader sees the old or the new record, never a torn one). Not fsynced:
    the records live as long as the bundle, in containerd's state directory (a tmpfs under
    /run), which a host crash empties anyway; kata-ipud's own recovery handles its side."""
    atomicfile.write_atomic(path, json.dumps(data, sort_keys=True).encode())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def set_root_path(bundle: str | Path, root: str, *, readonly: bool = False) -> str:
    """Point ``root.path`` of the bundle's config.json at ``root`` (and set ``root.readonly``
    if ``readonly``); returns the old path."""
    path = Path(bundle) / "config.json"
    spec = read_spec(bundle)
    old = str((spec.get("root") or {}).get("path", "rootfs"))
    spec.setdefault("root", {})["path"] = root
    if readonly:
        spec["root"]["readonly"] = True
    write_json(path, spec)
    return old
