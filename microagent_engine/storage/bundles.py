"""Tar bundles built into one-shot ext4 disks (``--bundle``, ``-v x.tar:/ctx``).

Archives are untrusted. Members are extracted by hand (tarfile's filters would strip setuid bits) into a
private staging dir, walking every path with ``O_NOFOLLOW`` directory fds, so nothing is ever written
outside it: absolute names, ``..`` components, members below a symlink and hardlinks to outside are
rejected; device nodes and fifos are skipped with a note. Owners are kept only when running as root.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import shutil
import stat
import lzma
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from ..errors import InvalidArgument
from ..fsutil import STALE_TEMP_SECONDS, private_dir, sweep_stale_temp
from .ext4 import make_ext4

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_BLOCK = 4096
_INODE_RATIO = 16384  # mkfs.ext4's default bytes-per-inode: the image must be big enough for the inode count
_COPY_CHUNK = 1024 * 1024
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _bad(tar_path: Path, member: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"bundle {tar_path}: member {member!r} {why}; rebuild the archive from a directory "
                           f"with relative paths: tar -C DIR -cf {tar_path.name} .")


def _split(tar_path: Path, name: str) -> list[str]:
    """The member's path components, relative to the archive root; InvalidArgument if it could escape."""
    if name.startswith("/"):
        raise _bad(tar_path, name, "has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _bad(tar_path, name, "contains '..'")
    if any("\x00" in p for p in parts):
        raise _bad(tar_path, name, "contains a NUL byte")
    return parts


class _Tree:
    """Directory-fd based writer confined to ``root``."""

    def __init__(self, root: Path, tar_path: Path) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.tar_path = tar_path

    def close(self) -> None:
        os.close(self.root_fd)

    def open_dir(self, parts: list[str], member: str, create: bool = True) -> int:
        """An fd of the directory ``parts`` (created 0755 as needed); never follows a symlink."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _bad(self.tar_path, member, "refers to a path that is not in the archive") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _bad(self.tar_path, member, "lies below a symlink or a file") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def clear(self, dfd: int, name: str, member: str, keep_dir: bool = False) -> None:
        """Remove an earlier entry ``name`` (a later member of the same name wins, as with tar)."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            raise _bad(self.tar_path, member, "replaces a directory with a non-directory")
        os.unlink(name, dir_fd=dfd)


def _content_size(members: list[tarfile.TarInfo]) -> tuple[int, int]:
    """(bytes the tree needs on ext4, rounded to blocks; number of inodes)."""
    total = 0
    for m in members:
        total += _BLOCK + (-(-m.size // _BLOCK) * _BLOCK if m.isreg() else 0)
    return total, len(members) + 16


def _extract_one(tar: tarfile.TarFile, tar_path: Path, tree: _Tree, m: tarfile.TarInfo, is_root: bool,
                 dirs: list[tuple[list[str], tarfile.TarInfo]], done: list[tarfile.TarInfo], notes: list[str]) -> None:
    parts = _split(tar_path, m.name)
    if m.ischr() or m.isblk() or m.isfifo():
        notes.append(f"skipped {m.name!r}: device nodes and fifos are not copied into bundles")
        return
    if not (m.isdir() or m.isreg() or m.issym() or m.islnk()):
        notes.append(f"skipped {m.name!r}: unsupported tar member type {m.type!r}")
        return
    if not parts:
        if m.isdir():
            dirs.append((parts, m))
            return
        raise _bad(tar_path, m.name, "names the archive root but is not a directory")
    if m.isdir():
        os.close(tree.open_dir(parts, m.name))
        dirs.append((parts, m))
        done.append(m)
        return
    pfd = tree.open_dir(parts[:-1], m.name)
    leaf = parts[-1]
    try:
        tree.clear(pfd, leaf, m.name)
        if m.issym():
            os.symlink(m.linkname, leaf, dir_fd=pfd)
        elif m.islnk():
            try:
                tparts = _split(tar_path, m.linkname)
            except InvalidArgument:
                raise _bad(tar_path, m.name, f"is a hardlink to {m.linkname!r}, outside the archive") from None
            if not tparts:
                raise _bad(tar_path, m.name, "is a hardlink to the archive root")
            tfd = tree.open_dir(tparts[:-1], m.name, create=False)
            try:
                tst = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
                if not stat.S_ISREG(tst.st_mode):
                    raise _bad(tar_path, m.name, "is a hardlink to something that is not a regular file")
                os.link(tparts[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise _bad(tar_path, m.name, f"is a hardlink to {m.linkname!r}, which is not in the "
                                             f"archive before it") from None
            finally:
                os.close(tfd)
            done.append(m)
            return
        else:
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            try:
                src = tar.extractfile(m)
                remaining = m.size
                while src is not None and remaining > 0:
                    chunk = src.read(min(_COPY_CHUNK, remaining))
                    if not chunk:
                        raise _bad(tar_path, m.name, "is truncated")
                    os.write(fd, chunk)
                    remaining -= len(chunk)
                if is_root:
                    os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, m.mode & 0o7777)
            finally:
                os.close(fd)
        if is_root:
            os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        with contextlib.suppress(OSError):
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
        if not m.issym():
            os.chmod(leaf, m.mode & 0o7777, dir_fd=pfd)  # after chown, which clears setuid
    finally:
        os.close(pfd)
    done.append(m)


def _extract(tar: tarfile.TarFile, tar_path: Path, root: Path, notes: list[str]) -> list[tarfile.TarInfo]:
    tree = _Tree(root, tar_path)
    is_root = os.geteuid() == 0
    dirs: list[tuple[list[str], tarfile.TarInfo]] = []
    done: list[tarfile.TarInfo] = []
    try:
        for m in tar:
            try:
                _extract_one(tar, tar_path, tree, m, is_root, dirs, done, notes)
            except _READ_ERRORS as exc:
                raise _bad(tar_path, m.name, f"could not be read ({exc})") from None
        # directory modes and times last (deepest first), so read-only dirs could still be filled
        for parts, m in sorted(dirs, key=lambda d: -len(d[0])):
            dfd = tree.open_dir(parts, m.name)
            try:
                if is_root:
                    os.fchown(dfd, m.uid, m.gid)
                os.fchmod(dfd, m.mode & 0o7777)
                os.utime(dfd, (m.mtime, m.mtime))
            finally:
                os.close(dfd)
    finally:
        tree.close()
    return done


def build_bundle(tar_path: Path, out: Path, staging_parent: Path, notes: list[str] | None = None) -> Path:
    """Build the ext4 disk ``out`` from the tar ``tar_path`` (plain, gz, bz2 or xz); atomic.

    Sized content x 1.3 + 16 MiB (and enough for its inode count). Skipped members are appended to
    ``notes`` and logged. InvalidArgument names the member when the archive is malformed or hostile.
    """
    tar_path, out = Path(tar_path), Path(out)
    notes = notes if notes is not None else []
    private_dir(staging_parent)
    _sweep_staging(staging_parent)
    private = Path(tempfile.mkdtemp(prefix=".bundle-", dir=staging_parent))  # 0700
    root = private / "root"
    root.mkdir(mode=0o755)
    try:
        try:
            with tarfile.open(tar_path, mode="r:*") as tar:
                members = _extract(tar, tar_path, root, notes)
        except tarfile.ReadError as exc:
            raise InvalidArgument(f"bundle {tar_path} is not a readable tar archive ({exc}); "
                                  f"use a .tar, .tar.gz or .tgz made with: tar -C DIR -cf {tar_path.name} .") from None
        except _READ_ERRORS as exc:
            raise InvalidArgument(f"bundle {tar_path} is damaged ({exc}); recreate the archive") from None
        for note in notes:
            log.warning("bundle %s: %s", tar_path, note)
        size, inodes = _content_size(members)
        size_mib = -(-int(size * 1.3) // _MIB) + 16
        size_mib = max(size_mib, -(-int(inodes * _INODE_RATIO * 1.2) // _MIB) + 16)
        make_ext4(out, size_mib, source_dir=root, label=tar_path.name.split(".")[0])
        return out
    finally:
        shutil.rmtree(private, onerror=_force_remove)


def _sweep_staging(staging_parent: Path) -> None:
    """Remove the ``.bundle-*`` trees and ``.NAME.ext4.tmp`` images a killed build left (after an hour: a
    live build's files are newer)."""
    sweep_stale_temp(staging_parent, (".*.ext4.tmp",))
    now = time.time()
    for path in staging_parent.glob(".bundle-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink() and now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(path, onerror=_force_remove)


def _force_remove(func, path, _exc) -> None:  # type: ignore[no-untyped-def]
    """rmtree helper: make read-only dirs writable (for non-root runs) and retry."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700) if os.path.isdir(path) and not os.path.islink(path) else None
        func(path)
