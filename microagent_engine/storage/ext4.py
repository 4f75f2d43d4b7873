"""ext4 images built and resized with e2fsprogs (never mounted on the host)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from ..errors import HostError, InvalidArgument
from ..fsutil import build_once, make_private, open_private
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


#: beside base images: each grown to a size a workspace asked for (fsck'd and resized once), what its rootfs is
#: copied from: ``.sized/<base name>.<base size>.<base mtime>.<MiB>M.ext4`` (hex), a sparse copy each
SIZED_DIR = ".sized"
#: sized copies kept per base image and in all (the least recently used beyond these are removed)
SIZED_PER_BASE, SIZED_TOTAL = 2, 8


def _grow_into(src: Path, target: Path, size_mib: int) -> None:
    """Sparse copy of ``src`` to ``target`` (0600), fsck'd and grown to ``size_mib`` MiB."""
    _run(["cp", "--sparse=always", "--reflink=auto", str(src), str(target)], "copying the base image")
    make_private(target)
    fsck(target)
    with open(target, "r+b") as fh:
        _grow(fh, target, size_mib)
    _run([require_tool("resize2fs"), "-f", str(target)], "resize2fs")
    record_overhead(target)


def _has_super(group: int) -> bool:
    """sparse_super: the superblock and descriptor backups live in groups 0, 1 and the powers of 3, 5 and 7."""
    if group <= 1:
        return True
    for p in (3, 5, 7):
        n = p
        while n < group:
            n *= p
        if n == group:
            return True
    return False


def overhead_clusters(fields: dict[str, str]) -> int | None:
    """The filesystem's metadata blocks as the kernel counts them (ext4_calculate_overhead: the blocks before the
    first data block, each group's superblock and descriptor copies, reserved descriptor blocks, bitmaps and inode
    table, and the internal journal), from ``dumpe2fs -h``'s fields; None for a layout it does not cover
    (bigalloc, meta_bg, sparse_super2, no sparse_super)."""
    features = set(fields.get("Filesystem features", "").split())
    if features & {"bigalloc", "meta_bg", "sparse_super2"} or "sparse_super" not in features:
        return None
    try:
        blocks, first = int(fields["Block count"]), int(fields["First block"])
        per_group, block_size = int(fields["Blocks per group"]), int(fields["Block size"])
        itb, reserved = int(fields["Inode blocks per group"]), int(fields.get("Reserved GDT blocks", "0"))
        desc = int(fields.get("Group descriptor size", "32"))
        journal = int(fields.get("Total journal blocks", "0")) if "has_journal" in features else 0
    except (KeyError, ValueError):
        return None
    if "has_journal" in features and not journal:
        return None
    groups = -(-(blocks - first) // per_group)
    gdb = -(-(groups * desc) // block_size)
    supers = sum(1 for g in range(groups) if _has_super(g))
    return first + supers * (1 + gdb + reserved) + groups * (itb + 2) + journal


def superblock_fields(path: Path) -> dict[str, str]:
    """``dumpe2fs -h``'s fields of the image ``path`` ("Block count" -> "262144", ...)."""
    out = _run([require_tool("dumpe2fs"), "-h", str(path)], "dumpe2fs").stdout
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def record_overhead(path: Path) -> None:
    """Write the overhead into the superblock of ``path`` when it has none (resize2fs clears it): otherwise the
    guest's kernel counts it and writes the superblock at the first mount of every copy (~6 ms under emulation)."""
    fields = superblock_fields(path)
    if int(fields.get("Overhead clusters", "0") or 0):
        return
    overhead = overhead_clusters(fields)
    if overhead:
        _run([require_tool("debugfs"), "-w", "-R", f"ssv overhead_clusters {overhead}", str(path)], "debugfs")


def sized_base(base: Path, size_mib: int) -> Path:
    """``base`` grown to ``size_mib`` MiB, made once per (base, size) under :data:`SIZED_DIR` (see
    :func:`~microagent_engine.fsutil.build_once`); every workspace of that image and size copies it."""
    st = base.stat()
    out = base.parent / SIZED_DIR / f"{base.stem}.{st.st_size:x}.{st.st_mtime_ns:x}.{size_mib}M.ext4"
    build_once(out, lambda target: _grow_into(base, target, size_mib), f"the {size_mib} MiB copy of {base.name}")
    with contextlib.suppress(OSError):
        os.utime(out)  # recently used
    _evict_sized(out.parent, keep=out)
    return out


def drop_sized(base: Path) -> None:
    """Remove the sized copies of ``base`` (it is being deleted)."""
    for p in (base.parent / SIZED_DIR).glob(f"{base.stem}.*.ext4"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _evict_sized(folder: Path, keep: Path) -> None:
    """Beyond :data:`SIZED_PER_BASE` per base and :data:`SIZED_TOTAL` in all, and for bases that are gone, remove
    the least recently used sized copies (never ``keep``). A copy removed while another create reads it stays
    readable to that reader."""
    entries = []
    for p in folder.glob("*.ext4"):
        with contextlib.suppress(OSError):
            entries.append((p.stat().st_mtime_ns, p))
    entries.sort(reverse=True)
    kept: dict[str, int] = {}
    for _at, p in entries:
        stem = p.name.split(".", 1)[0]
        gone = not (folder.parent / f"{stem}.ext4").exists()
        if p == keep or not (gone or kept.get(stem, 0) >= SIZED_PER_BASE or sum(kept.values()) >= SIZED_TOTAL):
            kept[stem] = kept.get(stem, 0) + 1
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def clone_sized(base: Path, dest: Path, size_mib: int) -> None:
    """Sparse copy of ``base`` to ``dest`` (mode 0600) grown to ``size_mib`` (never shrunk); atomic. A larger size
    is copied from :func:`sized_base` (fsck and resize2fs run once per base and size, not per workspace)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        src = base
        if size_mib * 1024 * 1024 > base.stat().st_size:
            src = sized_base(base, size_mib)
        try:
            _run(["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp)], "copying the base image")
        except HostError:
            if src == base or src.exists():
                raise
            _grow_into(base, tmp, size_mib)  # its sized copy was evicted meanwhile: do it here
        make_private(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
