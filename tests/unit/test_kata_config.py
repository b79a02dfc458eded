"""configs/kata loaded the way Kata's runtimes load them (tests/support/kataconfig.py).

Installed as the README says (a copy of the stock file and config.d/ in their own directory,
the containerd handler's ConfigPath naming the stock file), the merged configuration must pass
Kata's own checks and keep what kata-ipu needs. Each mistake issue 16 found must be caught.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from tests.support.kataconfig import (
    KataConfigError,
    Runtime,
    block_rootfs_problems,
    load,
    validate,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KATA = CONFIGS / "kata"
INSTALL_DIR = {Runtime.GO: "kata-ipu", Runtime.RUST: "kata-ipu-rs"}


def _stock_kernel_params(runtime: Runtime) -> str:
    stock = tomllib.loads((KATA / runtime.value / "configuration.toml").read_text())
    return str(stock["hypervisor"]["qemu"]["kernel_params"])


def _install(root: Path, runtime: Runtime) -> Path:
    target = root / "etc" / "kata-containers" / INSTALL_DIR[runtime]
    shutil.copytree(KATA / runtime.value, target)
    return target / "configuration.toml"


def _handler_config_path(snippet: Path) -> str:
    runtimes = tomllib.loads(snippet.read_text())["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"]["runtimes"]
    return str(runtimes["kata-ipu"]["options"]["ConfigPath"])


@pytest.mark.parametrize("runtime", list(Runtime))
def test_installed_configuration_passes_kata_and_keeps_a_block_rootfs(
        tmp_path: Path, runtime: Runtime) -> None:
    cfg = load(_install(tmp_path, runtime), runtime)
    assert [p.name for p in cfg.drop_ins] == ["50-kata-ipu.toml"]
    validate(cfg)
    assert block_rootfs_problems(cfg, _stock_kernel_params(runtime)) == []
    # the whole string: Kata's defaults first, then kata-ipu's
    assert cfg.qemu()["kernel_params"].split() == [
        *_stock_kernel_params(runtime).split(), "agent.hotplug_timeout=30"]


@pytest.mark.parametrize("snippet", sorted((CONFIGS / "containerd").glob("kata-ipu-*.toml")),
                         ids=lambda p: p.name)
def test_containerd_config_path_names_the_full_file(tmp_path: Path, snippet: Path) -> None:
    config_path = _handler_config_path(snippet)
    _install(tmp_path, Runtime.GO)
    cfg = load(tmp_path / config_path.lstrip("/"), Runtime.GO)
    validate(cfg)
    assert block_rootfs_problems(cfg, _stock_kernel_params(Runtime.GO)) == []


def test_the_drop_in_alone_as_config_path_is_refused_by_kata(tmp_path: Path) -> None:
    # what the 1.6/1.7 snippets did before: ConfigPath naming the drop-in
    lone = tmp_path / "configuration-ipu.toml"
    shutil.copy(KATA / "go" / "config.d" / "50-kata-ipu.toml", lone)
    with pytest.raises(KataConfigError, match="cannot enable virtio-fs without daemon path"):
        validate(load(lone, Runtime.GO))


def test_a_drop_in_kernel_params_replaces_katas_defaults(tmp_path: Path) -> None:
    path = _install(tmp_path, Runtime.GO)
    (path.parent / "config.d" / "50-kata-ipu.toml").write_text(
        '[hypervisor.qemu]\nmachine_type = "q35"\ndisable_block_device_use = false\n'
        'block_device_driver = "virtio-blk"\nkernel_params = "agent.hotplug_timeout=30"\n')
    problems = block_rootfs_problems(load(path, Runtime.GO), _stock_kernel_params(Runtime.GO))
    assert len(problems) == 1 and "lost Kata's defaults" in problems[0]
    assert "systemd.unified_cgroup_hierarchy=1" in problems[0]


def test_a_later_drop_in_wins_key_by_key(tmp_path: Path) -> None:
    path = _install(tmp_path, Runtime.GO)
    (path.parent / "config.d" / "90-site.toml").write_text(
        '[hypervisor.qemu]\nblock_device_driver = "virtio-scsi"\n')
    cfg = load(path, Runtime.GO)
    assert [p.name for p in cfg.drop_ins] == ["50-kata-ipu.toml", "90-site.toml"]
    validate(cfg)  # Kata takes it ...
    problems = block_rootfs_problems(cfg, _stock_kernel_params(Runtime.GO))
    # ... but the guest would get a SCSI address, not a PCI path; the rest of 50- survives
    assert len(problems) == 1 and "virtio-scsi" in problems[0]


def test_runtime_rs_refuses_the_go_driver_name(tmp_path: Path) -> None:
    path = _install(tmp_path, Runtime.RUST)
    shutil.copy(KATA / "go" / "config.d" / "50-kata-ipu.toml",
                path.parent / "config.d" / "50-kata-ipu.toml")
    with pytest.raises(KataConfigError, match="virtio-blk is unsupported block device type"):
        validate(load(path, Runtime.RUST))


@pytest.mark.parametrize("runtime", list(Runtime))
def test_a_symlinked_configuration_loses_its_drop_ins(tmp_path: Path, runtime: Runtime) -> None:
    # Kata resolves ConfigPath before it looks for config.d: a symlink to the stock file in
    # /opt/kata reads the drop-ins beside the stock file, not beside the link
    stock_dir = tmp_path / "opt" / "kata"
    stock_dir.mkdir(parents=True)
    shutil.copy(KATA / runtime.value / "configuration.toml", stock_dir / "configuration.toml")
    site = tmp_path / "etc" / "kata-ipu"
    shutil.copytree(KATA / runtime.value / "config.d", site / "config.d")
    (site / "configuration.toml").symlink_to(stock_dir / "configuration.toml")
    cfg = load(site / "configuration.toml", runtime)
    assert cfg.drop_ins == ()
    assert block_rootfs_problems(cfg, _stock_kernel_params(runtime)) != []
