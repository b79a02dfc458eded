"""Configuration of ``kata-ipu-snapshotter``: ``/etc/kata-ipu/snapshotter.toml``.

A missing default file means all defaults; a file named with ``--config`` must exist.
Unknown keys are errors. ``$KATA_IPU_ADDRESS`` overrides ``ipu_address`` (as for the shims),
flags override both. Example (every key, with its default)::

    root = "/var/lib/kata-ipu-snapshotter"      # snapshots, lowers, metadata.db
    address = "/run/kata-ipu/snapshotter.sock"  # containerd's [proxy_plugins.ipu] address
    ipu_address = "unix:///run/kata-ipu/ipud.sock"  # "": a plain overlayfs snapshotter
    instance = ""            # this host's name in the IPU's keys; default: the host name
    fallback = "overlay"     # IPU unreachable or refusing for its own reasons: "overlay"
                             # (containerd pulls that image on the host) or "never"
    fallback_seconds = 60    # how long one image's fallback holds before the IPU is tried again
    pull_timeout = 1800      # seconds the IPU may take to pull and build one image
    remove_images = true     # the last snapshot of an image removed: remove it on the IPU
    lower_linger = 300       # seconds an unused lower stays mounted for the image's next
                             # container (0: released with its last snapshot)
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kata_ipu.errors import InvalidArgument

DEFAULT_PATH = "/etc/kata-ipu/snapshotter.toml"
ADDRESS_ENV = "KATA_IPU_ADDRESS"
FALLBACKS = ("overlay", "never")


class ConfigError(InvalidArgument):
    """The snapshotter configuration is invalid."""


@dataclass(frozen=True, slots=True)
class SnapshotterConfig:
    root: Path = Path("/var/lib/kata-ipu-snapshotter")
    address: Path = Path("/run/kata-ipu/snapshotter.sock")
    ipu_address: str = "unix:///run/kata-ipu/ipud.sock"
    instance: str = ""
    fallback: str = "overlay"
    fallback_seconds: float = 60.0
    pull_timeout: float = 1800.0
    remove_images: bool = True
    lower_linger: float = 300.0

    @property
    def host(self) -> str:
        return self.instance or socket.gethostname()


_TYPES: dict[str, type] = {"root": Path, "address": Path, "ipu_address": str, "instance": str,
                           "fallback": str, "fallback_seconds": float, "pull_timeout": float,
                           "remove_images": bool, "lower_linger": float}


def _coerce(path: str, key: str, value: Any) -> Any:
    want = _TYPES[key]
    if want is Path:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{path}: {key} must be an absolute path, not {value!r}")
        return Path(value)
    if want is float:
        zero_ok = key == "lower_linger"
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (
                value == 0 and not zero_ok):
            kind = "non-negative" if zero_ok else "positive"
            raise ConfigError(f"{path}: {key} must be a {kind} number, not {value!r}")
        return float(value)
    if not isinstance(value, want):
        raise ConfigError(f"{path}: {key} must be a {want.__name__}, not {value!r}")
    return value


def load(path: str | None = None, *, env: dict[str, str] | None = None,
         **overrides: Any) -> SnapshotterConfig:
    """The file at ``path`` (default: :data:`DEFAULT_PATH` if it exists), then the
    environment, then the ``overrides`` that are not None."""
    env = dict(os.environ) if env is None else env
    where = path or DEFAULT_PATH
    data: dict[str, Any] = {}
    try:
        with open(where, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if path is not None:
            raise ConfigError(f"{where}: no such configuration file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    known = {f.name for f in fields(SnapshotterConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    cfg = SnapshotterConfig(**{k: _coerce(where, k, v) for k, v in data.items()})
    if ADDRESS_ENV in env:
        cfg = replace(cfg, ipu_address=env[ADDRESS_ENV])
    cfg = replace(cfg, **{k: _coerce("command line", k, v) if _TYPES[k] is not str else v
                          for k, v in overrides.items() if v is not None})
    if cfg.fallback not in FALLBACKS:
        raise ConfigError(f"{where}: fallback must be one of {', '.join(FALLBACKS)}, not "
                          f"{cfg.fallback!r}")
    return cfg
