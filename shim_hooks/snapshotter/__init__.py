"""``kata-ipu-snapshotter``: containerd's ``ipu`` remote snapshotter, on the host.

containerd talks to it as a proxy plugin (``[proxy_plugins.ipu] type = "snapshot"``) over the
``containerd.services.snapshots.v1.Snapshots`` gRPC API. It is an overlayfs snapshotter with
one addition: image layers whose files the IPU already holds are never fetched or unpacked on
the host. The IPU (``kata-ipud``) is reached only through the ``kataipu.v1`` API.

Terms (containerd's, see its ``snapshots/snapshotter.go``): an *active* snapshot is writable
and named by its ``key``; a *committed* snapshot is read-only and named by its ``name``; every
snapshot but the first of a chain has a committed ``parent``. containerd's metadata layer
calls this backend with its own names (``<namespace>/<n>/<key>``), so one backend snapshot
serves every namespace.

Importing a layer, the remote way (containerd 1.6 ``unpacker.go``; with CRI's
``disable_snapshot_annotations = false`` each layer's labels name the image)::

    Prepare("ns/7/extract-…-<chain k>", parent=<chain k-1>,
            labels={containerd.io/snapshot.ref: <chain k>,
                    containerd.io/snapshot/cri.image-ref: registry/repo:tag,
                    containerd.io/snapshot/cri.manifest-digest: sha256:M,
                    containerd.io/snapshot/cri.layer-digest: sha256:L, ...})
        ─▶ the IPU pulls and builds registry/repo@sha256:M (once per image: this call
           waits for it, so PullImage returns with the image ready on the IPU)
        ─▶ the chain id of the image's first k layers must be <chain k>
        ─▶ commit "ipu/<n>/<chain k>" — a *remote* snapshot: (repo@M, first k of n layers),
           no files on the host
        ─▶ ALREADY_EXISTS: containerd finds the commit by its snapshot.ref label, skips
           downloading and unpacking the layer, and goes on with the next one

Running a container on a remote chain::

    Prepare("ns/9/<container id>", parent=<remote chain>)  →  overlay:
        lowerdir = <root>/lowers/<id>/fs   the IPU's copy-on-write clone of the base of
                                           (repo@M, k layers), exported to the host and
                                           mounted read-only (ext4, noload): a *lower*, one
                                           per (image, k) and host, shared by every container
        upperdir, workdir                  the container's own, on the host

Every runtime handler gets a correct root from these mounts (runc pods, pause containers).
The kata-ipu shim proxy instead asks the IPU for a writable clone of the same base, by the
digest the lower's ``lower.json`` names (:mod:`shim_hooks.snapshotter.chain`), and hands that
block device to runc or Kata. A lower is mounted while an active or view snapshot needs it,
and released (unmounted, its clone released on the IPU) when the last one is removed.

Falling back: with the IPU unreachable, refusing for reasons of its own (registry, space,
credentials) or without image labels, a layer is prepared the local way — an overlayfs
active snapshot that containerd fetches and unpacks into, exactly as containerd's overlayfs
snapshotter does — and the log says why. An image the IPU finds broken or hostile
(INVALID_ARGUMENT, DATA_LOSS) fails the Prepare, and so CRI's PullImage, with the IPU's reason.
Removing the last remote snapshot of an image asks the IPU to remove that image.

Modules: :mod:`.model` (typed records, chain ids), :mod:`.filters` (containerd's filter
syntax), :mod:`.store` (the SQLite metadata), :mod:`.lowers` (IPU clones mounted on the host),
:mod:`.remote` (when and how a layer comes from the IPU), :mod:`.snapshotter` (containerd's
semantics), :mod:`.service` (gRPC), :mod:`.chain` (the files the shim proxy reads; stdlib
only), :mod:`.config`, :mod:`.main`. Nothing here runs at import time.
"""
