"""Test fixtures shipped with the package (pyroute2's habit), for users of the library too.

Real components in temporary directories: a distribution registry (:mod:`.registry`), OCI
image builders (:mod:`.ocibuild`), containerd (:mod:`.containerd`) and a CRI node on it
(:mod:`.cri`, :mod:`.crinode`), kata-ipud (:mod:`.daemon`), kata-ipu-shimd (:mod:`.shimd`),
the snapshotter (:mod:`.snapshotter`), plus small helpers (:mod:`.notified`, :mod:`.prereq`,
:mod:`.hostcheck`, :mod:`.treecmp`, :mod:`.wait`).

Imports: :mod:`kata_ipu` only, never ``guest_hooks`` and no VM or Go code; the VM and Go
harnesses and the image zoo are test support code in ``tests/support/`` (not installed).
Importing these modules has no side effects; each helper does its work only when called.
"""
