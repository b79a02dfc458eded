"""Platforms (os/architecture/variant), the running machine's platform and matching rules.

Matching follows containerd's ``platforms.Only``: an exact match wins; arm64 treats a missing
variant as ``v8``; 32-bit arm accepts lower variants (v7 runs v6 and v5 images) in order of
preference.
"""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass, field

from kata_ipu.errors import InvalidArgument

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64el": "ppc64le",
}
_COMPONENT = re.compile(r"^[a-z0-9_.-]+$")


@dataclass(frozen=True, slots=True)
class Platform:
    """An image platform as in an OCI index entry or image config."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    def normalized(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant
        if arch == "arm64" and variant in ("", "8"):
            variant = "v8"
        if arch == "arm":
            if variant == "":
                variant = "v7"
            elif variant.isdigit():
                variant = "v" + variant
        return Platform(self.os.lower(), arch, variant, self.os_version, self.os_features)


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch[/variant]`` (e.g. ``linux/arm/v7``)."""
    parts = text.strip().split("/")
    if not 2 <= len(parts) <= 3 or not all(p and _COMPONENT.match(p) for p in parts):
        raise InvalidArgument(f"invalid platform {text!r}: expected os/architecture[/variant]")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def host_platform() -> Platform:
    """The platform of the running machine (always Linux for kata-ipu)."""
    machine = _platform.machine().lower()
    variant = ""
    if machine.startswith("armv"):
        variant = "v" + machine[4]
        machine = "arm"
    return Platform("linux", machine, variant).normalized()


def compatible_variants(want: Platform) -> list[str]:
    """Variants acceptable for ``want``, best first."""
    want = want.normalized()
    if want.architecture == "arm" and want.variant.startswith("v") and want.variant[1:].isdigit():
        top = int(want.variant[1:])
        return [f"v{v}" for v in range(top, 4, -1)]
    return [want.variant]


def match_rank(want: Platform, have: Platform) -> int | None:
    """Lower is better; ``None`` when ``have`` cannot run where ``want`` is asked."""
    w, h = want.normalized(), have.normalized()
    if w.os != h.os or w.architecture != h.architecture:
        return None
    variants = compatible_variants(w)
    if h.variant in variants:
        return variants.index(h.variant)
    return None
