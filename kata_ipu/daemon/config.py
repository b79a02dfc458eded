"""kata-ipud configuration: a TOML file, then command-line flags on top.

Every path and listen address has a default (DESIGN.md "Names") and can be overridden, so
tests run the daemon entirely inside a temporary directory. Unknown keys are errors: a typo
in a config file must not silently fall back to a default.

Example (``/etc/kata-ipu/ipud.toml``)::

    root = "/var/lib/kata-ipu"
    addresses = ["unix:///run/kata-ipu/ipud.sock", "tcp://10.0.0.2:7070"]
    socket_mode = "0660"

    [tcp]
    token_file = "/etc/kata-ipu/token"   # shared-token check for TCP clients
    insecure = false                     # true: allow TCP without any authentication

    [metrics]
    address = "127.0.0.1:9464"           # Prometheus, loopback only

    [image]
    insecure_registries = ["registry.local:5000"]
    hosts_dir = "/etc/containerd/certs.d"

    [rootfs]
    fstype = "ext4"
    headroom = 0.5                       # free space on top of the unpacked size
    min_size = "64M"
    max_size = "64G"
    warm_clones = 0                      # exported spare clones kept per hot image (host-block)

    [block]
    backend = "file"                     # "file" (reflink) or "qsd" (qcow2 overlays)
    pool_size = "64G"                    # sparse XFS pool file when root is not reflink-capable

    [gc]
    high_water = 0.85                    # GC unleased blobs/bases above this pool fill ratio
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_ipu.errors import InvalidArgument
from kata_ipu.ttrpc.address import Address, TcpAddress, parse_address

DEFAULT_CONFIG = "/etc/kata-ipu/ipud.toml"
DEFAULT_ROOT = "/var/lib/kata-ipu"
DEFAULT_ADDRESS = "unix:///run/kata-ipu/ipud.sock"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int, where: str) -> int:
    """``"64G"``, ``"512MiB"``, ``1048576`` -> bytes; names ``where`` on error."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgument(f"{where}: size must not be negative")
        return value
    if not isinstance(value, str) or not (m := _SIZE.match(value)):
        raise InvalidArgument(f"{where}: {value!r} is not a size (e.g. 512M, 64G)")
    unit = (m.group(2) or "").upper()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class TcpConfig:
    token_file: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    address: str = ""  # HOST:PORT on loopback; empty disables the endpoint


@dataclass(frozen=True)
class ImageConfig:
    insecure_registries: tuple[str, ...] = ()
    hosts_dir: str = "/etc/containerd/certs.d"
    docker_config: str = ""  # path to a Docker config.json; empty: $DOCKER_CONFIG or ~/.docker
    platform: str = ""  # os/arch[/variant]; empty: the running machine


@dataclass(frozen=True)
class RootfsConfig:
    fstype: str = "ext4"
    headroom: float = 0.5
    min_size: int = 64 << 20
    max_size: int = 64 << 30
    warm_clones: int = 0  # kata_ipu.daemon.warmpool


@dataclass(frozen=True)
class BlockConfig:
    backend: str = "file"
    pool_size: int = 64 << 30


@dataclass(frozen=True)
class GcConfig:
    high_water: float = 0.85


