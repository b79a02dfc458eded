"""runc's command line as go-runc v1.0 writes it (notes/ttrpc_shim.md §5)."""

from __future__ import annotations

from shim_hooks.runccli import parse


def test_go_runc_create() -> None:
    argv = ["--root", "/run/containerd/runc/k8s.io", "--log", "/b/log.json", "--log-format",
            "json", "--systemd-cgroup", "create", "--bundle", "/b", "--pid-file",
            "/b/init.pid", "--console-socket", "/tmp/pty1/pty.sock", "--no-pivot", "c1"]
    a = parse(argv)
    assert a.argv == tuple(argv)
    assert (a.root, a.log, a.command, a.bundle, a.container_id) == (
        "/run/containerd/runc/k8s.io", "/b/log.json", "create", "/b", "c1")
    assert a.globals["systemd-cgroup"] == "true"
    assert a.options["pid-file"] == "/b/init.pid" and a.options["no-pivot"] == "true"


def test_go_style_and_equals_forms() -> None:
    a = parse(["-root=/r", "-log", "/l", "--rootless=false", "create", "-b", "/bb", "--pid-file=/p",
               "id2"])
    assert (a.root, a.log, a.bundle, a.container_id) == ("/r", "/l", "/bb", "id2")
    assert a.globals["rootless"] == "false"


def test_delete_kill_and_no_command() -> None:
    a = parse(["--root", "/r", "delete", "--force", "c1"])
    assert (a.command, a.container_id, a.options) == ("delete", "c1", {"force": "true"})
    a = parse(["--root", "/r", "kill", "--all", "c1", "9"])
    assert (a.command, a.positional) == ("kill", ("c1", "9"))
    a = parse(["--version"])
    assert (a.command, a.globals, a.root) == ("", {"version": "true"}, "/run/runc")
