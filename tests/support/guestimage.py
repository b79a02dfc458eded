"""The Kata-like guest for VM tests: a Debian root image, an initramfs that boots it, and the
project's guest code copied in at boot.

Three pieces, each cached outside the repository under :func:`tests.support.guest.cache_dir`
(``KATA_IPU_TEST_CACHE``, default ``/var/cache/kata-ipu-tests/guest``) and keyed by content:

* :func:`root_image` — ``debootstrap --variant=minbase`` of Debian bookworm plus ``python3``,
  ``python3-pyudev``, ``runc`` and ``e2fsprogs``, trimmed, written into a raw ext4 image with
  ``mkfs.ext4 -d``. The key is the hash of the recipe (suite, mirror, package list, trim list,
  :data:`RECIPE_VERSION`), so the slow build (minutes) happens once per recipe, never per code
  change. The cache is never required: a missing image is built.
* :func:`project_payload` — the project's guest code (``guest_hooks/``, ``kata_ipu/ttrpc/`` and
  the ``kata_ipu/osutil/`` it imports, the test agent and its codec), read from this checkout,
  so every run tests the current code.
* :func:`boot_initramfs` — busybox + the virtio modules + :data:`BOOT_INIT` + the payload. The
  init is "tiny" on purpose (Kata's agent-as-init shape): it loads the modules, finds the root
  disk by its virtio serial, mounts it read-only under a tmpfs overlay, copies the payload to
  ``/opt/kata-ipu``, and ``switch_root``\\ s to the test agent (PID 1).

Nothing runs at import time.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kata_ipu.executor import DEFAULT, Executor
from tests.support.guest import Kernel, _cache_lock, initramfs

RECIPE_VERSION = "1"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-pyudev", "runc", "e2fsprogs")
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
        "var/cache/apt/archives", "var/lib/apt/lists", "usr/share/zoneinfo")
ROOT_SERIAL = "kata-guest-root"
AGENT_PORT = "agent.channel.0"
GUEST_HOOK_PATH = "/usr/share/oci/hooks"  # Kata's guest_hook_path; the image ships our hook
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "overlay", "erofs")
REPO = Path(__file__).resolve().parents[2]

# The guest code, relative to the checkout. Only stdlib-importing modules: the guest has
# Debian's python3 3.11 and python3-pyudev, nothing from PyPI.
PAYLOAD_FILES = (
    "kata_ipu/__init__.py",
    "kata_ipu/errors.py",
    "kata_ipu/protowire.py",
    "tests/__init__.py",
    "tests/support/__init__.py",
    "tests/support/agentproto.py",
    "tests/support/guest_agent.py",
)
PAYLOAD_DIRS = ("kata_ipu/ttrpc", "kata_ipu/osutil", "guest_hooks")

BOOT_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /lower /up /newroot /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "GUEST-INSMOD-FAILED $m"; done
root=""
i=0
while [ -z "$root" ] && [ $i -lt 300 ]; do
  for d in /sys/block/vd*; do
    [ "$(cat $d/serial 2>/dev/null)" = "@SERIAL@" ] && root=${d##*/}
  done
  [ -z "$root" ] && { usleep 100000; i=$((i+1)); }
done
[ -n "$root" ] || { echo "GUEST-BOOT-FAILED no disk with serial @SERIAL@"; poweroff -f; }
mount -t ext4 -o ro,noload /dev/$root /lower || { echo "GUEST-BOOT-FAILED mount"; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /up
mkdir -p /up/upper /up/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/up/upper,workdir=/up/work /newroot \
  || { echo "GUEST-BOOT-FAILED overlay"; poweroff -f; }
mkdir -p /newroot/opt
cp -a /payload /newroot/opt/kata-ipu
for s in prestart poststop; do
  mkdir -p /newroot@HOOKS@/$s
  printf '#!/bin/sh\nPYTHONPATH=/opt/kata-ipu exec /usr/bin/python3 -m guest_hooks hook\n' \
    > /newroot@HOOKS@/$s/50-kata-ipu-rootfs
  chmod 755 /newroot@HOOKS@/$s/50-kata-ipu-rootfs
done
for m in dev proc sys; do mount --move /$m /newroot/$m; done
echo "GUEST-ROOT-READY"
export PYTHONPATH=/opt/kata-ipu PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec switch_root /newroot /usr/bin/python3 -X faulthandler \
  -m tests.support.guest_agent @AGENT_ARGS@
"""


def _recipe_key() -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, SUITE, MIRROR, *PACKAGES, "|", *TRIM):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def root_image(executor: Executor = DEFAULT, *, log: list[str] | None = None) -> Path:
    """The raw ext4 guest root image; built (debootstrap, minutes) when not cached.

    ``log`` receives a line with the build time when a build happened.
    """
    key = _recipe_key()
    with _cache_lock("rootimg") as base:
        out = base / f"rootimg-{key}.ext4"
        if out.exists():
            return out
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=base, prefix="rootimg-build-") as tmp:
            tree = Path(tmp) / "tree"
            executor.run(["debootstrap", "--variant=minbase",
                          "--include=" + ",".join(PACKAGES), SUITE, str(tree), MIRROR],
                         timeout=1800)
            for rel in TRIM:
                shutil.rmtree(tree / rel, ignore_errors=True)
            (tree / "opt").mkdir(exist_ok=True)
            used = sum(f.stat().st_size for f in tree.rglob("*")
                       if f.is_file() and not f.is_symlink())
            size_mib = used * 3 // 2 // (1 << 20) + 64
            img = Path(tmp) / "root.ext4"
            executor.run(["mkfs.ext4", "-q", "-F", "-L", "kata-guest", "-d", str(tree),
                          str(img), f"{size_mib}M"], timeout=600)
            img.rename(out)
        if log is not None:
            log.append(f"guest root image built in {time.monotonic() - started:.1f}s: {out}")
        return out


def project_payload() -> dict[str, bytes]:
    """``{relative path: content}`` of the guest code in this checkout."""
    files: dict[str, bytes] = {rel: (REPO / rel).read_bytes() for rel in PAYLOAD_FILES}
    for d in PAYLOAD_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            files[str(path.relative_to(REPO))] = path.read_bytes()
    return files


def boot_initramfs(k: Kernel, agent_args: Sequence[str] = (),
                   payload: Mapping[str, bytes] | None = None) -> Path:
    """The initramfs that boots :func:`root_image` into the test agent; cached by content."""
    files = project_payload() if payload is None else dict(payload)
    script = (BOOT_INIT.replace("@SERIAL@", ROOT_SERIAL).replace("@HOOKS@", GUEST_HOOK_PATH)
              .replace("@AGENT_ARGS@", " ".join(agent_args)))
    return initramfs(k, init=script, modules=GUEST_MODULES, prefix="bootrd",
                     files={f"payload/{rel}": data for rel, data in files.items()})
