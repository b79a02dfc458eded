"""Registry credentials: explicit (CRI-supplied), Docker/podman config files and helpers.

The chain (:func:`default_credentials`) asks, in order: credentials given explicitly (e.g. what
CRI's ``PullImage`` received), then each config file — ``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json`` — then anonymous. In a config file, ``credHelpers[<registry>]`` wins over
``auths``, which wins over ``credsStore``. Helpers are run as ``docker-credential-<name> get``
with the server URL on stdin through the injectable :class:`~kata_ipu.executor.Executor`.

Files are re-read when their mtime changes, so a daemon picks up ``docker login`` without a
restart.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kata_ipu.errors import InvalidArgument, Unauthenticated
from kata_ipu.executor import DEFAULT, CommandFailed, CommandNotFound, Executor
from kata_ipu.image.reference import DOCKER_HUB

log = logging.getLogger("kata_ipu.image.credentials")

DOCKER_HUB_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Username + secret (Basic or token-server password), or an identity (refresh) token."""

    username: str = ""
    secret: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def empty(self) -> bool:
        return not (self.username or self.secret or self.identity_token)


class CredentialSource(Protocol):
    def get(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (``host[:port]``), or None to try the next source."""
        ...


class CredentialsError(Unauthenticated):
    pass


@dataclass
class StaticCredentials:
    """A fixed registry → credentials map (what CRI hands over)."""

    by_registry: Mapping[str, Credentials]

    def get(self, registry: str) -> Credentials | None:
        return self.by_registry.get(registry)


def _keys_for(registry: str) -> list[str]:
    keys = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/",
            f"https://{registry}/v2/"]
    if registry == DOCKER_HUB:
        keys = [DOCKER_HUB_KEY, "index.docker.io", "docker.io", "https://index.docker.io",
                "registry-1.docker.io"]
    return keys


class DockerConfigFile:
    """One ``config.json`` / ``auth.json``."""

    def __init__(self, path: str | os.PathLike[str], executor: Executor = DEFAULT) -> None:
        self.path = Path(path)
        self.executor = executor
        self._mtime: float | None = None
        self._data: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._mtime, self._data = None, {}
            return self._data
        if mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise InvalidArgument(f"credentials file {self.path} is not valid JSON") from exc
            if not isinstance(data, dict):
                raise InvalidArgument(f"credentials file {self.path} is not a JSON object")
            self._mtime, self._data = mtime, data
        return self._data

    def get(self, registry: str) -> Credentials | None:
        data = self._load()
        keys = _keys_for(registry)
        helpers = data.get("credHelpers") or {}
        for key in keys:
            if isinstance(helpers, dict) and isinstance(helpers.get(key), str):
                return self._helper(helpers[key], keys[0])
        auths = data.get("auths") or {}
        for key in keys:
            entry = auths.get(key) if isinstance(auths, dict) else None
            if isinstance(entry, dict):
                creds = self._decode(entry, key)
                if creds is not None:
                    return creds
        store = data.get("credsStore")
        if isinstance(store, str) and store:
            return self._helper(store, keys[0])
        return None

    def _decode(self, entry: Mapping[str, Any], key: str) -> Credentials | None:
        token = entry.get("identitytoken") or ""
        user, secret = entry.get("username") or "", entry.get("password") or ""
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            try:
                user, sep, secret = base64.b64decode(auth, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise InvalidArgument(
                    f"credentials file {self.path}: 'auth' of {key!r} is not base64") from exc
            if not sep:
                raise InvalidArgument(
                    f"credentials file {self.path}: 'auth' of {key!r} is not user:password")
        creds = Credentials(str(user), str(secret), str(token))
        return None if creds.empty else creds

    def _helper(self, name: str, server: str) -> Credentials | None:
        program = f"docker-credential-{name}"
        try:
            result = self.executor.run([program, "get"], input=server.encode(), check=False,
                                       timeout=30)
        except CommandNotFound as exc:
            raise CredentialsError(
                f"credential helper {program} (from {self.path}) is not installed") from exc
        if result.returncode != 0:
            text = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
            if "credentials not found" in text.lower():
                return None
            raise CredentialsError(f"{program} get {server} failed: {text or 'no output'}") \
                from CommandFailed(result)
        try:
            obj = json.loads(result.stdout)
            user, secret = str(obj.get("Username", "")), str(obj.get("Secret", ""))
        except (ValueError, AttributeError) as exc:
            raise CredentialsError(f"{program} returned invalid JSON") from exc
        if user == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(user, secret)


class CredentialChain:
    """Tries sources in order; the first non-None answer wins."""

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        self.sources = list(sources)

    def get(self, registry: str) -> Credentials | None:
        for source in self.sources:
            creds = source.get(registry)
            if creds is not None:
                return creds
        return None


def config_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    paths: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        paths.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else \
        Path(env.get("HOME", "/root")) / ".docker"
    paths.append(docker_dir / "config.json")
    return paths


def default_credentials(explicit: Mapping[str, Credentials] | None = None, *,
                        env: Mapping[str, str] | None = None,
                        executor: Executor = DEFAULT) -> CredentialChain:
    sources: list[CredentialSource] = []
    if explicit:
        sources.append(StaticCredentials(dict(explicit)))
    sources.extend(DockerConfigFile(p, executor) for p in config_paths(env))
    return CredentialChain(sources)
