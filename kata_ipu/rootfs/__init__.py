"""Unpack an OCI image once into a filesystem image (ext4, or erofs as a read-only base).

Modules, one job each: :mod:`.oci` (typed manifest/config, the ``ImageSource`` protocol, OCI
layouts), :mod:`.tarstream` (verify, decompress, hash, prefetch), :mod:`.resolve` (dir-fd
containment), :mod:`.fsops` (filesystem operations interface), :mod:`.apply` (OCI layer
semantics, whiteouts), :mod:`.sizing` (honest ext4 size), :mod:`.writers` (loop-mount/stage
ext4 and erofs), :mod:`.mount` (loop devices and mounts), :mod:`.builder` (the entry point).
Importing the package does nothing.
"""
