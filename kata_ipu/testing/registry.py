"""Real registries for tests: Debian's ``docker-registry`` (CNCF distribution) on 127.0.0.1.

* :class:`RegistryServer` — starts ``docker-registry serve`` on a free port with a temp storage
  dir and a generated ``config.yml``; variants ``auth="htpasswd"`` (bcrypt via ``htpasswd``) and
  ``auth="token"`` (with a :class:`TokenServer`). Context manager: always stopped on exit.
* :class:`TokenServer` — a small Docker token server issuing RS256 JWTs (signed with ``openssl``)
  that the real registry verifies against the generated certificate.
* :class:`FaultProxy` — an HTTP reverse proxy in front of a registry whose per-request
  :class:`Fault` rules inject 500s, stalls mid-blob, corrupted or oversized blobs and redirects.
* :func:`push` — ``skopeo copy oci:DIR:REF docker://ADDR/REPO:TAG``.

Nothing here runs at import time; every server is stopped by its ``__exit__``/``stop``.

Size (over ~400 lines): the registry, its token server and the fault proxy are one fixture
family used together (a test starts a registry behind a proxy, with tokens).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from kata_ipu.executor import DEFAULT, Executor


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _wait_http(host: str, port: int, proc: subprocess.Popen[bytes] | None,
               timeout: float = 20.0, tls: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            conn = (http.client.HTTPSConnection(host, port, timeout=1,
                                                context=ssl._create_unverified_context())
                    if tls else http.client.HTTPConnection(host, port, timeout=1))
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {host}:{port} did not come up within {timeout}s")


class _LocalHttpServer:
    """An in-process HTTP server on 127.0.0.1:<free port>, served from a daemon thread.

    Subclasses build their request handler in ``start()`` and hand it to :meth:`_serve`;
    ``stop()`` (also the context manager's exit) shuts it down and closes the socket.
    """

    def __init__(self) -> None:
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> Self:
        raise NotImplementedError

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TokenServer(_LocalHttpServer):
    """Docker registry token server (``GET /token?service=&scope=``, Basic auth optional).

    ``users`` maps username → password; with ``anonymous_pull`` anonymous users get pull
    access; ``refresh_tokens`` maps an identity (OAuth2 refresh) token → username for the
    ``POST grant_type=refresh_token`` flow. Every request is appended to :attr:`requests`
    (scope, user, grant) for assertions.
    """

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 anonymous_pull: bool = False, service: str = "kata-ipu-test-registry",
                 issuer: str = "kata-ipu-test-issuer", expires_in: int = 300,
                 refresh_tokens: dict[str, str] | None = None,
                 executor: Executor = DEFAULT) -> None:
        self.workdir = workdir
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})
        self.anonymous_pull = anonymous_pull
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.executor = executor
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        self.requests: list[dict[str, str]] = []
        super().__init__()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _sign(self, payload: bytes) -> bytes:
        return self.executor.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                 input=payload).stdout

    def issue(self, user: str, scopes: list[str]) -> str:
        der = self.executor.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"]
                                ).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3:
                access.append({"type": parts[0], "name": ":".join(parts[1:-1]),
                               "actions": [a for a in parts[-1].split(",") if a == "pull"]})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode())).encode()
        return signing_input.decode() + "." + _b64url(self._sign(signing_input))

    def start(self) -> TokenServer:
        self.executor.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
                           "-subj", "/CN=kata-ipu-test-token"])
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, obj: dict[str, Any] | None = None) -> None:
                body = json.dumps(obj).encode() if obj is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                scopes = form.get("scope", [""])[0].split()
                user = outer.refresh_tokens.get(form.get("refresh_token", [""])[0])
                ok = form.get("grant_type") == ["refresh_token"] and user is not None
                outer.requests.append({"user": user or "", "scope": " ".join(scopes),
                                       "grant": "refresh_token",
                                       "result": "ok" if ok else "denied"})
                if not ok or user is None:
                    self._reply(401, {"error": "invalid_grant"})
                    return
                self._reply(200, {"access_token": outer.issue(user, scopes),
                                  "expires_in": outer.expires_in})

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scopes = query.get("scope", [])
                user = ""
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if outer.users.get(u) != p:
                        outer.requests.append({"user": u, "scope": " ".join(scopes),
                                               "result": "denied"})
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = u
                elif not outer.anonymous_pull:
                    scopes = []
                outer.requests.append({"user": user, "scope": " ".join(scopes),
                                       "result": "ok"})
                body = json.dumps({"token": outer.issue(user, scopes),
                                   "expires_in": outer.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)
        return self


class RegistryServer:
    """``docker-registry serve`` on ``host`` (127.0.0.1 by default) at a free port, with
    storage under ``workdir``. A test network's address may be given as ``host`` so that
    an IPU in another network namespace can reach it."""

    def __init__(self, workdir: Path, *, auth: Literal["none", "htpasswd", "token"] = "none",
                 users: dict[str, str] | None = None, token_server: TokenServer | None = None,
                 tls: bool = False, host: str = "127.0.0.1",
                 executor: Executor = DEFAULT) -> None:
        self.workdir = workdir
        self.host = host
        self.auth = auth
        self.tls = tls
        self.cert = workdir / "registry.crt"
        """With ``tls``: the self-signed certificate (SAN IP:127.0.0.1) clients must trust."""
        self.users = dict(users or {})
        self.token_server = token_server
        self.executor = executor
        self.port = free_port()
        self.storage = workdir / "storage"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def blob_file(self, digest: str) -> Path:
        """Where the registry's filesystem driver keeps a blob (to serve it as a "CDN")."""
        algo, _, hexd = digest.partition(":")
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": self.address, "secret": uuid.uuid4().hex},
        }
        if self.tls:
            key = self.workdir / "registry.key"
            self.executor.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                               "-keyout", str(key), "-out", str(self.cert), "-days", "2",
                               "-subj", "/CN=127.0.0.1", "-addext",
                               "subjectAltName=IP:127.0.0.1"])
            cfg["http"]["tls"] = {"certificate": str(self.cert), "key": str(key)}
        if self.auth == "htpasswd":
            htpasswd = self.workdir / "htpasswd"
            lines = [self.executor.run(["htpasswd", "-Bbn", u, p]).text.strip()
                     for u, p in self.users.items()]
            htpasswd.write_text("\n".join(lines) + "\n")
            cfg["auth"] = {"htpasswd": {"realm": "kata-ipu-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            if self.token_server is None:
                raise ValueError("auth='token' needs a started TokenServer")
            ts = self.token_server
            cfg["auth"] = {"token": {"realm": ts.realm, "service": ts.service,
                                     "issuer": ts.issuer, "rootcertbundle": str(ts.cert)}}
        return cfg

    def start(self) -> RegistryServer:
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        # JSON is valid YAML.
        config.write_text(json.dumps(self._config(), indent=1))
        self._log = open(self.workdir / "registry.log", "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                      stdout=self._log, stderr=subprocess.STDOUT)
        try:
            _wait_http(self.host, self.port, self._proc, tls=self.tls)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def push(oci_dir: Path, ref: str, dest: str, *, creds: tuple[str, str] | None = None,
         executor: Executor = DEFAULT, all_platforms: bool = False,
         preserve_digests: bool = True, extra: Sequence[str] = ()) -> None:
    """``skopeo copy oci:<oci_dir>:<ref> docker://<dest>`` (plain HTTP); by default the
    registry gets exactly the layout's blobs (no recompression of uncompressed layers)."""
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if preserve_digests:
        argv.append("--preserve-digests")
    if all_platforms:
        argv.append("--all")
    if creds:
        argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    argv += [*extra, f"oci:{oci_dir}:{ref}", f"docker://{dest}"]
    executor.run(argv, timeout=300)


# -- fault injection ---------------------------------------------------------------------


@dataclass
class Fault:
    """What the proxy does with a matching request.

    ``kind``: ``status`` (answer ``status`` without contacting upstream), ``stall`` (send the
    headers and ``after_bytes`` of the body, then go silent until the proxy stops),
    ``corrupt`` (flip one byte of the body), ``extra`` (append bytes beyond Content-Length
    without announcing them: the declared length grows), ``truncate`` (announce and send 0
    bytes), ``redirect`` (307 to ``location(path)``). ``times``: how many matching requests it
    applies to (None: all).
    """

    kind: Literal["status", "stall", "corrupt", "extra", "truncate", "redirect"]
    match: Callable[[str, str], bool]
    """(method, path) → applies?"""
    status: int = 500
    after_bytes: int = 0
    times: int | None = None
    location: Callable[[str], str] | None = None
    hits: int = 0


@dataclass
class ProxyRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    fault: str = ""


class FaultProxy(_LocalHttpServer):
    """Reverse proxy to ``upstream`` (``host:port``) with fault rules, logging every request."""

    def __init__(self, upstream: str, faults: list[Fault] | None = None) -> None:
        self.upstream = upstream
        self.faults = list(faults or [])
        self.requests: list[ProxyRequest] = []
        self._stop = threading.Event()
        self._mu = threading.Lock()
        super().__init__()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._mu:
            for fault in self.faults:
                if (fault.times is None or fault.hits < fault.times) and fault.match(method,
                                                                                     path):
                    fault.hits += 1
                    return fault
        return None

    def start(self) -> FaultProxy:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                fault = outer._pick(self.command, self.path)
                outer.requests.append(ProxyRequest(self.command, self.path,
                                                   dict(self.headers.items()),
                                                   fault.kind if fault else ""))
                if fault is not None and fault.kind == "status":
                    self.send_response(fault.status)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                if fault is not None and fault.kind == "redirect":
                    assert fault.location is not None
                    self.send_response(307)
                    self.send_header("Location", fault.location(self.path))
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                host, _, port = outer.upstream.partition(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault is not None and fault.kind == "corrupt" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if fault is not None and fault.kind == "extra":
                    data += b"\0" * 4096
                if fault is not None and fault.kind == "truncate":
                    data = b""
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault is not None and fault.kind == "stall":
                    self.wfile.write(data[: fault.after_bytes])
                    self.wfile.flush()
                    outer._stop.wait(120)
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _handle

        self._serve(Handler)
        return self

    def stop(self) -> None:
        self._stop.set()  # releases stalled responses before the server shuts down
        super().stop()


class BlobFileServer(_LocalHttpServer):
    """A "CDN": serves ``GET /<digest>`` from a :class:`RegistryServer`'s storage and records
    whether requests carried an ``Authorization`` header."""

    def __init__(self, registry: RegistryServer) -> None:
        self.registry = registry
        self.requests: list[ProxyRequest] = []
        super().__init__()

    def url_for(self, digest: str) -> str:
        return f"http://127.0.0.1:{self.port}/{digest}"

    def start(self) -> BlobFileServer:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(ProxyRequest("GET", self.path, dict(self.headers.items())))
                path = outer.registry.blob_file(self.path.lstrip("/"))
                try:
                    data = path.read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._serve(Handler)
        return self

