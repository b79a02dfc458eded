"""TEMP issue 15: the old path of :mod:`kata_ipu.oci.platform`, kept for ``daemon/engine.py``.

That module is being rewritten on another branch; once it imports ``kata_ipu.oci.platform``
this re-export goes (the lead removes it at the merge). Nothing else may import it.
"""

from __future__ import annotations

from kata_ipu.oci.platform import (
    Platform,
    compatible_variants,
    host_platform,
    match_rank,
    parse_platform,
)

__all__ = ["Platform", "compatible_variants", "host_platform", "match_rank", "parse_platform"]
