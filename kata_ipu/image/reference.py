"""Image references: ``[registry[:port]/]repository[:tag][@algo:hex]``.

Grammar and defaults follow distribution/reference (what Docker and containerd accept): a first
path component is a registry only if it contains ``.`` or ``:``, is ``localhost``, or is an IPv6
literal in brackets; otherwise the registry is ``docker.io`` and single-component repositories get
``library/``. Repository components are lowercase ``[a-z0-9]+`` joined by ``.``, ``_``, ``__`` or
runs of ``-``; tags are ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``. Without tag or digest the tag is
``latest``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from kata_ipu.errors import InvalidArgument
from kata_ipu.oci.digest import InvalidDigest, validate_digest

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"
_MAX_NAME = 255

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class InvalidReference(InvalidArgument):
    """A reference string does not parse; the message names the bad part."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(f"invalid image reference {text!r}: {why}")
        self.text = text
        self.why = why


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised image reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``."""
        return f"{self.registry}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.registry)


def _split_host_port(hostport: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return hostport, None
        host, rest = hostport[: end + 1], hostport[end + 1:]
        return host, rest[1:] if rest.startswith(":") else (rest or None)
    host, sep, port = hostport.partition(":")
    return host, port if sep else None


def is_loopback_host(hostport: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``[::1]`` (with or without a port)."""
    host, _ = _split_host_port(hostport)
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_registry(text: str, registry: str) -> None:
    host, port = _split_host_port(registry)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise InvalidReference(text, f"registry {registry!r}: bad IPv6 address") from exc
    elif not _HOST.match(host):
        raise InvalidReference(text, f"registry host {host!r} is not a valid host name")
    if port is not None and (not _PORT.match(port) or not 0 < int(port) < 65536):
        raise InvalidReference(text, f"registry port {port!r} is not a port number")


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raises :class:`InvalidReference`."""
    if not isinstance(text, str):
        raise InvalidReference(repr(text), "not a string")
    if not text:
        raise InvalidReference(text, "empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(text, "contains whitespace")
    rest, at, digest = text.partition("@")
    if at:
        try:
            validate_digest(digest)
        except InvalidDigest as exc:
            raise InvalidReference(text, f"digest part {digest!r}: {exc.message}") from exc
    rest, tag = _split_tag(text, rest)
    registry, path = _split_registry(text, rest)
    _check_path(text, path)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise InvalidReference(text, f"name longer than {_MAX_NAME} characters")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest if at else None)


def _split_tag(text: str, rest: str) -> tuple[str, str | None]:
    """``(name, tag)``: the tag is after the last ':' that follows the last '/'."""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon <= slash:
        return rest, None
    rest, tag = rest[:colon], rest[colon + 1:]
    if not _TAG.match(tag):
        raise InvalidReference(text, f"tag {tag!r} is invalid (allowed: "
                               "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})")
    return rest, tag


def _split_registry(text: str, rest: str) -> tuple[str, str]:
    """``(registry, repository path)``; Docker Hub when the first component is no host."""
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
        _check_registry(text, registry)
    else:
        registry, path = DOCKER_HUB, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    return registry, path


def _check_path(text: str, path: str) -> None:
    if not path:
        raise InvalidReference(text, "missing repository name")
    for comp in path.split("/"):
        if not comp:
            raise InvalidReference(text, "empty path component in repository")
        if not _COMPONENT.match(comp):
            why = "must be lowercase" if comp.lower() != comp and _COMPONENT.match(
                comp.lower()) else "allowed: [a-z0-9] separated by '.', '_', '__' or '-'"
            raise InvalidReference(text, f"repository component {comp!r} {why}")
