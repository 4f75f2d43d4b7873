"""ext4 images built and resized with e2fsprogs (never mounted on the host)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from ..errors import HostError, InvalidArgument
from ..fsutil import make_private, open_private
from ..hostinfo import require_tool

MKFS_OPTS = ["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
             "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0"]


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HostError(f"{what} failed ({' '.join(cmd[:2])}…, exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc


def _grow(fh: "object", path: Path, size_mib: int) -> None:
    """Truncate the open image ``fh`` to ``size_mib`` MiB; InvalidArgument when the host filesystem cannot."""
    try:
        fh.truncate(size_mib * 1024 * 1024)  # type: ignore[attr-defined]
    except (OSError, OverflowError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise InvalidArgument(f"the host filesystem holding {path.parent} cannot hold a {size_mib} MiB disk image "
                              f"({why}); choose a smaller size") from None


def make_ext4(path: Path, size_mib: int, source_dir: Path | None = None, label: str = "") -> None:
    """Create ``path`` as a sparse ext4 of ``size_mib`` MiB (mode 0600), populated from ``source_dir``; atomic.
    Its temp name is fixed (``.NAME.tmp``), so one writer per ``path`` at a time: shared artifacts are built under
    their lock (:func:`~microagent_engine.fsutil.build_once`, the volume registry's lock)."""
    mkfs = require_tool("mkfs.ext4")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open_private(tmp, "wb") as fh:
            _grow(fh, path, size_mib)
        cmd = [mkfs, *MKFS_OPTS]
        if label:
            cmd += ["-L", label[:16]]
        if source_dir is not None:
            cmd += ["-d", str(source_dir)]
        _run(cmd + [str(tmp)], "mkfs.ext4")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsck(path: Path, *, fix: bool = True) -> None:
    """``e2fsck -fp`` (or ``-fn`` with fix=False); raises if the filesystem has errors left."""
    e2fsck = require_tool("e2fsck")
    proc = subprocess.run([e2fsck, "-f", "-p" if fix else "-n", str(path)], capture_output=True, text=True)
    if proc.returncode >= 4 or (not fix and proc.returncode != 0):
        raise HostError(f"{path} has filesystem errors (e2fsck exit {proc.returncode}): "
                        f"{(proc.stdout + proc.stderr).strip()[-500:]}")


def clone_sized(base: Path, dest: Path, size_mib: int) -> None:
    """Sparse copy of ``base`` to ``dest`` (mode 0600) grown to ``size_mib`` (never shrunk); atomic."""
    resize2fs = require_tool("resize2fs")
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        _run(["cp", "--sparse=always", "--reflink=auto", str(base), str(tmp)], "copying the base image")
        make_private(tmp)
        if size_mib * 1024 * 1024 > tmp.stat().st_size:
            fsck(tmp)
            with open(tmp, "r+b") as fh:
                _grow(fh, dest, size_mib)
            _run([resize2fs, "-f", str(tmp)], "resize2fs")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

