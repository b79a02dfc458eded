"""Runs inside the Kata guest: find the hot-plugged rootfs disk and mount it (stdlib + pyudev).

* :mod:`guest_hooks.pcipath` — Kata PCI paths (``02/01``) and their sysfs resolution.
* :mod:`guest_hooks.device` — wait for the disk by its Kata PCI path on kernel uevents.
* :mod:`guest_hooks.mount` — mount it: ext4 read-write (after ``e2fsck -p``), or read-only
  (erofs, read-only disks) under a tmpfs-backed overlay; unmount, also after surprise removal.
* :mod:`guest_hooks.oci` — OCI hook input: state JSON on stdin, bundle ``config.json``,
  ``io.katacontainers.ipu.rootfs.*`` annotations.
* ``python3 -m guest_hooks`` — ``mount`` / ``umount`` commands and the ``hook`` entry point.
* :mod:`guest_hooks.errors` — one root, one class per failure (``kind`` names it).

Importing has no side effects; pyudev is imported only when waiting for a device.
"""
