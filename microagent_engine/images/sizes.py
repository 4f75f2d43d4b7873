"""How big an image's ext4 must be for its files (shared by pulled and built-in images)."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

HEADROOM_MIB = 64
INODE_RATIO = 16384  # mkfs.ext4's default bytes-per-inode


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of the tree at ``root``; hardlinks count once."""
    seen: set[int] = set()
    total, inodes = 4096, 1
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size > 59):
                total += max(1, math.ceil(st.st_size / 4096)) * 4096
    return total, inodes


def image_size_mib(content: int, inodes: int) -> int:
    """Content + 30% + 64 MiB headroom, and enough room for the inodes mkfs will allot."""
    by_bytes = content * 1.3 / 2**20 + HEADROOM_MIB
    by_inodes = inodes * INODE_RATIO * 1.3 / 2**20 + HEADROOM_MIB
    return math.ceil(max(by_bytes, by_inodes))
