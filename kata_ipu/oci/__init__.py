"""The OCI image-spec types, as a leaf package: what ``image/`` and ``content/`` share.

Modules: :mod:`.digest` (``algorithm:hex`` validation, hashers), :mod:`.mediatypes` (OCI and
Docker schema2 media types and their classification), :mod:`.platform` (os/arch/variant,
the host's platform, containerd's matching rules), :mod:`.manifest` (typed Descriptor,
Manifest, Index, ImageConfig parsed from JSON at the boundary).

Imports: the standard library and :mod:`kata_ipu.errors` only, nothing else of the project,
so that any package may use it and none of them forms a cycle through it. No state, no I/O.
"""
