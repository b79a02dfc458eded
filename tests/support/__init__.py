"""Support code the tests import, not shipped in the package: the VM and Go harnesses.

What lives here needs more than a user of the library has, or is test data only: the QEMU
guest (:mod:`.guest`, :mod:`.guestimage`, :mod:`.vmdriver`), the test agent that runs inside
it and its codec (:mod:`.guest_agent`, which imports ``guest_hooks``; :mod:`.agentproto`), the
Go peers built from Debian's Go sources (:mod:`.gopeer` with ``goecho/``, :mod:`.gosnap` with
``gosnapsuite/``), the rootfs image zoo (:mod:`.images`) and the cache they share
(:mod:`.cache`). Fixtures a library user would want (registry, containerd, CRI node, daemon)
stay public in :mod:`kata_ipu.testing`; nothing there imports this package.

Imports: anything of the project, plus the standard library. Nothing runs at import time.
"""
