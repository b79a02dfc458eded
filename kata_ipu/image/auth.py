"""Registry authentication: ``WWW-Authenticate`` challenges, Basic auth and bearer tokens.

Lifecycle of an :class:`Authorizer` (one per registry, shared by all pulls of it): requests go
out with :meth:`Authorizer.header` (nothing until a host has challenged); on a 401 the client
calls :meth:`Authorizer.challenged`, which records the challenge (and drops a token the server
just rejected), then retries once. Bearer tokens are fetched from the challenge's ``realm``
(GET with Basic credentials, or the OAuth2 ``refresh_token`` POST for identity tokens) and
cached per (realm, service, scope, user) until ``expires_in`` (at least 60 s, per the spec).
A missing challenge scope defaults to ``repository:<name>:pull``; an empty one is tolerated.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from kata_ipu.errors import Unauthenticated
from kata_ipu.image.credentials import Credentials, CredentialSource
from kata_ipu.image.hosts import RegistryHost
from kata_ipu.image.transport import HttpTransport, Timeouts

log = logging.getLogger("kata_ipu.image.auth")

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    """Lowercase: ``basic`` or ``bearer``."""
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (possibly several challenges)."""
    out: list[Challenge] = []
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = re.compile(r"\s*([A-Za-z]+)(?:\s+|$)").match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            pm = _PARAM.match(header, pos)
            if not pm:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = pm.end()
        out.append(Challenge(scheme, params))
    return out


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.secret}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class TokenFetchError(Unauthenticated):
    pass


class Authorizer:
    """Per-registry auth state; thread-safe."""

    def __init__(self, registry: str, credentials: CredentialSource | None,
                 transport: HttpTransport, *, timeouts: Timeouts | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.credentials = credentials
        self.transport = transport
        self.timeouts = timeouts or Timeouts()
        self.clock = clock
        self._mu = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str, str, str], tuple[str, float]] = {}
        self.token_fetches = 0

    def _creds(self) -> Credentials | None:
        return self.credentials.get(self.registry) if self.credentials is not None else None

    def header(self, host: RegistryHost, scope: str) -> str | None:
        with self._mu:
            challenge = self._challenges.get(host.netloc)
        if challenge is None:
            return None
        creds = self._creds()
        if challenge.scheme == "basic":
            if creds is None or not creds.username:
                raise Unauthenticated(
                    f"registry {host.netloc} wants Basic auth but no credentials are "
                    f"configured for {self.registry}")
            return basic_header(creds)
        return f"Bearer {self._token(challenge, scope, creds)}"

    def challenged(self, host: RegistryHost, www_authenticate: str | None, scope: str,
                   rejected: str | None) -> bool:
        """Record a 401; returns False if retrying cannot help."""
        challenges = parse_challenges(www_authenticate or "")
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if chosen is None:
            return False
        with self._mu:
            self._challenges[host.netloc] = chosen
            if rejected and rejected.startswith("Bearer "):
                bad = rejected[7:]
                self._tokens = {k: v for k, v in self._tokens.items() if v[0] != bad}
        return True

    def _token(self, challenge: Challenge, scope: str, creds: Credentials | None) -> str:
        realm = challenge.params.get("realm", "")
        if not realm:
            raise Unauthenticated(f"registry {self.registry}: bearer challenge without realm")
        service = challenge.params.get("service", "")
        user = creds.username if creds else ""
        key = (realm, service, scope, user)
        now = self.clock()
        with self._mu:
            cached = self._tokens.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        token, expires_in = self._fetch_token(realm, service, scope, creds)
        with self._mu:
            self._tokens[key] = (token, now + max(expires_in, 60) - 5)
            self.token_fetches += 1
        return token

    def _fetch_token(self, realm: str, service: str, scope: str,
                     creds: Credentials | None) -> tuple[str, float]:
        if urlsplit(realm).scheme not in ("http", "https"):
            raise Unauthenticated(f"registry {self.registry}: invalid token realm {realm!r}")
        headers: dict[str, str] = {}
        body: bytes | None = None
        method = "GET"
        if creds is not None and creds.identity_token:
            method = "POST"
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "service": service, "client_id": "kata-ipu", "access_type": "offline"}
            if scope:
                form["scope"] = scope
            body = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            url = realm
        else:
            query = {k: v for k, v in (("service", service), ("scope", scope)) if v}
            sep = "&" if "?" in realm else "?"
            url = f"{realm}{sep}{urlencode(query)}" if query else realm
            if creds is not None and creds.username:
                headers["Authorization"] = basic_header(creds)
        try:
            resp = self.transport.open(method, url, headers, host=None, timeouts=self.timeouts,
                                       body=body)
        except OSError as exc:
            raise TokenFetchError(f"token server {realm} unreachable") from exc
        try:
            data = resp.read(1 << 20)
        finally:
            resp.close()
        if resp.status != 200:
            detail = data[:200].decode("utf-8", "replace").strip()
            raise TokenFetchError(
                f"token server {realm} refused scope {scope!r} for registry {self.registry}: "
                f"HTTP {resp.status} {detail}")
        try:
            obj = json.loads(data)
            token = obj.get("token") or obj.get("access_token")
            expires_in = float(obj.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise TokenFetchError(f"token server {realm} sent an invalid response") from exc
        if not isinstance(token, str) or not token:
            raise TokenFetchError(f"token server {realm} sent no token")
        log.debug("token", extra={"realm": realm, "scope": scope, "expires_in": expires_in})
        return token, expires_in
