"""``python3 -m guest_hooks`` — the guest-side command and OCI hook.

::

    python3 -m guest_hooks mount --pci-path 02/01 --fstype ext4 --target DIR
                                 [--readonly] [--timeout 3] [--no-fsck]
    python3 -m guest_hooks umount --target DIR
    python3 -m guest_hooks hook          # OCI prestart/createRuntime/poststop hook:
                                         # state JSON on stdin (guest_hook_path); status
                                         # "stopped" unmounts; a container without
                                         # io.katacontainers.ipu.rootfs.* is skipped

On success one JSON line goes to stdout. On failure the message goes to stderr as
``guest_hooks: <kind>: <message>`` and the exit status is 1 (2 for usage errors), so the
runtime's hook error names the cause.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from guest_hooks.device import Locator, wait_for_disk
from guest_hooks.errors import GuestHookError, NotAnnotated
from guest_hooks.mount import mount_rootfs, umount_rootfs
from guest_hooks.oci import hook_request, parse_state
from guest_hooks.pcipath import PciPath


def _mount(locator: Locator, target: str, fstype: str, readonly: bool, timeout: float,
           fsck: bool) -> dict[str, object]:
    disk = wait_for_disk(locator, timeout)
    done = mount_rootfs(disk.node, target, fstype, readonly=readonly or disk.readonly,
                        fsck=fsck)
    return {"device": disk.node, "serial": disk.serial, "devpath": disk.devpath,
            "target": done.target, "fstype": done.fstype,
            "overlay": done.readonly_lower is not None}


def run(argv: Sequence[str], stdin_text: str | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python3 -m guest_hooks")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="find a hot-plugged disk and mount it")
    m.add_argument("--pci-path", required=True, help="<bridge slot>/<device slot>, hex")
    m.add_argument("--fstype", default="ext4")
    m.add_argument("--target", required=True)
    m.add_argument("--readonly", action="store_true")
    m.add_argument("--timeout", type=float, default=3.0)
    m.add_argument("--no-fsck", action="store_true")
    u = sub.add_parser("umount", help="unmount a container root mounted by 'mount'")
    u.add_argument("--target", required=True)
    sub.add_parser("hook", help="OCI hook: state JSON on stdin")
    args = parser.parse_args(argv)

    if args.command == "mount":
        locator = Locator(PciPath.parse(args.pci_path))
        return _mount(locator, args.target, args.fstype, args.readonly, args.timeout,
                      not args.no_fsck)
    if args.command == "umount":
        return {"target": args.target, "unmounted": umount_rootfs(args.target)}
    state = parse_state(stdin_text if stdin_text is not None else sys.stdin.read())
    try:
        req = hook_request(state)
    except NotAnnotated as exc:  # installed for every container; not an IPU rootfs: no-op
        return {"id": state["id"], "skipped": str(exc)}
    if req.status == "stopped":  # poststop
        return {"target": req.root, "unmounted": umount_rootfs(req.root)}
    return _mount(req.locator, req.root, req.fstype, req.readonly, req.timeout, True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        result = run(sys.argv[1:] if argv is None else argv)
    except GuestHookError as exc:
        print(f"guest_hooks: {exc.kind}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
