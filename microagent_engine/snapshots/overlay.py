"""A copy-on-write root disk for a disposable clone of a snapshot (a ``run --delete``; a notebook kernel's or
session's VM, deleted with its owner): instead of copying the snapshot's 1.2 GiB image (0.5-0.6 s and as much disk,
no reflink on ext4), the clone gets a hard link to it, used read-only as a backing file, and a qcow2 overlay that
takes the guest's writes. The guest sees the same virtio-blk disk. The host-side tools that read a stopped
workspace's ext4 image (cp, outputs, commit, snapshots) refuse such a workspace (:func:`require_own_disk`).

The overlay is written here (QEMU's qemu-img is not needed): a qcow2 v3 header, one refcount table and block, an
empty L1 table; every cluster reads from the backing file until the guest writes it. QEMU opens both by
descriptor inside its jail (the backing one read-only, so not even a compromised QEMU can change the snapshot).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import InvalidState

#: the launch's ``extra`` key of a workspace with an overlay root: ``{"root", "overlay", "base"}`` paths
OVERLAY_KEY = "rootOverlay"
OVERLAY_FILE = "rootfs.qcow2"
BASE_FILE = "rootfs-base.ext4"
_CLUSTER_BITS = 16
_CLUSTER = 1 << _CLUSTER_BITS


def write_overlay(path: Path, size: int) -> None:
    """An empty qcow2 overlay of ``size`` bytes at ``path`` (0600): clusters 0 header, 1 refcount table, 2 refcount
    block (refcounts 16-bit), 3 L1 table. Its backing file is given when QEMU opens it (``backing.file.*``)."""
    l1_size = -(-size // (_CLUSTER * (_CLUSTER // 8)))  # each L1 entry maps one L2 table of 8192 clusters
    if l1_size * 8 > _CLUSTER:
        raise ValueError(f"a disk of {size} bytes is too large for a one-cluster L1 table")
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, _CLUSTER_BITS, size, 0, l1_size,
                         3 * _CLUSTER, 1 * _CLUSTER, 1, 0, 0, 0, 0, 0, 4, 104)
    image = bytearray(4 * _CLUSTER)
    image[:len(header)] = header
    struct.pack_into(">Q", image, _CLUSTER, 2 * _CLUSTER)  # refcount table[0] -> the refcount block
    for cluster in range(4):
        struct.pack_into(">H", image, 2 * _CLUSTER + 2 * cluster, 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(image)


def overlay_of(workspace_dir: Path) -> dict[str, str] | None:
    """A workspace's overlay root (``{"overlay", "base"}`` paths) when it has one."""
    overlay = workspace_dir / OVERLAY_FILE
    if not overlay.is_file():
        return None
    return {"overlay": str(overlay), "base": str(workspace_dir / BASE_FILE)}


def require_own_disk(workspace_dir: Path, name: str, what: str) -> None:
    """InvalidState when workspace ``name``'s root disk is an overlay: ``what`` (e.g. "cp") reads an ext4 image,
    which such a workspace does not have (its files are the snapshot's plus the overlay's clusters)."""
    if overlay_of(workspace_dir):
        raise InvalidState(f"{what} needs an ext4 root disk, and {name!r} is a disposable clone (a one-shot run's "
                           f"or a notebook session's VM, deleted with it) whose root disk is a copy-on-write overlay: "
                           f"while it runs, 'microagent cp' and 'microagent exec' reach its files through its agent; "
                           f"to keep, commit or snapshot a disk, use a workspace made with 'microagent create'")
