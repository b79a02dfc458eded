"""Blocking OCI distribution (v2) client for one registry, used from worker threads.

What it does per request: tries the registry's hosts in order (mirrors from hosts.toml first,
falling back to the next on connection errors, 5xx, 404 or stalls); answers ``401`` challenges
through the :class:`~kata_ipu.image.auth.Authorizer` (one retry); retries 5xx/429 and I/O errors
with exponential backoff; follows redirects for blobs **without** the ``Authorization`` header;
resumes blob downloads with ``Range``; aborts a download that receives no byte for
``Timeouts.stall`` seconds (then retries/resumes) and one that exceeds ``Timeouts.total``.

Lifecycle: construct once per registry (it caches tokens), call :meth:`RegistryClient.resolve`,
:meth:`fetch_manifest` and :meth:`fetch_blob` from any thread; it holds no open connections.

Size (over ~400 lines): one client and its request core (auth, retries, redirects, resume,
stall timeouts); the pieces share the per-request retry state, so splitting them would pass
that state across modules.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from kata_ipu.content.errors import DigestMismatch, SizeMismatch
from kata_ipu.content.ingest import IngestWriter
from kata_ipu.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    KataIpuError,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from kata_ipu.image.auth import Authorizer
from kata_ipu.image.credentials import CredentialSource
from kata_ipu.image.hosts import RegistryHost
from kata_ipu.image.reference import Reference
from kata_ipu.image.transport import HttpTransport, Response, Timeouts
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import split_digest
from kata_ipu.oci.manifest import Descriptor, detect_media_type

log = logging.getLogger("kata_ipu.image.registry")

MAX_MANIFEST = 4 << 20
_CHUNK = 1 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    sleep: Callable[[float], None] = time.sleep

    def backoff(self, attempt: int) -> None:
        delay = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        self.sleep(delay * (0.5 + random.random() / 2))


class RegistryUnavailable(Unavailable):
    """Host unreachable, or 5xx/429 after all retries."""


class ManifestNotFound(NotFound):
    pass


class StallTimeout(DeadlineExceeded):
    def __init__(self, what: str, seconds: float, offset: int) -> None:
        super().__init__(f"{what}: no data for {seconds:g}s (stalled at byte {offset})")
        self.offset = offset


class TotalTimeout(DeadlineExceeded):
    pass


@dataclass(frozen=True, slots=True)
class ResolvedManifest:
    descriptor: Descriptor
    data: bytes
    host: RegistryHost


class _Fallback(Exception):
    """Internal: this host failed in a way the next host may fix."""

    def __init__(self, error: KataIpuError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Hop:
    """Where one attempt of a request has got to: its URL after redirects, and the
    ``Authorization`` it sent (``None`` when none)."""

    url: str
    redirects: int = 0
    sent_auth: str | None = None


class RegistryClient:
    """See the module docstring."""

    def __init__(self, registry: str, hosts: Sequence[RegistryHost], *,
                 credentials: CredentialSource | None = None,
                 transport: HttpTransport | None = None,
                 retry: RetryPolicy | None = None,
                 timeouts: Timeouts | None = None) -> None:
        if not hosts:
            raise InvalidArgument(f"no hosts configured for registry {registry}")
        self.registry = registry
        self.hosts = list(hosts)
        self.transport = transport or HttpTransport()
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.auth = Authorizer(registry, credentials, self.transport, timeouts=self.timeouts)

    # -- request core ---------------------------------------------------------------------

    def _url(self, host: RegistryHost, path: str) -> str:
        url = host.base_url + path
        if host.mirror:
            url += ("&" if "?" in url else "?") + f"ns={self.registry}"
        return url

    def _send(self, host: RegistryHost, method: str, path: str, headers: Mapping[str, str],
              scope: str, *, what: str) -> Response:
        """Send with auth, retries and redirects; returns a non-5xx, non-401 response."""
        start_url = self._url(host, path)
        attempt = 0
        auth_retried = False
        while True:
            hop = _Hop(start_url)
            try:
                resp = self._follow(host, method, headers, scope, hop, what=what)
            except (OSError, http.client.HTTPException) as exc:
                url = hop.url
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise RegistryUnavailable(f"{what}: {url}: {exc or type(exc).__name__}") \
                        from exc
                log.warning("retrying", extra={"url": url, "error": str(exc),
                                               "attempt": attempt})
                self.retry.backoff(attempt)
                continue
            url, sent_auth = hop.url, hop.sent_auth
            if resp.status == 401 and hop.redirects == 0:
                challenge = resp.header("WWW-Authenticate")
                resp.close()
                if not auth_retried and self.auth.challenged(host, challenge, scope, sent_auth):
                    auth_retried = True
                    continue
                raise Unauthenticated(
                    f"{what}: {host.netloc} refused our credentials (HTTP 401)"
                    if sent_auth else f"{what}: {host.netloc} requires authentication")
            if resp.status >= 500 or resp.status == 429:
                resp.close()
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise RegistryUnavailable(
                        f"{what}: {url} answered HTTP {resp.status} {resp.reason} "
                        f"{attempt} times")
                log.warning("retrying", extra={"url": url, "status": resp.status,
                                               "attempt": attempt})
                self.retry.backoff(attempt)
                continue
            return resp

    def _follow(self, host: RegistryHost, method: str, headers: Mapping[str, str], scope: str,
                hop: _Hop, *, what: str) -> Response:
        """One attempt: send to ``hop.url`` and follow redirects, recording them in ``hop``
        (authorization goes to ``host`` itself only, before any redirect)."""
        while True:
            h = {**host.headers, **headers}
            same_host = urlsplit(hop.url).netloc == host.netloc and hop.url.startswith(
                host.scheme + "://")
            if same_host and hop.redirects == 0:
                hop.sent_auth = self.auth.header(host, scope)
                if hop.sent_auth:
                    h["Authorization"] = hop.sent_auth
            resp = self.transport.open(method, hop.url, h, host=host if same_host else None,
                                       timeouts=self.timeouts)
            if not (resp.status in _REDIRECTS and resp.header("Location")):
                return resp
            location = resp.header("Location") or ""
            resp.close()
            hop.redirects += 1
            if hop.redirects > 10:
                raise RegistryUnavailable(f"{what}: too many redirects")
            hop.url = urljoin(hop.url, location)
            log.debug("redirect", extra={"to": hop.url})

    def _hosts(self, capability: str) -> list[RegistryHost]:
        return [h for h in self.hosts if capability in h.capabilities]

    def _each_host(self, capability: str, what: str,
                      op: Callable[[RegistryHost], _T]) -> _T:
        errors: list[str] = []
        last: KataIpuError | None = None
        hosts = self._hosts(capability)
        for i, host in enumerate(hosts):
            try:
                return op(host)
            except _Fallback as fb:
                last = fb.error
            except (RegistryUnavailable, Unauthenticated, StallTimeout) as exc:
                last = exc
            if i + 1 < len(hosts):
                log.warning("host failed, trying next", extra={"host": str(host),
                                                               "error": str(last)})
            errors.append(f"{host}: {last}")
        if last is None:
            raise RegistryUnavailable(f"{what}: no host of {self.registry} can {capability}")
        if len(errors) > 1:
            last.message = f"{last.message} (tried: {'; '.join(errors[:-1])})"
        raise last

    # -- manifests -------------------------------------------------------------------------

    @staticmethod
    def scope(repository: str) -> str:
        return f"repository:{repository}:pull"

    def _get_manifest(self, host: RegistryHost, repository: str, obj: str,
                      expected: str | None) -> ResolvedManifest:
        what = f"manifest {self.registry}/{repository}:{obj}"
        resp = self._send(host, "GET", f"/{repository}/manifests/{obj}",
                          {"Accept": mt.ACCEPT_MANIFESTS}, self.scope(repository), what=what)
        try:
            if resp.status == 404:
                raise _Fallback(ManifestNotFound(f"{what} not found on {host}"))
            if resp.status != 200:
                body = resp.read(512).decode("utf-8", "replace").strip()
                raise _Fallback(RegistryUnavailable(f"{what}: HTTP {resp.status} {body}"))
            data = resp.read(MAX_MANIFEST + 1)
            if len(data) > MAX_MANIFEST:
                raise InvalidArgument(f"{what} is larger than {MAX_MANIFEST} bytes")
            header_digest = resp.header("Docker-Content-Digest")
            content_type = (resp.header("Content-Type") or "").split(";")[0].strip()
        except (OSError, http.client.HTTPException) as exc:
            raise _Fallback(RegistryUnavailable(f"{what}: {exc}")) from exc
        finally:
            resp.close()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected is not None:
            algo, _ = split_digest(expected)
            actual = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
            if actual != expected:
                raise DigestMismatch(expected, actual, where=f"{what} from {host}")
        if header_digest and header_digest.startswith("sha256:") and header_digest != actual \
                and (expected is None or expected.startswith("sha256:")):
            raise DigestMismatch(header_digest, actual,
                                 where=f"{what}: Docker-Content-Digest from {host}")
        try:
            obj_json = json.loads(data)
        except ValueError:
            obj_json = None
        media_type = content_type
        if isinstance(obj_json, dict):
            media_type = detect_media_type(obj_json, content_type or None, what)
        return ResolvedManifest(Descriptor(media_type or content_type, actual, len(data)),
                                data, host)

    def resolve(self, ref: Reference) -> ResolvedManifest:
        """Fetch the manifest (or index) ``ref`` names, verifying its digest."""
        capability = "pull" if ref.digest else "resolve"
        return self._each_host(
            capability, f"resolve {ref}",
            lambda host: self._get_manifest(host, ref.repository, ref.object, ref.digest))

    def fetch_manifest(self, repository: str, desc: Descriptor) -> bytes:
        res = self._each_host(
            "pull", f"manifest {desc.digest}",
            lambda host: self._get_manifest(host, repository, desc.digest, desc.digest))
        if len(res.data) != desc.size:
            raise SizeMismatch(desc.digest, desc.size, len(res.data))
        return res.data

    # -- blobs -----------------------------------------------------------------------------

    def fetch_blob(self, repository: str, desc: Descriptor, writer: IngestWriter) -> None:
        """Stream ``desc`` into ``writer`` from ``writer.offset`` on (caller commits)."""
        self._each_host("pull", f"blob {desc.digest}",
                        lambda host: self._fetch_blob_from(host, repository, desc, writer))

    def _fetch_blob_from(self, host: RegistryHost, repository: str, desc: Descriptor,
                         writer: IngestWriter) -> None:
        what = f"blob {desc.digest} of {self.registry}/{repository}"
        deadline = (time.monotonic() + self.timeouts.total) if self.timeouts.total else None
        attempt = 0
        while True:
            headers = {"Accept": "*/*"}
            resumed_from = writer.offset
            if resumed_from > 0:
                headers["Range"] = f"bytes={resumed_from}-"
            resp = self._send(host, "GET", f"/{repository}/blobs/{desc.digest}", headers,
                              self.scope(repository), what=what)
            try:
                self._check_blob_response(resp, desc, writer, what, host)
                while True:
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TotalTimeout(
                                f"{what}: not complete within {self.timeouts.total:g}s "
                                f"({writer.offset} of {desc.size} bytes; partial kept)")
                        resp.set_timeout(min(self.timeouts.stall, remaining))
                    chunk = resp.read1(_CHUNK)
                    if not chunk:
                        break
                    writer.write(chunk)
                if writer.offset != desc.size:
                    raise http.client.IncompleteRead(b"", desc.size - writer.offset)
                return
            except (OSError, http.client.HTTPException) as exc:
                attempt += 1
                stalled = isinstance(exc, TimeoutError)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TotalTimeout(f"{what}: not complete within {self.timeouts.total:g}s "
                                       f"({writer.offset} of {desc.size} bytes)") from exc
                if attempt >= self.retry.attempts:
                    if stalled:
                        raise StallTimeout(what, self.timeouts.stall, writer.offset) from exc
                    raise RegistryUnavailable(f"{what}: {exc or type(exc).__name__}") from exc
                log.warning("blob download interrupted, resuming",
                            extra={"digest": desc.digest, "offset": writer.offset,
                                   "stalled": stalled, "attempt": attempt})
                self.retry.backoff(attempt)
            finally:
                resp.close()

    def fetch_blob_tail(self, repository: str, desc: Descriptor, n: int, *,
                        timeout: float = 2.0) -> bytes | None:
        """The last ``n`` bytes of a blob through one ranged request, or None on any problem.

        Only ever a hint (a gzip trailer's size field), so: the first host that serves the
        blob, no retries, a short timeout, redirects followed without credentials.
        """
        if desc.size < n:
            return None
        hosts = self._hosts("pull")
        if not hosts:
            return None
        host = hosts[0]
        quick = Timeouts(connect=timeout, stall=timeout, total=timeout)
        url = self._url(host, f"/{repository}/blobs/{desc.digest}")
        headers = {**host.headers, "Accept": "*/*", "Range": f"bytes={desc.size - n}-"}
        auth = self.auth.header(host, self.scope(repository))
        if auth:
            headers["Authorization"] = auth
        try:
            for _ in range(4):
                resp = self.transport.open("GET", url, headers,
                                           host=host if url.startswith(host.base_url) else None,
                                           timeouts=quick)
                try:
                    location = resp.header("Location")
                    if resp.status in _REDIRECTS and location:
                        url = urljoin(url, location)
                        headers.pop("Authorization", None)
                        continue
                    if resp.status != 206:
                        return None  # a 200 would send the whole blob: not worth it
                    data = resp.read(n + 1)
                    return data if len(data) == n else None
                finally:
                    resp.close()
        except (OSError, http.client.HTTPException, KataIpuError, ValueError) as exc:
            log.debug("no blob tail", extra={"digest": desc.digest, "error": str(exc)})
        return None

    @staticmethod
    def _check_blob_response(resp: Response, desc: Descriptor, writer: IngestWriter,
                             what: str, host: RegistryHost) -> None:
        if resp.status == 404:
            raise _Fallback(NotFound(f"{what} not found on {host}"))
        if resp.status == 200:
            if writer.offset:
                writer.restart()
            length = resp.header("Content-Length")
            if length is not None and length.isdigit() and int(length) != desc.size:
                writer.discard()
                raise SizeMismatch(desc.digest, desc.size, int(length),
                                   where=f"Content-Length from {host}")
            return
        if resp.status == 206:
            crange = resp.header("Content-Range") or ""
            try:
                unit, _, spec = crange.partition(" ")
                span, _, total = spec.partition("/")
                start = int(span.split("-")[0])
            except ValueError as exc:
                raise DataLoss(f"{what}: bad Content-Range {crange!r}") from exc
            if unit != "bytes" or start != writer.offset:
                raise DataLoss(f"{what}: asked for bytes {writer.offset}-, got {crange!r}")
            if total.isdigit() and int(total) != desc.size:
                writer.discard()
                raise SizeMismatch(desc.digest, desc.size, int(total),
                                   where=f"Content-Range from {host}")
            return
        if resp.status == 416:
            writer.restart()
            raise http.client.HTTPException(f"{what}: range not satisfiable, restarting")
        body = resp.read(512).decode("utf-8", "replace").strip()
        raise _Fallback(RegistryUnavailable(f"{what}: HTTP {resp.status} {body}"))
