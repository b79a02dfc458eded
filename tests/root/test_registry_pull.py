"""Pulls from a real distribution registry (Debian's docker-registry), with skopeo/umoci as
oracles and a fault-injecting proxy for the failure cases."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from kata_ipu.content.errors import DigestMismatch, SizeMismatch
from kata_ipu.content.store import ContentStore
from kata_ipu.errors import Unauthenticated
from kata_ipu.image.credentials import Credentials
from kata_ipu.image.pull import PlatformNotFound, Puller, PullProgress
from kata_ipu.image.registry import (
    ManifestNotFound,
    RegistryUnavailable,
    RetryPolicy,
    StallTimeout,
    TotalTimeout,
)
from kata_ipu.image.transport import Timeouts
from kata_ipu.oci.manifest import EncryptedLayerUnsupported, UnsupportedMediaType
from kata_ipu.oci.platform import Platform
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs
from kata_ipu.testing.registry import (
    BlobFileServer,
    Fault,
    FaultProxy,
    RegistryServer,
    TokenServer,
    push,
)

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    require_programs("docker-registry", "skopeo", "umoci", "busybox", "htpasswd", "openssl")
    root = tmp_path_factory.mktemp("oci")
    tree = busybox_tree(root / "tree")
    busybox_layer = LayerBuilder().tree(tree).build()
    base = LayerBuilder().dir("etc").file("etc/os-release", b"ID=kata-ipu-test\n").build()
    mid = LayerBuilder().dir("usr").file("usr/mid", b"m" * 300_000).build()
    top_a = LayerBuilder().file("a.txt", b"A" * 200_000).build()
    top_b = LayerBuilder().file("b.txt", b"B" * 250_000).build()
    layout = OciLayout(root / "layout")
    bb = layout.add_image([busybox_layer], ref="busybox")
    a = layout.add_image([base, mid, top_a], ref="app-a")
    b = layout.add_image([base, mid, top_b], ref="app-b", compression="zstd")
    b_gz = layout.add_image([base, mid, top_b], ref="app-b-gz")
    arm = layout.add_image([base, top_a], ref="arm64", architecture="arm64", variant="v8",
                           tag_in_index=False)
    amd = layout.add_image([base, top_b], ref="amd64", tag_in_index=False)
    layout.add_index([amd, arm], ref="multi")
    unc = layout.add_image([base], ref="plain", compression="none")
    return {"layout": root / "layout", "tree": tree, "busybox": bb, "a": a, "b": b,
            "b_gz": b_gz, "arm": arm, "amd": amd, "plain": unc}


@pytest.fixture(scope="module")
def registry(images: dict[str, object], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("registry")
    with RegistryServer(work) as reg:
        layout = images["layout"]
        assert isinstance(layout, Path)
        for ref, repo in (("busybox", "test/busybox:1"), ("app-a", "test/app:a"),
                          ("app-b", "test/app:b"), ("app-b-gz", "test/app:b-gz"),
                          ("plain", "test/plain:1")):
            push(layout, ref, f"{reg.address}/{repo}", preserve_digests=True)
        push(layout, "multi", f"{reg.address}/test/multi:1", all_platforms=True)
        push(layout, "app-a", f"{reg.address}/test/docker:v2s2", preserve_digests=False,
             extra=["--format", "v2s2"])
        yield reg


def run(coro):
    return asyncio.run(coro)


def store_at(path: Path) -> ContentStore:
    return ContentStore.open(path)


def no_partials(store: ContentStore) -> bool:
    return not store.partial_ingests()


def test_pull_busybox_readable_by_skopeo_and_umoci(registry, images, tmp_path):
    store = store_at(tmp_path / "store")
    ref = f"{registry.address}/test/busybox:1"
    img = run(Puller(store, retry=FAST).pull(ref))
    # Oracle 1: skopeo reads the store and reports the digest the registry has.
    remote = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True).stdout)
    local = json.loads(subprocess.run(
        ["skopeo", "inspect", f"oci:{store.root}:{img.name}"],
        check=True, capture_output=True).stdout)
    assert local["Digest"] == remote["Digest"] == img.descriptor.digest
    assert local["Layers"] == remote["Layers"]
    # Oracle 2: umoci unpacks it and the busybox binary is byte-identical to the source.
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{store.root}:{img.name}",
                    str(tmp_path / "bundle")], check=True, capture_output=True)
    src = (images["tree"] / "bin/busybox").read_bytes()
    dst = (tmp_path / "bundle/rootfs/bin/busybox").read_bytes()
    assert hashlib.sha256(dst).digest() == hashlib.sha256(src).digest()
    # Typed accessors the rootfs builder uses.
    cfg = store.read_config(img.descriptor.digest)
    assert cfg.diff_ids == images["busybox"].diff_ids
    assert [p.exists() for _, p in store.layer_paths(img.descriptor.digest)] == [True]
    assert no_partials(store)
    assert all(b.done for b in img.blobs)


def test_second_pull_moves_only_the_new_layer(registry, images, tmp_path):
    store = store_at(tmp_path / "store")
    puller = Puller(store, retry=FAST)
    a = run(puller.pull(f"{registry.address}/test/app:a"))
    b = run(puller.pull(f"{registry.address}/test/app:b-gz"))
    new_layer = images["b_gz"].layers[2]
    assert b.bytes_fetched == new_layer.size + images["b_gz"].config.size
    assert a.manifest.layers[:2] == b.manifest.layers[:2]
    assert len(store.all_blobs()) == 2 + 2 + 4  # 2 manifests, 2 configs, 4 layers
    # zstd image with the same content: different layer blobs, pulled fine and readable.
    z = run(puller.pull(f"{registry.address}/test/app:b"))
    assert {d.media_type for d in z.manifest.layers} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"}
    plain = run(puller.pull(f"{registry.address}/test/plain:1"))
    assert plain.manifest.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar"


def test_platform_selection_from_index(registry, images, tmp_path):
    store = store_at(tmp_path / "store")
    ref = f"{registry.address}/test/multi:1"
    arm = run(Puller(store, retry=FAST, platform=Platform("linux", "arm64")).pull(ref))
    assert arm.descriptor.digest == images["arm"].manifest.digest
    assert arm.index_digest is not None and store.has(arm.index_digest)
    amd = run(Puller(store, retry=FAST, platform=Platform("linux", "amd64")).pull(ref))
    assert amd.descriptor.digest == images["amd"].manifest.digest
    with pytest.raises(PlatformNotFound, match="s390x"):
        run(Puller(store, retry=FAST, platform=Platform("linux", "s390x")).pull(ref))


def test_concurrent_pulls_are_single_flight(registry, images, tmp_path):
    store = store_at(tmp_path / "store")
    with FaultProxy(registry.address) as proxy:
        puller = Puller(store, retry=FAST)

        async def both():
            return await asyncio.gather(
                puller.pull(f"{proxy.address}/test/app:a"),
                puller.pull(f"{proxy.address}/test/app:a", name="again"),
                puller.pull(f"{proxy.address}/test/app:b-gz"))
        a1, a2, b = run(both())
    blob_gets = [r.path for r in proxy.requests if "/blobs/" in r.path and r.method == "GET"]
    assert len(blob_gets) == len(set(blob_gets)), "a digest was downloaded twice"
    assert a1.descriptor == a2.descriptor
    unique = {d.digest: d.size for d in (*images["a"].layers, images["a"].config,
                                         *images["b_gz"].layers, images["b_gz"].config)}
    assert a1.bytes_fetched + a2.bytes_fetched + b.bytes_fetched == sum(unique.values())


def test_htpasswd_basic_auth(images, tmp_path):
    with RegistryServer(tmp_path / "reg", auth="htpasswd", users={"alice": "s3cret"}) as reg:
        push(images["layout"], "busybox", f"{reg.address}/p/bb:1", creds=("alice", "s3cret"))
        store = store_at(tmp_path / "store")
        with pytest.raises(Unauthenticated):
            run(Puller(store, retry=FAST, credentials={}).pull(f"{reg.address}/p/bb:1"))
        assert not store.all_blobs() or store.images() == []
        good = Puller(store, retry=FAST,
                      credentials={reg.address: Credentials("alice", "s3cret")})
        img = run(good.pull(f"{reg.address}/p/bb:1"))
        assert img.descriptor.digest == images["busybox"].manifest.digest
        # Redirect blob GETs to a "CDN" that must not receive the Authorization header.
        with BlobFileServer(reg) as cdn, FaultProxy(reg.address, [Fault(
            "redirect", lambda m, p: "/blobs/" in p and m == "GET",
            location=lambda p: cdn.url_for(p.rsplit("/", 1)[1]))]) as proxy:
            store2 = store_at(tmp_path / "store2")
            img2 = run(Puller(store2, retry=FAST, credentials={
                proxy.address: Credentials("alice", "s3cret")}).pull(f"{proxy.address}/p/bb:1"))
        assert img2.descriptor.digest == img.descriptor.digest
        assert cdn.requests, "the redirect was not followed"
        assert all("Authorization" not in r.headers for r in cdn.requests)
        assert any("Authorization" in r.headers for r in proxy.requests)


def test_token_auth(images, tmp_path):
    (tmp_path / "ts").mkdir()
    with TokenServer(tmp_path / "ts", users={"bob": "pw"},
                     refresh_tokens={"idtok-123": "carol"}) as ts, \
            RegistryServer(tmp_path / "reg", auth="token", token_server=ts) as reg:
        # The test token server only grants pull: push to an open registry and copy its
        # storage (the same filesystem-driver layout) under the token-protected one.
        with RegistryServer(tmp_path / "open") as open_reg:
            push(images["layout"], "busybox", f"{open_reg.address}/t/bb:1")
            subprocess.run(["cp", "-a", f"{open_reg.storage}/.", str(reg.storage)], check=True)
        store = store_at(tmp_path / "store")
        with pytest.raises(Unauthenticated):
            run(Puller(store, retry=FAST, credentials={}).pull(f"{reg.address}/t/bb:1"))
        puller = Puller(store, retry=FAST, credentials={reg.address: Credentials("bob", "pw")})
        img = run(puller.pull(f"{reg.address}/t/bb:1"))
        assert img.descriptor.digest == images["busybox"].manifest.digest
        ok = [r for r in ts.requests if r["result"] == "ok" and r["user"] == "bob"]
        assert ok and all(r["scope"] == "repository:t/bb:pull" for r in ok)
        fetched = puller.client(reg.address).auth.token_fetches
        run(puller.pull(f"{reg.address}/t/bb:1"))
        assert puller.client(reg.address).auth.token_fetches == fetched  # cached per scope
        with pytest.raises(Unauthenticated, match="refused"):
            run(Puller(store_at(tmp_path / "s3"), retry=FAST, credentials={
                reg.address: Credentials("bob", "wrong")}).pull(f"{reg.address}/t/bb:1"))
        # config.json "identitytoken": the OAuth2 refresh_token POST flow.
        idt = run(Puller(store_at(tmp_path / "s4"), retry=FAST, credentials={
            reg.address: Credentials(identity_token="idtok-123")}).pull(f"{reg.address}/t/bb:1"))
        assert idt.descriptor.digest == img.descriptor.digest
        assert {"user": "carol", "scope": "repository:t/bb:pull", "grant": "refresh_token",
                "result": "ok"} in ts.requests


def _blob_of(images, key: str, i: int) -> str:
    return images[key].layers[i].digest


def test_500_twice_then_success(registry, images, tmp_path):
    digest = _blob_of(images, "busybox", 0)
    fault = Fault("status", lambda m, p: p.endswith(digest), status=500, times=2)
    with FaultProxy(registry.address, [fault]) as proxy:
        store = store_at(tmp_path / "store")
        img = run(Puller(store, retry=FAST).pull(f"{proxy.address}/test/busybox:1"))
    assert fault.hits == 2
    assert [r.fault for r in proxy.requests if r.path.endswith(digest)] == ["status", "status",
                                                                            ""]
    assert store.has(digest) and img.bytes_fetched > 0


def test_stall_mid_blob_resumes_with_range(registry, images, tmp_path):
    digest = _blob_of(images, "busybox", 0)
    fault = Fault("stall", lambda m, p: p.endswith(digest), after_bytes=100_000, times=1)
    with FaultProxy(registry.address, [fault]) as proxy:
        store = store_at(tmp_path / "store")
        run(Puller(store, retry=FAST, timeouts=Timeouts(stall=1.0)).pull(
            f"{proxy.address}/test/busybox:1"))
    gets = [r for r in proxy.requests if r.path.endswith(digest)]
    assert len(gets) == 2 and gets[1].headers.get("Range") == "bytes=100000-"
    assert hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest() == digest[7:]


def test_stall_forever_times_out_and_keeps_partial_for_resume(registry, images, tmp_path):
    digest = _blob_of(images, "busybox", 0)
    fault = Fault("stall", lambda m, p: p.endswith(digest), after_bytes=50_000)
    store = store_at(tmp_path / "store")
    with FaultProxy(registry.address, [fault]) as proxy:
        with pytest.raises(StallTimeout, match=r"no data for 1s"):
            run(Puller(store, retry=RetryPolicy(attempts=2, base_delay=0.01),
                       timeouts=Timeouts(stall=1.0)).pull(f"{proxy.address}/test/busybox:1"))
        assert not store.has(digest)
        # Two attempts, each delivering 50 000 bytes before stalling (the second resumed).
        assert store.partial_ingests() == {digest: 100_000}
        fault.times = fault.hits  # stop stalling: the next pull resumes
        run(Puller(store, retry=FAST).pull(f"{proxy.address}/test/busybox:1"))
    assert store.has(digest) and no_partials(store)
    ranges = [r.headers.get("Range") for r in proxy.requests if r.path.endswith(digest)]
    assert ranges == [None, "bytes=50000-", "bytes=100000-"]


@pytest.mark.parametrize(("kind", "error", "text"), [
    ("corrupt", DigestMismatch, "expected sha256:"),
    ("extra", SizeMismatch, "larger than declared"),
    ("truncate", SizeMismatch, "smaller than declared"),
])
def test_bad_blob_leaves_nothing(registry, images, tmp_path, kind, error, text):
    digest = _blob_of(images, "busybox", 0)
    with FaultProxy(registry.address, [Fault(kind, lambda m, p: p.endswith(digest))]) as proxy:
        store = store_at(tmp_path / "store")
        with pytest.raises(error, match=text) as info:
            run(Puller(store, retry=FAST).pull(f"{proxy.address}/test/busybox:1"))
    assert digest in str(info.value) or getattr(info.value, "expected", "") == digest
    if isinstance(info.value, DigestMismatch):
        assert info.value.expected == digest and info.value.actual != digest
    assert not store.has(digest) and no_partials(store) and store.images() == []


def test_failing_mirror_falls_back(registry, images, tmp_path):
    with FaultProxy(registry.address, [Fault("status", lambda m, p: True, status=503)]) as bad:
        certs = tmp_path / "certs.d" / registry.address
        certs.mkdir(parents=True)
        (certs / "hosts.toml").write_text(
            f'server = "http://{registry.address}"\n'
            f'[host."http://{bad.address}"]\n  capabilities = ["pull", "resolve"]\n')
        store = store_at(tmp_path / "store")
        img = run(Puller(store, retry=FAST, hosts_dir=tmp_path / "certs.d").pull(
            f"{registry.address}/test/busybox:1"))
    assert img.descriptor.digest == images["busybox"].manifest.digest
    assert bad.requests and all("ns=" in r.path for r in bad.requests)


def test_working_mirror_is_used_first(registry, images, tmp_path):
    with FaultProxy(registry.address) as mirror:
        certs = tmp_path / "certs.d" / "registry.invalid:5000"
        certs.mkdir(parents=True)
        (certs / "hosts.toml").write_text(
            f'server = "https://registry.invalid:5000"\n'
            f'[host."http://{mirror.address}"]\n  capabilities = ["pull", "resolve"]\n')
        store = store_at(tmp_path / "store")
        img = run(Puller(store, retry=FAST, hosts_dir=tmp_path / "certs.d").pull(
            "registry.invalid:5000/test/busybox:1"))
    assert img.name == "registry.invalid:5000/test/busybox:1"
    assert store.resolve(img.name).digest == images["busybox"].manifest.digest


def test_docker_schema2_and_pull_by_digest(registry, images, tmp_path):
    store = store_at(tmp_path / "store")
    puller = Puller(store, retry=FAST)
    img = run(puller.pull(f"{registry.address}/test/docker:v2s2"))
    assert img.descriptor.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert {d.media_type for d in img.manifest.layers} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"}
    docker = store.read_manifest(img.registry_digest)  # the registry's bytes are kept too
    assert docker.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert [d.digest for d in docker.layers] == [d.digest for d in img.manifest.layers]
    remote = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false",
         f"docker://{registry.address}/test/docker:v2s2"], check=True,
        capture_output=True).stdout)
    assert remote["mediaType"] == docker.media_type
    assert img.config.diff_ids == images["a"].diff_ids
    pinned = f"{registry.address}/test/app@{images['a'].manifest.digest}"
    by_digest = run(puller.pull(pinned))
    assert by_digest.descriptor.digest == images["a"].manifest.digest
    assert by_digest.name == pinned
    # skopeo reads the docker-format image out of the OCI store too.
    proc = subprocess.run(["skopeo", "inspect", f"oci:{store.root}:{img.name}"],
                          check=False, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["Digest"] == img.descriptor.digest


def test_corrupt_manifest_is_rejected(registry, tmp_path):
    fault = Fault("corrupt", lambda m, p: "/manifests/" in p)
    with FaultProxy(registry.address, [fault]) as proxy:
        store = store_at(tmp_path / "store")
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            run(Puller(store, retry=FAST).pull(f"{proxy.address}/test/busybox:1"))
    assert store.all_blobs() == [] and store.images() == [] and no_partials(store)


def test_progress_objects(registry, images, tmp_path):
    store = store_at(tmp_path / "store")
    progress = PullProgress(f"{registry.address}/test/app:a")
    img = run(Puller(store, retry=FAST).pull(progress.reference, progress=progress))
    snap = progress.snapshot()
    expected = {d.digest: d.size for d in (*images["a"].layers, images["a"].config)}
    assert {b.digest: b.total for b in snap} == expected
    assert all(b.offset == b.total and b.state == "done" for b in snap)
    assert progress.done_bytes == progress.total_bytes == sum(expected.values())
    assert progress.phase == "done" and img.blobs == snap


def test_total_timeout_is_distinct_from_stall(registry, images, tmp_path):
    digest = _blob_of(images, "busybox", 0)
    fault = Fault("stall", lambda m, p: p.endswith(digest), after_bytes=10_000)
    with FaultProxy(registry.address, [fault]) as proxy:
        store = store_at(tmp_path / "store")
        with pytest.raises(TotalTimeout, match=r"not complete within 0\.5s"):
            run(Puller(store, retry=FAST, timeouts=Timeouts(stall=30, total=0.5)).pull(
                f"{proxy.address}/test/busybox:1"))
    assert not store.has(digest)


CHILD_PULL = """
import asyncio, sys
from kata_ipu.content.store import ContentStore
from kata_ipu.image.pull import Puller
from kata_ipu.image.transport import Timeouts
asyncio.run(Puller(ContentStore.open(sys.argv[2]), timeouts=Timeouts(stall=600)).pull(sys.argv[1]))
"""


def test_crash_mid_blob_then_resume(registry, images, tmp_path):
    """A puller process killed with SIGKILL mid-blob leaves a partial ingest (and releases its
    lock); the next pull resumes it with Range and the result verifies."""
    import os
    import sys
    import time

    digest = _blob_of(images, "busybox", 0)
    fault = Fault("stall", lambda m, p: p.endswith(digest), after_bytes=200_000, times=1)
    store = store_at(tmp_path / "store")
    with FaultProxy(registry.address, [fault]) as proxy:
        child = subprocess.Popen([sys.executable, "-c", CHILD_PULL,
                                  f"{proxy.address}/test/busybox:1", str(store.root)],
                                 env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        try:
            for _ in range(600):  # wait (not a timing assertion) until the bytes are on disk
                if store.partial_ingests().get(digest) == 200_000:
                    break
                time.sleep(0.05)
        finally:
            child.kill()
            child.wait()
        partial = store.partial_ingests()
        assert partial[digest] == 200_000
        assert not store.has(digest) and store.images() == []
        config = images["busybox"].config
        # The killed process may or may not have finished the (concurrent) config blob.
        config_left = 0 if store.has(config.digest) else config.size - partial.get(
            config.digest, 0)
        img = run(Puller(store, retry=FAST).pull(f"{proxy.address}/test/busybox:1"))
    ranges = [r.headers.get("Range") for r in proxy.requests if r.path.endswith(digest)]
    assert ranges == [None, "bytes=200000-"]
    # Only the layer's tail (and whatever of the config was missing) moves now.
    assert img.bytes_fetched == images["busybox"].layers[0].size - 200_000 + config_left
    assert hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest() == digest[7:]
    assert no_partials(store)


def test_unknown_tag_and_repository(registry, tmp_path):
    store = store_at(tmp_path / "store")
    with pytest.raises(ManifestNotFound, match=r"test/busybox:nope not found"):
        run(Puller(store, retry=FAST).pull(f"{registry.address}/test/busybox:nope"))
    assert store.all_blobs() == [] and store.images() == []


def _odd_layout(path: Path, layer_type: str) -> None:
    """An OCI layout whose single layer has ``layer_type`` (the registry does not care)."""
    from kata_ipu.testing.ocibuild import MT_CONFIG, MT_MANIFEST, sha256_digest

    layout = OciLayout(path)
    layer = layout.add_blob(b"\x04\x22\x4d\x18 not really a tar", layer_type)
    cfg = layout.add_blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"x")]}}).encode(), MT_CONFIG)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                           "config": cfg.to_json(), "layers": [layer.to_json()]}).encode()
    mdesc = layout.add_blob(manifest, MT_MANIFEST)
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        **mdesc.to_json(), "annotations": {"org.opencontainers.image.ref.name": "odd"}}]}))


@pytest.mark.parametrize(("tag", "layer_type", "error", "text"), [
    ("lz4", "application/vnd.oci.image.layer.v1.tar+lz4", UnsupportedMediaType,
     "unsupported media type"),
    ("enc", "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
     EncryptedLayerUnsupported, "encrypted"),
])
def test_unusable_layers_refused_before_download(registry, tmp_path, tag, layer_type, error,
                                                 text):
    _odd_layout(tmp_path / "odd", layer_type)
    push(tmp_path / "odd", "odd", f"{registry.address}/test/odd:{tag}")
    store = store_at(tmp_path / "store")
    with FaultProxy(registry.address) as proxy, pytest.raises(error, match=text) as info:
        run(Puller(store, retry=FAST).pull(f"{proxy.address}/test/odd:{tag}"))
    assert "sha256:" in str(info.value)
    assert not [r for r in proxy.requests if "/blobs/" in r.path]  # nothing downloaded
    assert store.all_blobs() == [] and store.images() == [] and no_partials(store)


def test_tls_registry_with_hosts_toml_ca(images, tmp_path):
    """A registry over TLS: trusted through hosts.toml ``ca``; refused without it."""
    with RegistryServer(tmp_path / "reg", tls=True) as reg:
        push(images["layout"], "busybox", f"{reg.address}/s/bb:1")
        certs = tmp_path / "certs.d" / reg.address
        certs.mkdir(parents=True)
        (certs / "hosts.toml").write_text(f'server = "https://{reg.address}"\nca = "{reg.cert}"\n')
        store = store_at(tmp_path / "store")
        img = run(Puller(store, retry=FAST, hosts_dir=tmp_path / "certs.d").pull(
            f"{reg.address}/s/bb:1"))
        assert img.descriptor.digest == images["busybox"].manifest.digest
        (certs / "hosts.toml").write_text(f'server = "https://{reg.address}"\n')
        with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            run(Puller(store_at(tmp_path / "s2"), retry=FAST,
                       hosts_dir=tmp_path / "certs.d").pull(f"{reg.address}/s/bb:1"))
        # Default for a loopback registry is plain HTTP, which a TLS server rejects clearly.
        with pytest.raises(RegistryUnavailable):
            run(Puller(store_at(tmp_path / "s3"), retry=FAST).pull(f"{reg.address}/s/bb:1"))