@dataclass(frozen=True)
class Config:
    root: Path = Path(DEFAULT_ROOT)
    addresses: tuple[Address, ...] = (parse_address(DEFAULT_ADDRESS),)
    socket_mode: int = 0o660
    tcp: TcpConfig = field(default_factory=TcpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    rootfs: RootfsConfig = field(default_factory=RootfsConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    gc: GcConfig = field(default_factory=GcConfig)

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def content_dir(self) -> Path:
        return self.root / "content"

    @property
    def pool_dir(self) -> Path:
        return self.root / "pool"

    def validate(self) -> None:
        """Refuse configurations that would be unsafe or cannot work."""
        tcp = [a for a in self.addresses if isinstance(a, TcpAddress)]
        if tcp and not self.tcp.token_file and not self.tcp.insecure:
            raise InvalidArgument(
                f"refusing to listen on {tcp[0]} without authentication: set [tcp] token_file "
                "or, for a private test network only, [tcp] insecure = true"
            )
        if self.rootfs.fstype not in ("ext4", "erofs"):
            raise InvalidArgument(f"[rootfs] fstype: {self.rootfs.fstype!r} is not ext4 or erofs")
        if self.block.backend not in ("file", "qsd"):
            raise InvalidArgument(f"[block] backend: {self.block.backend!r} is not file or qsd")
        if not 0 < self.gc.high_water <= 1:
            raise InvalidArgument("[gc] high_water must be in (0, 1]")
        if self.rootfs.min_size > self.rootfs.max_size:
            raise InvalidArgument("[rootfs] min_size is larger than max_size")
        if self.metrics.address:
            host = self.metrics.address.rpartition(":")[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise InvalidArgument(
                    f"[metrics] address {self.metrics.address!r} must be on loopback")


def _section(data: dict[str, Any], name: str, cls: type[Any], where: str) -> Any:
    raw = data.pop(name, {})
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    values = {key: _value(key, value, known[key].default, f"{where}: [{name}] {key}")
              for key, value in raw.items()}
    return cls(**values)


def _value(key: str, value: Any, ref: Any, label: str) -> Any:
    """``value`` checked against the type of the field's default ``ref``."""
    if key in ("min_size", "max_size", "pool_size"):
        return parse_size(value, label)
    if isinstance(ref, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{label} must be true or false")
        return value
    if isinstance(ref, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidArgument(f"{label} must be a number")
        return float(value)
    if isinstance(ref, int):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{label} must be a whole number >= 0")
        return value
    if isinstance(ref, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{label} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{label} must be a string")
    return value


def _read_toml(path: Path, *, required: bool) -> dict[str, Any]:
    """The TOML at ``path``; empty when it is missing (an error when ``required``)."""
    if path.exists():
        try:
            return tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{path}: not valid TOML") from exc
    if required:
        raise InvalidArgument(f"{path}: config file not found")
    return {}


def _top_level(data: dict[str, Any], where: str) -> tuple[str, list[str], int]:
    """(root, addresses, socket mode) popped from ``data``, which must then be empty."""
    cfg_root = data.pop("root", DEFAULT_ROOT)
    cfg_addresses = data.pop("addresses", [DEFAULT_ADDRESS])
    mode_text = data.pop("socket_mode", "0660")
    if data:
        raise InvalidArgument(f"{where}: unknown key(s): {', '.join(sorted(data))}")
    if not isinstance(cfg_root, str):
        raise InvalidArgument(f"{where}: root must be a string")
    if not isinstance(cfg_addresses, list) or not all(isinstance(a, str) for a in cfg_addresses):
        raise InvalidArgument(f"{where}: addresses must be a list of strings")
    try:
        mode = int(str(mode_text), 8)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: socket_mode {mode_text!r} is not octal") from exc
    return cfg_root, cfg_addresses, mode


def load(path: str | Path | None, *, root: str | None = None,
         addresses: list[str] | None = None, metrics: str | None = None,
         required: bool = False) -> Config:
    """Read the TOML file (missing is fine unless ``required``), then apply flag overrides."""
    where = str(path or DEFAULT_CONFIG)
    data = _read_toml(Path(where), required=required)
    sections = {
        "tcp": _section(data, "tcp", TcpConfig, where),
        "metrics": _section(data, "metrics", MetricsConfig, where),
        "image": _section(data, "image", ImageConfig, where),
        "rootfs": _section(data, "rootfs", RootfsConfig, where),
        "block": _section(data, "block", BlockConfig, where),
        "gc": _section(data, "gc", GcConfig, where),
    }
    cfg_root, cfg_addresses, mode = _top_level(data, where)
    if root is not None:
        cfg_root = root
    if addresses:
        cfg_addresses = addresses
    if metrics is not None:
        sections["metrics"] = MetricsConfig(address=metrics)
    try:
        parsed = tuple(parse_address(a) for a in cfg_addresses)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from exc
    config = Config(root=Path(cfg_root), addresses=parsed, socket_mode=mode, **sections)
    try:
        config.validate()
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    return config
