"""One HTTP/1.1 request over stdlib :mod:`http.client` (see docs/adr/0002-http-client.md).

:class:`HttpTransport` opens a fresh connection per request (blob downloads are long streams;
manifests and tokens are few), applies TLS settings of the :class:`RegistryHost`, and honours
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (loopback destinations are never proxied, like Go's
``httpproxy``). The socket timeout is the *stall* timeout: no byte for that long raises
``TimeoutError`` from any read. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from kata_ipu.image.hosts import RegistryHost
from kata_ipu.image.reference import is_loopback_host

USER_AGENT = "kata-ipu/0.1"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``connect``: TCP+TLS setup; ``stall``: longest silence while waiting for bytes;
    ``total``: wall-clock budget of one blob download (None: unbounded)."""

    connect: float = 30.0
    stall: float = 30.0
    total: float | None = None


class Response:
    """A response whose body is read with :meth:`readinto`/:meth:`read`; always :meth:`close`."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 url: str, sock: socket.socket | None) -> None:
        self._conn = conn
        self._sock = sock  # http.client drops conn.sock when the server says "close"
        self._resp = resp
        self.url = url
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def read1(self, limit: int) -> bytes:
        """At most ``limit`` bytes from at most one socket read (returns what has arrived,
        so a stall is noticed with the bytes before it already handed over)."""
        return self._resp.read1(limit)

    def read(self, limit: int) -> bytes:
        return self._resp.read(limit)

    def set_timeout(self, seconds: float) -> None:
        if self._sock is not None:
            self._sock.settimeout(seconds)

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


class HttpTransport:
    """Opens requests; stateless apart from the proxy environment read at construction."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.proxies: dict[str, str] = {}
        for key in ("https", "http", "no"):
            value = env.get(f"{key.upper()}_PROXY") or env.get(f"{key}_proxy")
            if value:
                self.proxies[key] = value

    def proxy_for(self, scheme: str, netloc: str) -> str | None:
        if is_loopback_host(netloc):
            return None
        proxy = self.proxies.get(scheme)
        if not proxy:
            return None
        host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
        if "no" in self.proxies and urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
                host, {"no": self.proxies["no"]}):
            return None
        return proxy if "://" in proxy else f"http://{proxy}"

    @staticmethod
    def _ssl_context(host: RegistryHost | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if host is not None:
            for ca in host.ca_files:
                ctx.load_verify_locations(cafile=ca)
            if host.skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def open(self, method: str, url: str, headers: Mapping[str, str], *,
             host: RegistryHost | None, timeouts: Timeouts, body: bytes | None = None,
             stall: float | None = None) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported URL {url!r}")
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        proxy = self.proxy_for(parts.scheme, parts.netloc)
        conn: http.client.HTTPConnection
        if proxy is not None:
            pp = urlsplit(proxy)
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(pp.hostname or "", pp.port or 3128,
                                                   timeout=timeouts.connect,
                                                   context=self._ssl_context(host))
                conn.set_tunnel(parts.hostname, parts.port or 443)
            else:
                conn = http.client.HTTPConnection(pp.hostname or "", pp.port or 3128,
                                                  timeout=timeouts.connect)
                target = url
        elif parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port,
                                               timeout=timeouts.connect,
                                               context=self._ssl_context(host))
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                              timeout=timeouts.connect)
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(stall if stall is not None else timeouts.stall)
            all_headers = {"User-Agent": USER_AGENT, **headers}
            if parts.port is None or proxy is not None:
                all_headers.setdefault("Host", parts.netloc)
            sock = conn.sock
            conn.request(method, target, body=body, headers=all_headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        return Response(conn, resp, url, sock)
