"""What the ipu snapshotter tells the kata-ipu shim proxy on the same host, through files.

The proxy gives a container the IPU's writable clone of exactly the image containerd
resolved, so it must know which image (pinned by digest) and how many of its layers the
container's snapshot stacks on. Two files say it; both are written atomically by the
snapshotter, under its root (root-only), and read by the proxy with the standard library
and the ground floor (``kata_ipu.osutil``) alone (this module is imported on every
container's start path)::

    <root>/lowers/<id>/lower.json     beside the mount point <root>/lowers/<id>/fs: the image
                                      and layer count of that lower. The proxy finds it from
                                      the rootfs mounts in Create (the lowerdir of an overlay,
                                      or the source of a read-only bind): authoritative.
    <root>/hints/<hash>.json          per active/view snapshot that stacks on a lower alone,
                                      keyed by (containerd namespace, snapshot key): for CRI
                                      and ``ctr run`` the key is the container id, so the
                                      proxy can ask the IPU for the clone at ``start``, before
                                      Create brings the mounts. Create checks it.

A rootfs that is not one lower alone (local layers in between, a fallback pull, another
snapshotter) has no image here: the proxy then keeps the host's rootfs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.osutil import atomicfile

LOWER_FILE = "lower.json"
LOWER_SCHEMA = "kata-ipu.snapshotter.lower.v1"
HINT_SCHEMA = "kata-ipu.snapshotter.hint.v1"
LOWERS_DIR = "lowers"
HINTS_DIR = "hints"


@dataclass(frozen=True, slots=True)
class ChainImage:
    """The first ``layers`` of the ``total`` layers of ``reference`` (pinned by digest)."""

    reference: str  # registry/repo@sha256:M
    manifest: str
    layers: int
    total: int

    @property
    def prepare_layers(self) -> int:
        """``PrepareOptions.layers`` for a clone of this chain (0: the whole image)."""
        return 0 if self.layers == self.total else self.layers

    def to_json(self) -> dict[str, object]:
        return {"reference": self.reference, "manifest": self.manifest, "layers": self.layers,
                "total": self.total}

    @classmethod
    def from_json(cls, data: object) -> ChainImage | None:
        if not isinstance(data, dict):
            return None
        try:
            image = cls(str(data["reference"]), str(data["manifest"]), int(data["layers"]),
                        int(data["total"]))
        except (KeyError, TypeError, ValueError):
            return None
        if "@sha256:" not in image.reference or not 0 < image.layers <= image.total:
            return None
        return image


def _write(path: Path, data: dict[str, object]) -> None:
    atomicfile.write_atomic(path, json.dumps(data, sort_keys=True).encode())


def _read(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lower_dir(root: Path, lower_id: int) -> Path:
    return root / LOWERS_DIR / str(lower_id)


def write_lower(directory: Path, image: ChainImage) -> None:
    _write(directory / LOWER_FILE, {"schema": LOWER_SCHEMA, **image.to_json()})


def read_lower(directory: Path) -> ChainImage | None:
    data = _read(directory / LOWER_FILE)
    if data is None or data.get("schema") != LOWER_SCHEMA:
        return None
    return ChainImage.from_json(data)


def _under(root: Path, path: str) -> Path | None:
    """The lower directory ``path`` (``<root>/lowers/<id>/fs``) belongs to, if it does."""
    p = Path(os.path.normpath(path))
    if p.name != "fs" or p.parent.parent != root / LOWERS_DIR or not p.parent.name.isdigit():
        return None
    return p.parent


def image_of_mounts(root: Path, mounts: Iterable[tuple[str, str, tuple[str, ...]]]
                    ) -> ChainImage | None:
    """The image a rootfs of ``(type, source, options)`` mounts stacks on, if it is exactly
    one lower of the snapshotter at ``root``: an overlay whose only lowerdir is a lower, or a
    read-only bind mount of one (a view)."""
    found = list(mounts)
    if len(found) != 1:
        return None
    kind, source, options = found[0]
    directory = None
    if kind == "overlay":
        lowers = [o.removeprefix("lowerdir=") for o in options if o.startswith("lowerdir=")]
        if len(lowers) == 1 and ":" not in lowers[0]:
            directory = _under(root, lowers[0])
    elif kind == "bind" and "ro" in options:
        directory = _under(root, source)
    return read_lower(directory) if directory is not None else None


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace(
        "\\012", "\n").replace("\\134", "\\")


def mounted_at(target: Path) -> tuple[str, str, tuple[str, ...]] | None:
    """(type, source, options) of what is mounted at ``target`` (the kernel's view in
    ``/proc/self/mountinfo``: an overlay's super options carry its lowerdir), or None."""
    want = os.path.realpath(target)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if _unescape(fields[4]) == want:
                    sep = fields.index("-")
                    found = (fields[sep + 1], _unescape(fields[sep + 2]),
                             tuple(fields[sep + 3].split(",")))
    except OSError:
        return None
    return found


def hint_path(root: Path, namespace: str, key: str) -> Path:
    digest = hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()[:40]
    return root / HINTS_DIR / f"{digest}.json"


def write_hint(root: Path, namespace: str, key: str, lower_id: int, image: ChainImage) -> None:
    _write(hint_path(root, namespace, key), {
        "schema": HINT_SCHEMA, "namespace": namespace, "key": key, "lower": lower_id,
        **image.to_json()})


def read_hint(root: Path, namespace: str, key: str) -> ChainImage | None:
    data = _read(hint_path(root, namespace, key))
    if data is None or data.get("schema") != HINT_SCHEMA or data.get("namespace") != namespace \
            or data.get("key") != key:
        return None
    return ChainImage.from_json(data)


def remove_hint(root: Path, namespace: str, key: str) -> None:
    try:
        hint_path(root, namespace, key).unlink()
    except FileNotFoundError:
        pass


def split_backend_key(key: str) -> tuple[str, str] | None:
    """(namespace, key) of a name containerd's metadata layer gave the backend
    (``<namespace>/<n>/<key>``), or None for another shape."""
    namespace, sep, rest = key.partition("/")
    seq, sep2, inner = rest.partition("/")
    if not sep or not sep2 or not seq.isdigit() or not namespace or not inner:
        return None
    return namespace, inner
