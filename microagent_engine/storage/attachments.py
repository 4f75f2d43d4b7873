"""Host-side checks of the files behind attached disks: raw ext4 images and tar bundles.

Host directories are never attached: everything the guest sees is a block device. The attachment objects and
their command-line grammar live in :mod:`microagent_engine.model`.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from ..errors import InvalidArgument, NotFound

BUNDLE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DISK_SUFFIXES = (".ext4", ".img")
EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"
DIR_GUIDANCE = ("host directories are never attached; package a directory as a tar for ingress "
                "(tar -C DIR -cf ctx.tar . then -v ./ctx.tar:/ctx:ro), or use cp against a stopped workspace")


def check_ext4_file(path: str | Path, flag: str = "--disk") -> None:
    """NotFound/InvalidArgument unless ``path`` is a regular file with an ext4 superblock magic."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{flag}: disk image {p} does not exist")
    if p.is_dir():
        raise InvalidArgument(f"{flag}: {p} is a directory; {DIR_GUIDANCE}")
    if not p.is_file():
        raise InvalidArgument(f"{flag}: {p} is not a regular file; attach an ext4 image file")
    with open(p, "rb") as fh:
        fh.seek(EXT4_MAGIC_OFFSET)
        if fh.read(2) != EXT4_MAGIC:
            raise InvalidArgument(f"{flag}: {p} is not an ext4 filesystem image (no ext4 superblock); "
                                  f"build one with mkfs.ext4, or use a .tar bundle")


def check_bundle_file(path: str | Path, flag: str = "--bundle") -> None:
    """NotFound/InvalidArgument unless ``path`` is a readable tar archive (plain or compressed)."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{flag}: bundle {p} does not exist")
    if p.is_dir():
        raise InvalidArgument(f"{flag}: {p} is a directory; {DIR_GUIDANCE}")
    if not p.is_file():
        raise InvalidArgument(f"{flag}: {p} is not a regular file; give a .tar/.tar.gz/.tgz archive")
    try:
        ok = tarfile.is_tarfile(p)
    except (OSError, EOFError) as exc:
        raise InvalidArgument(f"{flag}: {p} could not be read as a tar archive ({exc})") from None
    if not ok:
        raise InvalidArgument(f"{flag}: {p} is not a tar archive; create one with: tar -C DIR -cf {p.name} .")
