"""The exception root of guest_hooks; each class names one failure a caller can act on."""

from __future__ import annotations


class GuestHookError(Exception):
    """Root of every guest_hooks error; ``kind`` is a stable, machine-readable name."""

    kind = "error"


class InvalidArgument(GuestHookError):
    """A malformed PCI path, OCI state, annotation or option."""

    kind = "invalid-argument"


class NotAnnotated(InvalidArgument):
    """The container carries no kata-ipu rootfs annotation: not ours (the hook skips it)."""

    kind = "not-annotated"


class DeviceTimeout(GuestHookError):
    """The hot-plugged disk did not appear within the timeout."""

    kind = "device-timeout"

    def __init__(self, what: str, timeout: float, present: list[str] | None = None) -> None:
        seen = "; ".join(present) if present else "none"
        super().__init__(f"no block device {what} appeared within {timeout:g}s "
                         f"(disks present: {seen})")
        self.what = what
        self.timeout = timeout
        self.present = present or []


class WrongFilesystem(GuestHookError):
    """The disk does not hold the expected filesystem."""

    kind = "wrong-fstype"

    def __init__(self, device: str, expected: str, found: str | None) -> None:
        super().__init__(f"{device}: expected a {expected} filesystem, found "
                         f"{found or 'no known filesystem'}")
        self.device = device
        self.expected = expected
        self.found = found


class FsckFailed(GuestHookError):
    """``e2fsck -p`` found errors it could not fix; the disk is not mounted."""

    kind = "fsck-failed"

    def __init__(self, device: str, status: int, output: str) -> None:
        super().__init__(f"{device}: e2fsck -p exited with status {status}: {output.strip()}")
        self.device = device
        self.status = status
        self.output = output


class AlreadyMounted(GuestHookError):
    """The target is already a mount point, or the disk is already mounted elsewhere."""

    kind = "already-mounted"


class MountFailed(GuestHookError):
    """mount(2) or umount(2) failed for another reason; keeps the errno."""

    kind = "mount-failed"

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
