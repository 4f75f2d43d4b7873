"""Single files in and out of an ext4 image with debugfs, without mounting it (``cp``, ``--output``).

Files come out through a pipe in bounded memory with zero blocks kept as holes (:func:`dump_sparse`), and a file
over the caller's size cap is refused before anything is written.

debugfs always exits 0, so every call reads its stderr. ``write`` will not overwrite (we ``rm`` first),
has no ``mkdir -p`` (we create each level), and on a full disk leaves a short, holey file that e2fsck
calls clean: we check free space first and remove any partial file on failure. Nothing stops two
writers on one image, so every call holds :func:`image_lock`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_MAX_COPY, MAX_INLINE_OUTPUT, human_size
from ..errors import HostError, InvalidArgument, InvalidState, NotFound
from ..fsutil import copy_sparse, file_lock
from ..hostinfo import require_tool

_MIB = 1024 * 1024
_BANNER = re.compile(r"^debugfs \d[\w.\-]* \(.*\)$")
_BAD_CHARS = re.compile(r'["\x00-\x1f\x7f]')


@dataclass(frozen=True)
class GuestInode:
    """What ``stat`` says about one path inside the image."""

    type: str  # "regular", "directory", "symlink", "FIFO", "socket", "character special", "block special"
    mode: int
    size: int
    blocks_512: int


def image_lock(image: Path) -> contextlib.AbstractContextManager[None]:
    """The lock every reader and writer of ``image`` holds (a separate ``.<name>.lock`` file next to it)."""
    return file_lock(image.with_name(f".{image.name}.lock"), what=f"disk image {image}")


def normalize_guest_path(path: str) -> str:
    """Absolute, normalized guest path; InvalidArgument for relative paths, ``..`` escapes, odd characters."""
    if not path or not path.startswith("/"):
        raise InvalidArgument(f"guest path {path!r} must be absolute (start with '/'), e.g. /work/result.txt")
    if _BAD_CHARS.search(path):
        raise InvalidArgument(f"guest path {path!r} contains a quote or control character; rename the file")
    if ".." in path.split("/"):
        raise InvalidArgument(f"guest path {path!r} contains '..'; give the path without '..' components")
    return "/" + posixpath.normpath(path).lstrip("/")


def _q(path: str) -> str:
    return f'"{path}"'


def _debugfs(image: Path, command: str, *, write: bool = False, pass_fds: tuple[int, ...] = (),
             cwd: Path | None = None, binary: bool = False) -> tuple[str | bytes, list[str]]:
    """Run one debugfs request; returns (stdout, stderr lines without the version banner)."""
    exe = require_tool("debugfs")
    cmd = [exe, *(["-w"] if write else []), "-R", command, str(image)]
    proc = subprocess.run(cmd, capture_output=True, pass_fds=pass_fds, cwd=cwd,
                          env={**os.environ, "DEBUGFS_PAGER": "__none__", "PAGER": "__none__"})
    err = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines()
           if ln.strip() and not _BANNER.match(ln.strip())]
    if proc.returncode != 0:
        raise HostError(f"debugfs failed on {image} (exit {proc.returncode}): {' '.join(err)[-400:]}")
    if any("while trying to open" in e or "Filesystem not open" in e for e in err):
        raise HostError(f"debugfs could not open {image}: {' '.join(err)[:400]}; check it with e2fsck -fn {image}")
    return (proc.stdout if binary else proc.stdout.decode(errors="replace")), err


def _check_image(image: Path) -> None:
    if not image.is_file():
        raise NotFound(f"disk image {image} does not exist; check the workspace or volume name")
    with open(image, "rb") as fh:
        fh.seek(1080)
        if fh.read(2) != b"\x53\xef":
            raise InvalidArgument(f"{image} is not an ext4 image (no ext4 superblock); "
                                  f"attach an ext4 file built with mkfs.ext4")


def _stat(image: Path, guest: str) -> GuestInode | None:
    out, err = _debugfs(image, f"stat {_q(guest)}")
    if "Type:" not in out:
        if not err or any("not found" in e or "not a directory" in e for e in err):
            return None
        raise HostError(f"debugfs could not look up {guest} in {image}: {' '.join(err)[:400]}")
    m = re.search(r"Type:\s+(\S+(?: special)?)\s+Mode:\s+(\d+)", out)
    size = re.search(r"\bSize:\s+(\d+)", out)
    blocks = re.search(r"Blockcount:\s+(\d+)", out)
    if not m:
        raise HostError(f"could not parse debugfs stat output for {guest} in {image}: {out[:200]!r}")
    return GuestInode(type=m.group(1), mode=int(m.group(2), 8), size=int(size.group(1)) if size else 0,
                      blocks_512=int(blocks.group(1)) if blocks else 0)


def _free_space(image: Path) -> tuple[int, int, int]:
    """(free blocks, block size, free inodes) from the superblock."""
    out, err = _debugfs(image, "stats")
    if re.search(r"^Filesystem features:.*\bneeds_recovery\b", out, re.M):
        raise InvalidState(f"{image} was not cleanly unmounted (its journal needs recovery); repair it with "
                           f"e2fsck -fy {image}, or start and halt the workspace, then copy again")
    vals = {}
    for key in ("Free blocks", "Block size", "Free inodes"):
        m = re.search(rf"^{key}:\s+(\d+)", out, re.M)
        if not m:
            raise HostError(f"could not read '{key}' of {image} from debugfs stats: {' '.join(err)[:200]}")
        vals[key] = int(m.group(1))
    return vals["Free blocks"], vals["Block size"], vals["Free inodes"]


def exists(image: Path, guest_path: str) -> bool:
    """Whether ``guest_path`` names anything (file, directory, link...) inside ``image``."""
    guest = normalize_guest_path(guest_path)
    _check_image(image)
    with image_lock(image):
        return _stat(image, guest) is not None


def _blocks_needed(size: int, block_size: int) -> int:
    data = -(-size // block_size)
    return data + data // 300 + 2  # extent-tree blocks and a directory block of slack


def _mkdirs(image: Path, guest_dir: str) -> None:
    parts = [p for p in guest_dir.split("/") if p]
    cur = ""
    for part in parts:
        cur += "/" + part
        node = _stat(image, cur)
        if node is None:
            _, err = _debugfs(image, f"mkdir {_q(cur)}", write=True)
            if err and not any("already exists" in e for e in err):
                if any("Could not allocate" in e for e in err):
                    raise InvalidState(f"not enough space in {image} to create directory {cur}; "
                                       f"grow the disk with --size-mib")
                raise HostError(f"could not create directory {cur} in {image}: {' '.join(err)}")
        elif node.type != "directory":
            raise InvalidArgument(f"{cur} in {image} is a {node.type} file, not a directory; "
                                  f"choose another destination path")


def copy_in(image: Path, host_src: Path, guest_dst: str, mode: int | None = None) -> None:
    """Copy the regular host file ``host_src`` to ``guest_dst`` in ``image`` (parents created, overwrite ok).

    The guest file gets ``mode`` (default: the host file's mode) and owner root. A full disk raises InvalidState and
    leaves no partial file behind.
    """
    guest = normalize_guest_path(guest_dst)
    if guest == "/":
        raise InvalidArgument("guest destination '/' is a directory; give a file path, e.g. /work/app.conf")
    _check_image(image)
    try:
        fd = os.open(host_src, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"host file {host_src} does not exist") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InvalidArgument(f"{host_src} is {what}; cp copies one regular file "
                                  f"(package a directory as a tar and attach it with --bundle)")
        with image_lock(image):
            _copy_in_locked(image, fd, st, guest)
            if mode is not None:
                _, err = _debugfs(image, f"sif {_q(guest)} mode 0{stat.S_IFREG | mode:o}", write=True)
                if err:
                    raise HostError(f"could not set the mode of {guest} in {image}: {' '.join(err)}")
    finally:
        os.close(fd)


def _copy_in_locked(image: Path, fd: int, st: os.stat_result, guest: str) -> None:
    parent = posixpath.dirname(guest)
    old = _stat(image, guest)
    if old is not None and old.type != "regular":
        raise InvalidArgument(f"{guest} in {image} is a {old.type}, not a regular file; "
                              f"give a file path to copy to")
    free_blocks, block_size, free_inodes = _free_space(image)
    reclaim = old.blocks_512 * 512 // block_size if old else 0
    if _blocks_needed(st.st_size, block_size) > free_blocks + reclaim or (old is None and free_inodes < 1):
        raise InvalidState(f"not enough space in {image}: {(free_blocks + reclaim) * block_size // _MIB} MiB free, "
                           f"file is {-(-st.st_size // _MIB)} MiB; grow the disk with --size-mib")
    _mkdirs(image, parent)
    if old is not None:
        _, err = _debugfs(image, f"rm {_q(guest)}", write=True)
        if err:
            raise HostError(f"could not replace {guest} in {image}: {' '.join(err)}")
    os.lseek(fd, 0, os.SEEK_SET)
    _, err = _debugfs(image, f"write /dev/fd/{fd} {_q(guest)}", write=True, pass_fds=(fd,))
    new = _stat(image, guest)
    if err or new is None or new.size != st.st_size:
        if new is not None:
            _debugfs(image, f"rm {_q(guest)}", write=True)
        if any("Could not allocate" in e for e in err):
            free_blocks, block_size, _ = _free_space(image)
            raise InvalidState(f"not enough space in {image}: {free_blocks * block_size // _MIB} MiB free, "
                               f"file is {-(-st.st_size // _MIB)} MiB; grow the disk with --size-mib")
        raise HostError(f"writing {guest} into {image} failed: {' '.join(err) or 'size mismatch after write'}")


def _regular(image: Path, guest: str) -> GuestInode:
    node = _stat(image, guest)
    if node is None:
        raise NotFound(f"{guest} does not exist in {image}; check the path (guest paths are absolute)")
    if node.type != "regular":
        raise InvalidArgument(f"{guest} in {image} is a {node.type}, not a regular file; cp copies one regular file")
    return node


def _refuse_size(guest: str, size: int, cap: int, raise_with: str) -> None:
    if size > cap:
        raise InvalidArgument(f"{guest} is {human_size(size)} ({size} bytes), over the copy cap of {human_size(cap)}; "
                              f"nothing was copied. {raise_with}")


def dump_sparse(image: Path, spec: str, fd: int, size: int) -> int:
    """Stream the guest file ``spec`` (a quoted path or ``<inode>``) of ``image`` into ``fd``, in bounded memory,
    keeping zero blocks (holes, unwritten extents, written zeros) as holes; ``fd`` ends up ``size`` bytes long.

    Returns the bytes written to ``fd``. HostError unless debugfs gave exactly ``size`` bytes. The caller holds
    :func:`image_lock` and has checked ``size`` against its cap.
    """
    r, w = os.pipe()
    with tempfile.TemporaryFile() as errf:
        try:
            proc = subprocess.Popen([require_tool("debugfs"), "-R", f"dump {spec} /dev/fd/{w}", str(image)],
                                    stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, pass_fds=(w,),
                                    env={**os.environ, "DEBUGFS_PAGER": "__none__", "PAGER": "__none__"})
        finally:
            os.close(w)
        try:
            with os.fdopen(r, "rb") as src:  # buffered: read(n) waits for n bytes, so blocks stay aligned
                got, written = copy_sparse(src.read, fd, size)
        finally:
            proc.wait()  # the pipe is closed by now, so a debugfs still writing ends (EPIPE)
        errf.seek(0)
        err = [ln.strip() for ln in errf.read(4096).decode(errors="replace").splitlines()
               if ln.strip() and not _BANNER.match(ln.strip())]
    if proc.returncode != 0 or err or got != size:
        why = " ".join(err)[:400] or f"exit {proc.returncode}, {got} bytes of {size}"
        raise HostError(f"copying {spec} out of {image} failed: {why}")
    os.ftruncate(fd, size)
    return written


def copy_out(image: Path, guest_src: str, host_dst: Path, max_size: int = DEFAULT_MAX_COPY) -> int:
    """Copy the regular guest file ``guest_src`` to ``host_dst`` (atomic: temp file then rename); returns the bytes
    written to the host disk.

    Holes stay holes and memory stays bounded whatever the file's size. A file larger than ``max_size`` (its logical
    size, which also bounds the host disk used) is refused before anything is written. The host file gets the guest
    file's permission bits without setuid/setgid/sticky, owned by the caller.
    """
    guest = normalize_guest_path(guest_src)
    _check_image(image)
    host_dst = Path(host_dst)
    if host_dst.is_dir():
        host_dst = host_dst / posixpath.basename(guest)
    if not host_dst.parent.is_dir():
        raise NotFound(f"host directory {host_dst.parent} does not exist; create it first")
    with image_lock(image):
        node = _regular(image, guest)
        _refuse_size(guest, node.size, max_size, "Raise the cap with --max-size (e.g. --max-size "
                     f"{-(-node.size // (1 << 30))}G), or max_size= in Python")
        fd, tmp = tempfile.mkstemp(prefix=".microagent-cp-", dir=host_dst.parent)
        try:
            try:
                written = dump_sparse(image, _q(guest), fd, node.size)
                os.fchmod(fd, node.mode & 0o777)
            except OSError as exc:
                raise HostError(f"writing {host_dst} failed: {exc.strerror}; nothing was left behind (free host disk "
                                f"space or choose another destination)") from None
            finally:
                os.close(fd)
            os.replace(tmp, host_dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return written


def read_file(image: Path, guest_path: str, max_size: int = MAX_INLINE_OUTPUT) -> bytes:
    """The bytes of the regular guest file ``guest_path`` in ``image``; refused above ``max_size`` bytes."""
    guest = normalize_guest_path(guest_path)
    _check_image(image)
    with image_lock(image):
        node = _regular(image, guest)
        _refuse_size(guest, node.size, max_size, "It is too large to hold in memory: give a host destination "
                     "(DEST) to copy it to a file instead")
        out, err = _debugfs(image, f"cat {_q(guest)}", binary=True)
    if err or len(out) != node.size:
        raise HostError(f"reading {guest} from {image} failed: {' '.join(err) or 'size mismatch'}")
    return out  # type: ignore[return-value]


def list_dir(image: Path, guest_dir: str) -> list[str]:
    """Names in the guest directory ``guest_dir`` (without ``.`` and ``..``)."""
    guest = normalize_guest_path(guest_dir)
    _check_image(image)
    with image_lock(image):
        node = _stat(image, guest)
        if node is None:
            raise NotFound(f"{guest} does not exist in {image}")
        if node.type != "directory":
            raise InvalidArgument(f"{guest} in {image} is a {node.type}, not a directory")
        out, err = _debugfs(image, f"ls -p {_q(guest)}")
    names = []
    for line in str(out).splitlines():
        fields = line.split("/")
        if len(fields) >= 7 and fields[5] not in (".", ".."):
            names.append(fields[5])
    return sorted(names)
