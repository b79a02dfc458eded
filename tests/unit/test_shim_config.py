"""shim.toml parsing, KATA_IPU_* overrides and the delegate binary choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim_hooks import config


def _write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "shim.toml"
    path.write_text(text)
    return {config.CONFIG_ENV: str(path)}


def test_defaults_when_the_default_file_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", "/nonexistent/kata-ipu/shim.toml")
    cfg = config.load({})
    assert cfg.address == "unix:///run/kata-ipu/ipud.sock"
    assert cfg.delegate == "kata" and cfg.delegate_binary == "containerd-shim-kata-v2"
    assert (cfg.export, cfg.fallback) == ("host-block", "error")


def test_file_then_environment_overrides(tmp_path: Path) -> None:
    env = _write(tmp_path, 'address = "unix:///x/ipud.sock"\ndelegate = "kata"\n'
                 'fallback = "passthrough"\ntimeout = 30\n'
                 '[delegates]\nrunc = "/opt/bin/containerd-shim-runc-v2"\n'
                 '[runtime]\nrunc = "/usr/sbin/runc"\nstate_dir = "/tmp/st"\n')
    cfg = config.load(env)
    assert (cfg.address, cfg.delegate, cfg.fallback, cfg.timeout) == (
        "unix:///x/ipud.sock", "kata", "passthrough", 30.0)
    assert (cfg.runc, cfg.state_dir) == ("/usr/sbin/runc", "/tmp/st")
    cfg = config.load({**env, config.ADDRESS_ENV: "unix:///y.sock",
                       config.DELEGATE_ENV: "runc"})
    assert cfg.address == "unix:///y.sock"
    assert cfg.delegate_binary == "/opt/bin/containerd-shim-runc-v2"


@pytest.mark.parametrize(("text", "fragment"), [
    ('adress = "x"\n', "unknown key 'adress'"),
    ('delegate = "gvisor"\n', "delegate = 'gvisor'"),
    ('fallback = "maybe"\n', "fallback"),
    ('export = "floppy"\n', "export"),
    ("timeout = true\n", "wrong type"),
    ('[delegates]\nfirecracker = "x"\n', "unknown delegate"),
    ('[runtime]\nrunc = 1\n', "[runtime]"),
    ("address = [\n", "invalid TOML"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, text: str,
                                               fragment: str) -> None:
    with pytest.raises(config.ConfigError, match=None) as info:
        config.load(_write(tmp_path, text))
    assert fragment in str(info.value) and "shim.toml" in str(info.value)


def test_a_named_but_missing_file_and_a_bad_env_delegate_are_errors(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not found"):
        config.load({config.CONFIG_ENV: str(tmp_path / "none.toml")})
    with pytest.raises(config.ConfigError, match="KATA_IPU_DELEGATE"):
        config.load({**_write(tmp_path, ""), config.DELEGATE_ENV: "qemu"})


def test_resolve_binary_uses_path_like_containerd(tmp_path: Path) -> None:
    exe = tmp_path / "containerd-shim-kata-v2"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert config.resolve_binary("containerd-shim-kata-v2", {"PATH": f"/nope:{tmp_path}"}) == (
        str(exe))
    assert config.resolve_binary("/abs/x", {"PATH": ""}) == "/abs/x"
    with pytest.raises(config.ConfigError, match="not found in"):
        config.resolve_binary("containerd-shim-kata-v2", {"PATH": "/nope"})


def test_the_shipped_example_is_valid_and_says_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "shim.toml"
    cfg = config.load({config.CONFIG_ENV: str(example)})
    assert cfg.source == str(example)
    defaults = config.ShimConfig(source=str(example))
    assert cfg == defaults
