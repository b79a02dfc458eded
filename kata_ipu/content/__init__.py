"""Content store in OCI image-layout form (``blobs/``, ``index.json``, ``oci-layout``).

Modules: :mod:`.store` (ContentStore: typed accessors, tags, single-flight fetch, usage),
:mod:`.ingest` (verify-while-streaming writers, resumable), :mod:`.follow` (readers of a blob
still being written), :mod:`.status` (progress objects), :mod:`.leases` (GC holds), :mod:`.gc`
(mark-and-sweep with a high-water mark), :mod:`.importer` (OCI layout directories and
docker-archive tarballs), :mod:`.errors`.

Imports: :mod:`kata_ipu.oci` (digests, media types, descriptors, manifests),
:mod:`kata_ipu.osutil` (atomic writes) and :mod:`kata_ipu.errors` only; never
:mod:`kata_ipu.image` (which imports ``content``).
"""
