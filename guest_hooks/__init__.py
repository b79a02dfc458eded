"""Runs inside the Kata guest: find the hot-plugged rootfs disk and mount it (stdlib + pyudev)."""
