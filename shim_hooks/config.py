"""Configuration of the host-side front doors (shim proxy and runc wrapper).

One TOML file, ``/etc/kata-ipu/shim.toml`` (path overridable with ``$KATA_IPU_SHIM_CONFIG``);
a missing default file means "all defaults", a missing file named by the variable is an error.
``$KATA_IPU_ADDRESS`` and ``$KATA_IPU_DELEGATE`` in containerd's environment (which shims
inherit) override the file, so a private containerd can be pointed at a private daemon.
Unknown keys are errors: a typo must not silently fall back to a default.

Example::

    address = "unix:///run/kata-ipu/ipud.sock"   # kata-ipud
    delegate = "kata"            # "kata": containerd-shim-kata-v2, "runc": containerd-shim-runc-v2
    export = "host-block"        # how the clone reaches the container (host-block, vhost-user-blk)
    fallback = "error"           # "error": fail Create; "passthrough": keep the original rootfs
    timeout = 600                # seconds for one Prepare (a cold pull may take long)
    socket_dir = "/run/kata-ipu/shim"      # where the proxy's ttrpc sockets live
    snapshotter_root = "/var/lib/kata-ipu-snapshotter"  # the ipu snapshotter's root: a
                                 # rootfs on one of its lowers is prepared by that image's
                                 # digest ("": never look)

    [delegates]                  # binary per delegate (absolute path, or a name found in $PATH)
    kata = "containerd-shim-kata-v2"
    runc = "containerd-shim-runc-v2"

    [runtime]                    # kata-ipu-runtime (the runc wrapper)
    runc = "runc"                # the real OCI runtime it hands over to
    state_dir = "/run/kata-ipu/runtime"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kata_ipu.errors import InvalidArgument

DEFAULT_PATH = "/etc/kata-ipu/shim.toml"
DEFAULT_ADDRESS = "unix:///run/kata-ipu/ipud.sock"
CONFIG_ENV = "KATA_IPU_SHIM_CONFIG"
ADDRESS_ENV = "KATA_IPU_ADDRESS"
DELEGATE_ENV = "KATA_IPU_DELEGATE"

DELEGATES = ("kata", "runc")
EXPORTS = ("host-block", "vhost-user-blk", "nbd", "vfio-pci")
FALLBACKS = ("error", "passthrough")


class ConfigError(InvalidArgument):
    """The shim configuration file or an override is invalid."""


@dataclass(frozen=True, slots=True)
class ShimConfig:
    address: str = DEFAULT_ADDRESS
    delegate: str = "kata"
    export: str = "host-block"
    fallback: str = "error"
    timeout: float = 600.0
    socket_dir: str = "/run/kata-ipu/shim"
    snapshotter_root: str = "/var/lib/kata-ipu-snapshotter"
    delegates: Mapping[str, str] = field(default_factory=lambda: {
        "kata": "containerd-shim-kata-v2", "runc": "containerd-shim-runc-v2"})
    runc: str = "runc"
    state_dir: str = "/run/kata-ipu/runtime"
    source: str = ""  # the file it came from ("" when only defaults)

    @property
    def delegate_binary(self) -> str:
        return self.delegates[self.delegate]


_TOP: dict[str, type | tuple[type, ...]] = {
    "address": str, "delegate": str, "export": str, "fallback": str, "timeout": (int, float),
    "socket_dir": str, "snapshotter_root": str}


def _check_choice(name: str, value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {name} = {value!r}: expected one of {', '.join(choices)}")


def parse(data: Mapping[str, Any], where: str = "<config>") -> ShimConfig:
    """Build a config from parsed TOML; every key is checked."""
    cfg = ShimConfig(source=where)
    values: dict[str, Any] = {}
    for key, raw in dict(data).items():
        value: Any = raw
        if key in _TOP:
            if not isinstance(value, _TOP[key]) or isinstance(value, bool):
                raise ConfigError(f"{where}: {key} has the wrong type ({type(raw).__name__})")
            values[key] = float(raw) if key == "timeout" else raw
        elif key == "delegates":
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
                raise ConfigError(f"{where}: [delegates] maps a delegate name to a binary")
            unknown = set(value) - set(DELEGATES)
            if unknown:
                raise ConfigError(f"{where}: [delegates]: unknown delegate {sorted(unknown)}")
            values["delegates"] = {**cfg.delegates, **value}
        elif key == "runtime":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [runtime] must be a table")
            for rkey, rvalue in value.items():
                if rkey not in ("runc", "state_dir") or not isinstance(rvalue, str):
                    raise ConfigError(f"{where}: [runtime] {rkey}: unknown key or not a string")
                values[rkey] = rvalue
        else:
            raise ConfigError(f"{where}: unknown key {key!r}")
    cfg = replace(cfg, **values)
    _check_choice("delegate", cfg.delegate, DELEGATES, where)
    _check_choice("export", cfg.export, EXPORTS, where)
    _check_choice("fallback", cfg.fallback, FALLBACKS, where)
    if cfg.timeout <= 0:
        raise ConfigError(f"{where}: timeout must be positive")
    return cfg


_parsed: dict[str, tuple[tuple[int, int, int, int], ShimConfig]] = {}


def _parse_file(path: str) -> ShimConfig:
    """Parse ``path``, reusing the last result while the file is unchanged (kata-ipu-shimd's
    children parse it once per container start otherwise)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        cached = _parsed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        cfg = parse(tomllib.load(f), path)
    _parsed[path] = (stamp, cfg)
    return cfg


def load(environ: Mapping[str, str] | None = None) -> ShimConfig:
    """The file (``$KATA_IPU_SHIM_CONFIG`` or the default path), then the env overrides."""
    env = os.environ if environ is None else environ
    path = env.get(CONFIG_ENV) or DEFAULT_PATH
    try:
        cfg = _parse_file(path)
    except FileNotFoundError:
        if env.get(CONFIG_ENV):
            raise ConfigError(f"{path}: shim config file not found ({CONFIG_ENV})") from None
        cfg = ShimConfig()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if env.get(ADDRESS_ENV):
        cfg = replace(cfg, address=env[ADDRESS_ENV])
    if env.get(DELEGATE_ENV):
        _check_choice("delegate", env[DELEGATE_ENV], DELEGATES, f"${DELEGATE_ENV}")
        cfg = replace(cfg, delegate=env[DELEGATE_ENV])
    return cfg


def resolve_binary(name: str, environ: Mapping[str, str] | None = None) -> str:
    """An absolute path as is; otherwise the first match in ``$PATH`` (as containerd does)."""
    if os.path.isabs(name):
        return name
    env = os.environ if environ is None else environ
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(d or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ConfigError(f"{name}: not found in $PATH")
