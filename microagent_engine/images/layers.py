"""Apply OCI/Docker layer tarballs (plain, gzip or zstd) in order into a staging directory.

Whiteouts follow the OCI spec: ``.wh.NAME`` deletes NAME from lower layers, ``.wh..wh..opq`` hides a directory's
lower contents while entries of the same layer survive. Paths are confined to the root: ``..`` is refused, a
leading ``/`` is relative to the root, and symlinks met on the way are resolved inside the root (never through
the host). Hardlinks, symlinks, fifos, devices, setuid/setgid/sticky bits and xattrs are kept; directory modes
and mtimes are set last.

As root, owners, devices and xattrs go straight into the staging tree (``mkfs.ext4 -d`` copies them). Otherwise
they are recorded in a :class:`Replay` and written into the finished image with one batched ``debugfs -w -f``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import HostError
from ..hostinfo import require_tool
from ..errors import ImageError
from ..fsutil import copy_sparse

_XATTR = "SCHILY.xattr."
_MAX_LINKS = 40


@dataclass
class Replay:
    """Metadata the unprivileged staging tree cannot hold, keyed by root-relative path."""

    owners: dict[str, tuple[int, int]] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)  # full st_mode (type bits included)
    devices: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # kind "c"/"b", major, minor
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)  # mtimes of devices and of their directories

    def forget(self, rel: str) -> None:
        """Drop everything recorded for ``rel`` and below it (it was deleted or replaced)."""
        prefix = rel + "/"
        for table in (self.owners, self.modes, self.devices, self.xattrs, self.times):
            if not table:
                continue
            table.pop(rel, None)
            for key in [k for k in table if k.startswith(prefix)]:
                del table[key]

    def __bool__(self) -> bool:
        return bool(self.owners or self.modes or self.devices or self.xattrs or self.times)


@contextlib.contextmanager
def decompressed(fh: BinaryIO, what: str) -> Iterator[BinaryIO]:
    """``fh`` (seekable) decompressed according to its magic bytes: gzip, zstd (via the zstd tool) or plain."""
    head = fh.read(4)
    fh.seek(0)
    if head[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            yield gz  # type: ignore[misc]
    elif head == b"\x28\xb5\x2f\xfd":
        try:
            zstd = require_tool("zstd")
        except HostError:
            raise HostError(f"{what} is zstd-compressed and the zstd tool is missing; install it: "
                            "apt-get install -y zstd") from None
        proc = subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                shutil.copyfileobj(fh, proc.stdin)  # type: ignore[arg-type]
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()  # type: ignore[union-attr]

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            yield proc.stdout  # type: ignore[misc]
            proc.stdout.read()  # type: ignore[union-attr]
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
            err = proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
            rc = proc.wait()
            feeder.join()
        if rc != 0:
            raise ImageError(f"{what} is not valid zstd data ({err.strip()[-200:]}); the image is corrupt")
    else:
        yield fh


class LayerApplier:
    """Unpacks layers into ``root``; call :meth:`apply` per layer, bottom first, then :meth:`finish`."""

    def __init__(self, root: Path, privileged: bool | None = None) -> None:
        self.root = root
        self.privileged = os.geteuid() == 0 if privileged is None else privileged
        self.replay = Replay()
        self._dirs: dict[str, tuple[int, float]] = {}  # rel -> (mode, mtime), applied by finish()
        self._uid, self._gid = os.geteuid(), os.getegid()
        self._created: set[str] = set()
        self._created_parents: set[str] = set()
        self._parents: dict[str, list[str]] = {}  # cache of resolved parent directories

    # paths
    def _scoped(self, parts: list[str], what: str) -> list[str]:
        """Resolve ``parts`` inside the root, following symlinks scoped to it; returns resolved components."""
        out: list[str] = []
        todo = list(parts)
        links = 0
        while todo:
            c = todo.pop(0)
            if c in ("", "."):
                continue
            if c == "..":
                if out:
                    out.pop()
                continue
            p = self.root.joinpath(*out, c)
            if p.is_symlink():
                links += 1
                if links > _MAX_LINKS:
                    raise ImageError(f"{what}: too many levels of symbolic links")
                target = os.readlink(p)
                if target.startswith("/"):
                    out = []
                todo = target.split("/") + todo
                continue
            out.append(c)
        return out

    def _parent(self, parts: list[str], what: str) -> list[str]:
        """Resolved parent components, creating missing directories (and replacing non-directories)."""
        key = "/".join(parts)
        if key in self._parents:
            return self._parents[key]
        resolved = self._scoped(parts, what)
        for i in range(len(resolved)):
            p = self.root.joinpath(*resolved[: i + 1])
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue
            if st is not None:
                self._remove("/".join(resolved[: i + 1]))
            os.mkdir(p, 0o755)  # implicit parent: root-owned like in other runtimes
            if not self.privileged and (self._uid, self._gid) != (0, 0):
                self.replay.owners["/".join(resolved[: i + 1])] = (0, 0)
        self._parents[key] = resolved
        return resolved

    @staticmethod
    def _split(name: str, what: str) -> list[str]:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ImageError(f"{what}: entry {name!r} escapes the root with '..'; refusing the layer")
        return parts

    def _remove(self, rel: str) -> None:
        self._parents.clear()
        p = self.root / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            st = None
        self.replay.forget(rel)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(p)
            return
        if not self.privileged:  # a non-writable directory would block rmtree
            for d, _, _ in os.walk(p):
                os.chmod(d, 0o700)
        shutil.rmtree(p)
        prefix = rel + "/"
        self._dirs.pop(rel, None)
        for key in [k for k in self._dirs if k.startswith(prefix)]:
            del self._dirs[key]

    def _opaque(self, rel: str) -> None:
        """Hide everything under ``rel`` that did not come from the current layer."""
        def prune(crel: str) -> None:
            p = self.root / crel
            if crel in self._created or crel in self._created_parents:
                if p.is_dir() and not p.is_symlink():
                    for name in os.listdir(p):
                        prune(f"{crel}/{name}" if crel else name)
            else:
                self._remove(crel)

        base = self.root / rel
        for name in os.listdir(base):
            prune(f"{rel}/{name}" if rel else name)
        prefix = rel + "/" if rel else ""
        for key in [k for k in self.replay.devices if k.startswith(prefix) and k not in self._created]:
            self.replay.forget(key)

    def _mark(self, rel: str) -> None:
        self._created.add(rel)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            self._created_parents.add("/".join(parts[:i]))

    # metadata
    def _meta(self, rel: str, path: Path, m: tarfile.TarInfo, kind: int) -> None:
        mode = m.mode & 0o7777
        xattrs = {k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
                  for k, v in m.pax_headers.items() if k.startswith(_XATTR)}
        is_link = kind == stat.S_IFLNK
        if self.privileged:
            os.lchown(path, m.uid, m.gid)
            for name, value in xattrs.items():
                try:
                    os.setxattr(path, name, value, follow_symlinks=False)
                except OSError:  # the staging filesystem may not take e.g. security.* names
                    self.replay.xattrs.setdefault(rel, {})[name] = value
            staged = mode
        else:
            if (m.uid, m.gid) != (self._uid, self._gid):
                self.replay.owners[rel] = (m.uid, m.gid)
            if xattrs:
                self.replay.xattrs[rel] = xattrs
            staged = mode | (0o700 if kind == stat.S_IFDIR else 0o600)
            if staged != mode and not is_link:
                self.replay.modes[rel] = kind | mode
        if kind == stat.S_IFDIR:
            self._dirs[rel] = (staged, m.mtime)
            return
        if not is_link:
            os.chmod(path, staged)
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)

    # layers
    def apply(self, fh: BinaryIO, what: str) -> None:
        """Apply one layer read from the seekable ``fh``; ImageError if it is not a valid tar (compressed or not)."""
        self._created, self._created_parents = set(), set()
        try:
            with decompressed(fh, what) as stream:
                with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tf:
                    for m in tf:
                        self._entry(tf, m, what)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ImageError(f"{what} is not a valid tar archive ({exc}); the image is corrupt") from None

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, what: str) -> None:
        parts = self._split(m.name, what)
        if not parts:
            if m.isdir():
                self._meta("", self.root, m, stat.S_IFDIR)
            return
        base = parts[-1]
        if base.startswith(".wh."):
            parent = self._scoped(parts[:-1], what)
            if not (self.root.joinpath(*parent)).is_dir():
                return  # nothing below to hide
            if base == ".wh..wh..opq":
                self._opaque("/".join(parent))
            else:
                self._remove("/".join(parent + [base[4:]]))
            return
        parent = self._parent(parts[:-1], what)
        rel = "/".join(parent + [base])
        path = self.root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (m.isdir() and stat.S_ISDIR(st.st_mode)):
            self._remove(rel)
        elif st is None and rel in self.replay.devices:
            self.replay.forget(rel)
        self._mark(rel)
        if m.isdir():
            if st is None or not stat.S_ISDIR(st.st_mode):
                os.mkdir(path, 0o700)
            self._meta(rel, path, m, stat.S_IFDIR)
        elif m.isreg():
            src = tf.extractfile(m)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:  # zero blocks stay holes (mkfs.ext4 -d keeps them as holes too)
                copy_sparse(src.read, out.fileno(), m.size)
                out.truncate(m.size)
            self._meta(rel, path, m, stat.S_IFREG)
        elif m.issym():
            os.symlink(m.linkname, path)
            self._parents.clear()
            self._meta(rel, path, m, stat.S_IFLNK)
        elif m.islnk():
            tparts = self._split(m.linkname, what)
            if not tparts:
                raise ImageError(f"{what}: hardlink {m.name!r} points at the root")
            target = self.root.joinpath(*self._scoped(tparts[:-1], what), tparts[-1])
            if not os.path.lexists(target) or os.path.isdir(target) and not os.path.islink(target):
                raise ImageError(f"{what}: hardlink {m.name!r} points at {m.linkname!r}, which is not a file in "
                                 "this or a lower layer; the layer is corrupt")
            os.link(target, path, follow_symlinks=False)
        elif m.isfifo():
            os.mkfifo(path, 0o600)
            self._meta(rel, path, m, stat.S_IFIFO)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            if self.privileged:
                os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
                self._meta(rel, path, m, kind)
            else:
                self.replay.devices[rel] = ("c" if m.ischr() else "b", m.devmajor, m.devminor)
                self.replay.modes[rel] = kind | (m.mode & 0o7777)
                self.replay.times[rel] = int(m.mtime)
                if (m.uid, m.gid) != (0, 0):
                    self.replay.owners[rel] = (m.uid, m.gid)
        # other types (e.g. GNU volume headers) carry no file

    def finish(self) -> None:
        """Set directory modes and mtimes, deepest first, once every layer is in."""
        for rel in sorted(self._dirs, key=lambda r: -r.count("/") - (1 if r else 0)):
            mode, mtime = self._dirs[rel]
            p = self.root / rel
            os.chmod(p, mode)
            os.utime(p, (mtime, mtime), follow_symlinks=False)
        if "" in self._dirs:  # mkfs.ext4 -d does not copy the root directory's times
            self.replay.times[""] = int(self._dirs[""][1])
        for rel in list(self.replay.devices):  # debugfs mknod touches the directory: restore its mtime after
            parent = rel.rpartition("/")[0]
            self.replay.times[parent] = int(os.lstat(self.root / parent).st_mtime)


def _quote(rel: str) -> str:
    if any(c in rel for c in '"\n\\'):
        raise ImageError(f"path {rel!r} has a quote, backslash or newline; it cannot be replayed with debugfs "
                         "in an unprivileged build: build the image as root")
    return f'"/{rel}"'


def replay_into(image: Path, replay: Replay) -> None:
    """Write ``replay`` into the ext4 ``image`` with one batched ``debugfs -w -f``; raises on any error."""
    if not replay:
        return
    debugfs = require_tool("debugfs")
    with tempfile.TemporaryDirectory(prefix=".replay-", dir=image.parent) as tmp:
        lines: list[str] = []
        for rel, (kind, major, minor) in sorted(replay.devices.items()):
            parent, _, base = rel.rpartition("/")
            lines += [f"cd {_quote(parent)}" if parent else "cd /", f'mknod "{base}" {kind} {major} {minor}']
            _quote(base)
        lines.append("cd /")
        for rel, mtime in sorted(replay.times.items()):
            lines += [f"sif {_quote(rel)} mtime @{mtime}", f"sif {_quote(rel)} atime @{mtime}"]
        for rel, mode in sorted(replay.modes.items()):
            lines.append(f"sif {_quote(rel)} mode 0{mode:o}")
        for rel, (uid, gid) in sorted(replay.owners.items()):
            q = _quote(rel)
            lines += [f"sif {q} uid {uid}", f"sif {q} gid {gid}"]
        for i, (rel, attrs) in enumerate(sorted(replay.xattrs.items())):
            for j, (name, value) in enumerate(sorted(attrs.items())):
                vf = Path(tmp) / f"x{i}.{j}"
                vf.write_bytes(value)
                lines.append(f"ea_set -f {vf} {_quote(rel)} {name}")
        script = Path(tmp) / "script"
        script.write_text("\n".join(lines) + "\n")
        proc = subprocess.run([debugfs, "-w", "-f", str(script), str(image)], capture_output=True, text=True)
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise ImageError(f"writing owners/devices/xattrs into {image.name} with debugfs failed: "
                         f"{'; '.join(errors[:5]) or proc.returncode}")
