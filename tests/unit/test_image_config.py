"""hosts.toml, credentials (config.json, helpers) and WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
import os

import pytest

from kata_ipu.errors import InvalidArgument
from kata_ipu.image.auth import parse_challenges
from kata_ipu.image.credentials import (
    CredentialsError,
    DockerConfigFile,
    default_credentials,
)
from kata_ipu.image.hosts import hosts_for
from kata_ipu.image.transport import HttpTransport


def test_default_hosts():
    assert [str(h) for h in hosts_for("docker.io")] == ["https://registry-1.docker.io/v2"]
    assert str(hosts_for("127.0.0.1:5000")[0]) == "http://127.0.0.1:5000/v2"
    assert str(hosts_for("localhost")[0]) == "http://localhost/v2"
    assert str(hosts_for("[::1]:5000")[0]) == "http://[::1]:5000/v2"
    assert str(hosts_for("reg.example")[0]) == "https://reg.example/v2"
    assert str(hosts_for("reg.example", insecure=["reg.example"])[0]) == "http://reg.example/v2"


def test_hosts_toml(tmp_path):
    d = tmp_path / "docker.io"
    d.mkdir()
    (d / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        '[host."http://mirror.local:5000"]\n  capabilities = ["pull"]\n'
        '[host."https://m2.local/prefix/v2"]\n  override_path = true\n  skip_verify = true\n'
        '  [host."https://m2.local/prefix/v2".header]\n    x-a = "b"\n')
    hosts = hosts_for("docker.io", tmp_path)
    assert [str(h) for h in hosts] == ["http://mirror.local:5000/v2",
                                       "https://m2.local/prefix/v2",
                                       "https://registry-1.docker.io/v2"]
    assert hosts[0].capabilities == {"pull"} and hosts[0].mirror
    assert hosts[1].capabilities == {"pull", "resolve"} and hosts[1].skip_verify
    assert hosts[1].headers == {"x-a": "b"}
    assert not hosts[2].mirror and "resolve" in hosts[2].capabilities
    (d / "hosts.toml").write_text('[host."ftp://x"]\n')
    with pytest.raises(InvalidArgument, match="not an http"):
        hosts_for("docker.io", tmp_path)
    (d / "hosts.toml").write_text("server = [")
    with pytest.raises(InvalidArgument, match="invalid TOML"):
        hosts_for("docker.io", tmp_path)


def test_config_json_auths_and_identity_token(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
        "reg.example:5000": {"identitytoken": "refresh-me"},
        "bad.example": {"auth": "!!!"},
    }}))
    src = DockerConfigFile(cfg)
    hub = src.get("docker.io")
    assert hub is not None and (hub.username, hub.secret) == ("hub", "pw")
    tok = src.get("reg.example:5000")
    assert tok is not None and tok.identity_token == "refresh-me"
    assert src.get("other.example") is None
    with pytest.raises(InvalidArgument, match="not base64"):
        src.get("bad.example")
    assert "pw" not in repr(hub)


def test_credential_helper_and_chain_order(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-kitest"
    helper.write_text('#!/bin/sh\nread server\n'
                      'if [ "$server" = "reg.example" ]; then\n'
                      '  echo \'{"ServerURL":"reg.example","Username":"hu","Secret":"hs"}\'\n'
                      'elif [ "$server" = "tok.example" ]; then\n'
                      '  echo \'{"ServerURL":"tok.example","Username":"<token>","Secret":"t"}\'\n'
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps({
        "credsStore": "kitest",
        "credHelpers": {"broken.example": "missing-helper"},
        "auths": {"auths.example": {"auth": base64.b64encode(b"au:as").decode()}},
    }))
    env = {"DOCKER_CONFIG": str(docker_dir), "HOME": str(tmp_path)}
    chain = default_credentials(env=env)
    creds = chain.get("reg.example")
    assert creds is not None and (creds.username, creds.secret) == ("hu", "hs")
    tok = chain.get("tok.example")
    assert tok is not None and tok.identity_token == "t"
    assert chain.get("unknown.example") is None
    au = chain.get("auths.example")
    assert au is not None and au.username == "au"  # auths wins over credsStore
    with pytest.raises(CredentialsError, match="docker-credential-missing-helper"):
        chain.get("broken.example")
    # Explicit (CRI-supplied) credentials come first.
    from kata_ipu.image.credentials import Credentials
    explicit = default_credentials({"reg.example": Credentials("cri", "x")}, env=env)
    got = explicit.get("reg.example")
    assert got is not None and got.username == "cri"


def test_www_authenticate_parsing():
    ch = parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                          'scope="repository:a/b:pull,push"')
    assert ch[0].scheme == "bearer"
    assert ch[0].params == {"realm": "https://auth.example/token", "service": "reg",
                            "scope": "repository:a/b:pull,push"}
    ch = parse_challenges('Basic realm="x y"')
    assert ch[0].scheme == "basic" and ch[0].params["realm"] == "x y"
    assert parse_challenges("") == []
    ch = parse_challenges('Bearer realm="r",scope=""')
    assert ch[0].params["scope"] == ""


def test_proxy_selection_from_environment():
    t = HttpTransport({"HTTPS_PROXY": "proxy.local:3128", "NO_PROXY": "internal.example"})
    assert t.proxy_for("https", "reg.example") == "http://proxy.local:3128"
    assert t.proxy_for("https", "internal.example:5000") is None
    assert t.proxy_for("https", "127.0.0.1:5000") is None  # loopback never proxied
    assert t.proxy_for("http", "reg.example") is None  # no HTTP_PROXY set
