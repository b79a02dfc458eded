"""Garbage collection of the content store, with a disk-usage high-water mark.

Roots, never collected: every lease's resources (and what they reference), every tagged image
while it is *leased*, temporary pull leases of live processes, and partial ingests held by a
writer. Tagged but unleased images are cache entries: they are kept until usage exceeds the
high-water mark, then evicted least-recently-pulled first until usage falls to the low-water
mark.

``collect(store)`` with no marks removes every unreferenced blob (a plain mark-and-sweep).
``collect(store, high_water=H, low_water=L)`` does nothing while usage ≤ H; otherwise it sweeps
unreferenced blobs, then evicts unleased tags until usage ≤ L (default: H).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from kata_ipu.content.errors import BlobNotFound
from kata_ipu.content.store import ContentStore
from kata_ipu.errors import KataIpuError
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.manifest import Descriptor, children

log = logging.getLogger("kata_ipu.content.gc")


@dataclass(frozen=True, slots=True)
class GcResult:
    removed_blobs: tuple[str, ...]
    evicted_tags: tuple[str, ...]
    reclaimed_bytes: int
    """Allocated bytes (st_blocks) freed."""
    usage_before: int
    usage_after: int


def reachable(store: ContentStore, roots: Iterable[Descriptor]) -> set[str]:
    """Digests reachable from ``roots`` (walking indexes and manifests present in the store)."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        desc = stack.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        if desc.media_type in mt.INDEX_TYPES | mt.MANIFEST_TYPES and store.has(desc.digest):
            try:
                node = store.read_any(desc.digest, desc.media_type)
            except (BlobNotFound, KataIpuError) as exc:
                log.warning("cannot walk blob", extra={"digest": desc.digest, "error": str(exc)})
                continue
            stack.extend(children(node))
    return seen


def _leased_roots(store: ContentStore) -> list[Descriptor]:
    store.leases.prune()
    return [d for lease in store.leases.list() if lease.alive for d in lease.resources]


def _disk_bytes(store: ContentStore) -> int:
    return store.usage().disk_bytes


def _sweep(store: ContentStore, keep: set[str]) -> tuple[list[str], int]:
    removed, freed = [], 0
    for digest in store.all_blobs():
        if digest in keep:
            continue
        path = store.blob_path(digest)
        try:
            blocks = os.stat(path).st_blocks * 512
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(digest)
        freed += blocks
    return removed, freed


def collect(store: ContentStore, *, high_water: int | None = None,
            low_water: int | None = None) -> GcResult:
    """Run GC under the store lock; see the module docstring for the policy."""
    with store.locked():
        before = _disk_bytes(store)
        if high_water is not None and before <= high_water:
            return GcResult((), (), 0, before, before)
        target = low_water if low_water is not None else high_water
        leased = reachable(store, _leased_roots(store))
        images = sorted(store.images(), key=lambda img: img.pulled_at)
        tagged = reachable(store, [img.descriptor for img in images])
        removed, freed = _sweep(store, leased | tagged)
        evicted: list[str] = []
        if target is not None:
            for img in images:
                if _disk_bytes(store) <= target:
                    break
                if img.descriptor.digest in leased:
                    continue
                evicted.append(img.name)
                remaining = [i.descriptor for i in images if i.name not in evicted]
                store._write_index([
                    m for m in store._read_index_raw()
                    if (m.get("annotations") or {}).get(mt.REF_NAME) not in evicted
                ])
                more, more_freed = _sweep(store, leased | reachable(store, remaining))
                removed += more
                freed += more_freed
        after = _disk_bytes(store)
    log.info("gc", extra={"removed": len(removed), "evicted": evicted,
                          "reclaimed_bytes": freed, "usage_bytes": after})
    return GcResult(tuple(removed), tuple(evicted), freed, before, after)
