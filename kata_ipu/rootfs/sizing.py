"""Honest ext4 sizing from a staged tree: what the files need, plus configured headroom.

The image must hold the unpacked tree plus the filesystem's own metadata, and then exactly the
configured headroom: a container that fills it sees ENOSPC inside its own filesystem, not the
host's. Sizes are rounded to 1 MiB.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from kata_ipu.rootfs.errors import ImageTooLarge

BLOCK = 4096
INODE_SIZE = 256
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class TreeUsage:
    inodes: int
    data_bytes: int  # apparent bytes of regular files (each inode once)
    block_bytes: int  # bytes in 4 KiB blocks that files, dirs and long symlinks occupy


def measure_tree(root: str) -> TreeUsage:
    seen: set[int] = set()
    inodes = data = blocks = 0
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                    blocks += max(1, -(-st.st_size // BLOCK))
                elif stat.S_ISREG(st.st_mode):
                    data += st.st_size
                    # Allocated blocks, so sparse files count as what they really use.
                    blocks += -(-st.st_blocks * 512 // BLOCK)
                elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                    blocks += 1  # targets under 60 bytes live in the inode
    return TreeUsage(inodes + 1, data, (blocks + 1) * BLOCK)


@dataclass(frozen=True, slots=True)
class Ext4Geometry:
    size_bytes: int
    inodes: int
    journal_mib: int


def ext4_geometry(usage: TreeUsage, *, headroom_ratio: float, headroom_bytes: int,
                  min_size: int, max_size: int, journal_mib: int | None = None,
                  bytes_per_inode: int | None = None) -> Ext4Geometry:
    """Size for a filesystem made for this tree (``mkfs -N inodes -J size=journal_mib``), or,
    with ``journal_mib``/``bytes_per_inode`` given, for one that was formatted with those and
    is then resized (its journal stays, its inode tables scale with its size)."""
    inodes = max(int(usage.inodes * (1 + headroom_ratio)) + 1024, 4096)
    content = usage.block_bytes
    headroom = max(headroom_bytes, int(content * headroom_ratio))
    base = content + headroom
    if journal_mib is None:
        journal_mib = 4 if base < 256 * MiB else 16 if base < 2048 * MiB else 64
    if bytes_per_inode is not None:
        # Inode tables grow with the filesystem: solve size = base + fixed + size*256/bpi.
        fixed = journal_mib * MiB + base // 50 + 4 * MiB
        size = int((base + fixed) / (1 - INODE_SIZE / bytes_per_inode))
        inodes = size // bytes_per_inode
        size = -(-size // MiB) * MiB
        size = max(size, min_size)
        if size > max_size:
            raise ImageTooLarge(size, max_size)
        return Ext4Geometry(size, inodes, journal_mib)
    # Inode tables, bitmaps and group descriptors (~1.6% at 4 KiB blocks, 128 MiB groups),
    # the journal, and slack for xattr blocks and directory index blocks.
    meta = inodes * INODE_SIZE + journal_mib * MiB + base // 50 + 4 * MiB
    size = -(-(base + meta) // MiB) * MiB
    size = max(size, min_size)
    if size > max_size:
        raise ImageTooLarge(size, max_size)
    return Ext4Geometry(size, inodes, journal_mib)
