"""Names the daemon gives and checks: container ids, and base ids derived from an image.

A base is named by what it is built from, ``<manifest hex[:32]>-<fstype>``, with
``-l<layers>`` for a base of the image's first ``layers`` layers only (a lower snapshot of
containerd's chain). Container ids are validated at the API boundary; the warm pool's spares
use a reserved prefix no container may take.
"""

from __future__ import annotations

import re

from kata_ipu.daemon import warmpool
from kata_ipu.errors import InvalidArgument

CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LAYERS = re.compile(r"-l(\d+)$")


def check_container_id(container_id: str) -> str:
    if not container_id:
        raise InvalidArgument("container_id is empty")
    if not CONTAINER_ID.match(container_id):
        raise InvalidArgument(
            f"container_id {container_id!r} is invalid: use 1-128 characters of "
            "[A-Za-z0-9_.-], starting with a letter or digit")
    if container_id.startswith(warmpool.PREFIX):
        raise InvalidArgument(f"container_id {container_id!r} is invalid: the prefix "
                              f"{warmpool.PREFIX!r} is reserved for the warm pool's spares")
    return container_id


def base_id_for(digest: str, fstype: str, layers: int = 0) -> str:
    """One base per (manifest digest, filesystem): ``<hex[:32]>-<fstype>``; a base of the
    image's first ``layers`` layers only (a lower snapshot of containerd's chain) is
    ``<hex[:32]>-<fstype>-l<layers>``."""
    base = f"{digest.partition(':')[2][:32]}-{fstype}"
    return f"{base}-l{layers}" if layers else base


def layers_of(base_id: str) -> int:
    """The ``layers`` a base id was made with (:func:`base_id_for`); 0: all of them."""
    held = _LAYERS.search(base_id)
    return int(held.group(1)) if held else 0
