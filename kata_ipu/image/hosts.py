"""Which endpoints serve a registry: containerd's ``certs.d/<host>/hosts.toml`` layout.

For registry ``R`` the lookup reads ``<config_dir>/<R>/hosts.toml`` (``R`` is ``host[:port]``),
falling back to ``<config_dir>/_default/hosts.toml``. The file::

    server = "https://registry.example"          # upstream; default derived from R
    [host."http://mirror.local:5000"]
      capabilities = ["pull", "resolve"]         # resolve = may answer tag → digest
      skip_verify = false
      ca = "/etc/certs/mirror.pem"                # or a list
      override_path = false                       # true: URL path used as-is, no /v2 added
      [host."http://mirror.local:5000".header]
        x-custom = "value"

Mirrors are tried in file order, then the server. Without configuration, loopback registries
(``localhost``, ``127.0.0.0/8``, ``[::1]``) use plain HTTP, ``docker.io`` maps to
``https://registry-1.docker.io``, and everything else is HTTPS unless listed as insecure.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kata_ipu.errors import InvalidArgument
from kata_ipu.image.reference import DOCKER_HUB, is_loopback_host

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})


@dataclass(frozen=True, slots=True)
class RegistryHost:
    """One endpoint able to serve a registry's content."""

    scheme: str
    netloc: str
    path: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca_files: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    mirror: bool = False

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    def __str__(self) -> str:
        return self.base_url


def default_server(registry: str, insecure: Iterable[str] = ()) -> RegistryHost:
    if registry == DOCKER_HUB:
        return RegistryHost("https", "registry-1.docker.io")
    plain = is_loopback_host(registry) or registry in set(insecure)
    return RegistryHost("http" if plain else "https", registry)


def _host_from_url(url: str, *, where: str, capabilities: frozenset[str], mirror: bool,
                   opts: Mapping[str, Any]) -> RegistryHost:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(f"{where}: {url!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    if not opts.get("override_path", False) and not path.endswith("/v2"):
        path = f"{path}/v2"
    ca = opts.get("ca", ())
    ca_files = (ca,) if isinstance(ca, str) else tuple(str(c) for c in ca)
    headers = opts.get("header", {}) or {}
    if not isinstance(headers, dict):
        raise InvalidArgument(f"{where}: header of {url!r} must be a table")
    return RegistryHost(
        scheme=parts.scheme,
        netloc=parts.netloc,
        path=path or "/v2",
        capabilities=capabilities,
        skip_verify=bool(opts.get("skip_verify", False)),
        ca_files=ca_files,
        headers={str(k): str(v[0] if isinstance(v, list) else v) for k, v in headers.items()},
        mirror=mirror,
    )


def parse_hosts_toml(text: str, registry: str, *, where: str = "hosts.toml",
                     insecure: Iterable[str] = ()) -> list[RegistryHost]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{where}: invalid TOML ({exc})") from exc
    out: list[RegistryHost] = []
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise InvalidArgument(f"{where}: [host] must be a table of URLs")
    for url, opts in hosts.items():
        if not isinstance(opts, dict):
            raise InvalidArgument(f"{where}: host {url!r} must be a table")
        caps = opts.get("capabilities", ["pull", "resolve"])
        if not isinstance(caps, list) or not set(caps) <= ALL_CAPABILITIES:
            raise InvalidArgument(f"{where}: host {url!r} capabilities must be a subset of "
                                  f"{sorted(ALL_CAPABILITIES)}")
        out.append(_host_from_url(url, where=where, capabilities=frozenset(caps),
                                  mirror=True, opts=opts))
    server = doc.get("server")
    if server is None:
        out.append(default_server(registry, insecure))
    else:
        if not isinstance(server, str):
            raise InvalidArgument(f"{where}: server must be a URL string")
        out.append(_host_from_url(server, where=where, capabilities=ALL_CAPABILITIES,
                                  mirror=False, opts=doc))
    return out


def hosts_for(registry: str, config_dir: str | Path | None = None, *,
              insecure: Iterable[str] = ()) -> list[RegistryHost]:
    """Endpoints for ``registry`` in the order they should be tried."""
    if config_dir is not None:
        base = Path(config_dir)
        for name in (registry, registry.replace(":", "_"), "_default"):
            path = base / name / "hosts.toml"
            if path.is_file():
                return parse_hosts_toml(path.read_text(), registry, where=str(path),
                                        insecure=insecure)
    return [default_server(registry, insecure)]
