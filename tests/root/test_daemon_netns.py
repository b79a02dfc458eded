"""The IPU on its own machine: kata-ipud in a network namespace, reached only over TCP.

A veth pair joins the host and a private namespace (addresses on a /30 link inside this
test's own namespace, nothing routed anywhere else). The daemon runs in the namespace
(``nsenter --net``: network only, so its block devices are the host's), pulls from a registry
listening on the host side of the link, and the host asks for a rootfs over TCP with a shared
token. The host then mounts the exported block device: the control path needed nothing but
the network, the data path nothing but the block device.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, free_port, push

CLI = str(Path(sys.executable).with_name("kata-ipu"))
HOST_IP, IPU_IP = "10.231.77.1", "10.231.77.2"


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require_programs("nsenter")
    from pyroute2 import IPRoute, NetNS, netns

    name = f"kipu-{os.getpid()}"
    host_if, ipu_if = f"kh{os.getpid() % 100000}", f"kn{os.getpid() % 100000}"
    netns.create(name)
    try:
        with IPRoute() as ip:
            ip.link("add", ifname=host_if, kind="veth", peer=ipu_if)
            idx = ip.link_lookup(ifname=ipu_if)[0]
            ip.link("set", index=idx, net_ns_fd=name)
            hidx = ip.link_lookup(ifname=host_if)[0]
            ip.addr("add", index=hidx, address=HOST_IP, prefixlen=30)
            ip.link("set", index=hidx, state="up")
        with NetNS(name) as ns:
            nidx = ns.link_lookup(ifname=ipu_if)[0]
            ns.addr("add", index=nidx, address=IPU_IP, prefixlen=30)
            ns.link("set", index=nidx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        with IPRoute() as ip:
            for link in ip.link_lookup(ifname=host_if):
                ip.link("del", index=link)
        netns.remove(name)


def test_ipu_in_its_own_network_namespace_over_tcp(netns: str, tmp_path: Path) -> None:
    require_programs("docker-registry", "skopeo")
    # The registry listens on the host end of the link, where the namespaced IPU can reach it.
    reg_dir = tmp_path / "registry"
    reg_dir.mkdir()
    with RegistryServer(reg_dir, host=HOST_IP) as registry:
        layout = OciLayout(tmp_path / "oci")
        layout.add_image([LayerBuilder().tree(busybox_tree(tmp_path / "tree")).build(),
                          LayerBuilder().file("etc/motd", b"served by a remote IPU\n").build()],
                         ref="v1")
        ref = f"{registry.address}/remote/busybox:v1"
        push(tmp_path / "oci", "v1", ref)

        token = tmp_path / "token"
        token.write_text(secrets.token_hex(24))
        token.chmod(0o600)
        port = free_port()
        (tmp_path / "ipu").mkdir()
        ipu = IpuDaemon(tmp_path / "ipu", pool_size="2G", tcp=f"{IPU_IP}:{port}",
                        token_file=token, unix=False, metrics=False,
                        insecure_registries=(registry.address,))
        try:
            ipu.start(wrapper=("nsenter", f"--net=/run/netns/{netns}"))
            base = [CLI, "--address", f"tcp://{IPU_IP}:{port}"]
            denied = subprocess.run([*base, "ls"], capture_output=True, text=True, check=False)
            assert denied.returncode == 1 and "token" in denied.stderr
            out = subprocess.run([*base, "--token-file", str(token), "prepare", "--id", "r1",
                                  ref, "--json"], capture_output=True, text=True, check=True)
            dev = json.loads(out.stdout)
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            subprocess.run(["mount", "-o", "ro", dev["path"], str(mnt)], check=True)
            try:
                assert (mnt / "etc/motd").read_text() == "served by a remote IPU\n"
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
            subprocess.run([*base, "--token-file", str(token), "release", "r1"], check=True)
        finally:
            ipu.teardown()
