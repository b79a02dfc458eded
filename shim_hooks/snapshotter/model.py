"""Typed records of the ipu snapshotter: snapshots, remote images, mounts, usage, errors.

containerd's error classes map to gRPC codes through :mod:`kata_ipu.errors` (NotFound,
AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable...); containerd turns the code
back into its ``errdefs`` class (``errdefs.FromGRPC``), which is what its metadata layer and
unpacker test for (an ALREADY_EXISTS answer to a Prepare is how a remote snapshot is found).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""The chain id a Prepare of an unpack wants committed (containerd ``labelSnapshotRef``)."""
INHERITED_PREFIX = "containerd.io/snapshot/"
"""Labels under this prefix are passed from image descriptors to the snapshotter."""
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER = "containerd.io/snapshot/cri.layer-digest"
CRI_LAYERS = "containerd.io/snapshot/cri.image-layers"
REMOTE_LABEL = "containerd.io/snapshot/kata-ipu.remote"
"""Set on remote snapshots: ``<repo>@<digest> <k>/<n>`` (``ctr snapshot info`` shows it)."""


class Kind(enum.IntEnum):
    """containerd.services.snapshots.v1.Kind."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """What a remote snapshot holds: the first ``layers`` of the ``total`` layers of one
    image, pinned by digest."""

    reference: str  # registry/repo@sha256:M, what the IPU is asked for
    manifest: str   # sha256:M, containerd's manifest digest (as the registry serves it)
    layers: int     # k: this snapshot's chain is the image's first k layers
    total: int      # n: the image's layer count

    def __post_init__(self) -> None:
        if not 0 < self.layers <= self.total:
            raise ValueError(f"layers {self.layers} of {self.total}")

    @property
    def whole(self) -> bool:
        return self.layers == self.total

    def label(self) -> str:
        return f"{self.reference} {self.layers}/{self.total}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One backend snapshot as stored."""

    id: int
    name: str
    kind: Kind
    parent: str  # "" for the first of a chain
    labels: dict[str, str]
    created: float
    updated: float
    depth: int  # layers in its chain, its own included (an active one: once committed)
    remote: RemoteImage | None = None  # committed snapshots whose files are on the IPU
    lower: int | None = None  # active/view: the lower (id) its mounts stack on
    size: int = 0  # committed: bytes and inodes of its own layer, measured at commit
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class Info:
    """containerd's snapshots.Info (what Stat, Update and List answer)."""

    name: str
    parent: str
    kind: Kind
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    size: int
    inodes: int


@dataclass(frozen=True, slots=True)
class Mount:
    """containerd.types.Mount: what the caller passes to mount(2) (it picks the target)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI chain id of ``diff_ids`` (lowest layer first): ``ChainID(L0) = DiffID(L0)``,
    ``ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))``."""
    if not diff_ids:
        raise ValueError("a chain has at least one layer")
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def inherited(labels: dict[str, str]) -> dict[str, str]:
    """The labels containerd passes on from image descriptors (FilterInheritedLabels)."""
    return {k: v for k, v in labels.items()
            if k == SNAPSHOT_REF or k.startswith(INHERITED_PREFIX)}
