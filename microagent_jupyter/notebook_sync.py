"""A notebook's writable folder: what the sandboxed kernel writes there comes back to the notebook's folder.

Opt-in (the provisioner's ``writable_folder``, e.g. ``results``): the guest sees ``/notebook/results`` writable
(:func:`.notebook_files.copy_into`) and everything else of ``/notebook`` read-only. Its files come back into
``<notebook's folder>/results/`` when the notebook is saved, when the kernel restarts or shuts down, and on request
(``POST /microagent/api/kernels/ID/sync``, the panel's "Sync files" on the kernel's card). A ``%%microagent python
--writable FOLDER`` session's come back with ``%microagent session sync`` and when the session stops.

The guest is hostile, so what comes back is checked like ``cp``'s input: the guest sends a tar stream of that
folder, counted against a byte cap as it arrives (:data:`DEFAULT_MAX_BYTES`; nothing is written when it is over);
only regular files and directories are taken, by names without control characters, quotes, backslashes, ``..``
or a leading ``/``, at most :data:`MAX_FILES` of them; parent directories on the host are created as real
directories and never followed through a symlink; each file is written to a private temporary file and renamed
into place. Host files are never deleted, and a file whose bytes did not change is not rewritten.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, InvalidState
from microagent_engine.fsutil import capped

from .notebook_files import GUEST_NOTEBOOK_DIR

DEFAULT_MAX_BYTES = 256 << 20
MAX_FILES = 5_000
MAX_DEPTH = 16
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BAD = re.compile(r"[\x00-\x1f\x7f\"'\\]")


def check_folder(name: str) -> str:
    """A writable folder's name: one plain path component (``results``, ``out-data``)."""
    if not _FOLDER.match(name or ""):
        raise InvalidArgument(f"writable folder {name!r}: give one folder name of letters, digits, '.', '_' or '-' "
                              f"(not a path), e.g. results")
    return name


@dataclass
class SyncReport:
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # (name: why)
    bytes: int = 0

    def line(self, dest: Path) -> str:
        out = f"{len(self.written)} file(s) back in {dest} ({self.bytes} bytes), {self.unchanged} unchanged"
        if self.skipped:
            out += f", {len(self.skipped)} skipped ({'; '.join(self.skipped[:3])})"
        return out


def _member_parts(name: str) -> list[str] | None:
    """The path components of a tar member's name, or None when it is not a plain relative name."""
    if _BAD.search(name) or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or len(parts) > MAX_DEPTH:
        return None
    return parts


def _real_dir(base: Path, parts: list[str]) -> Path | None:
    """``base/parts…`` as a real directory (made if missing; None when a component is a symlink or a file)."""
    path = base
    for part in parts:
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            return None
    return path


def _same_bytes(path: Path, fh: object, size: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    with open(path, "rb") as mine:
        while True:
            a, b = mine.read(1 << 20), fh.read(1 << 20)  # type: ignore[attr-defined]
            if a != b:
                return False
            if not a:
                return True


def sync_back(engine: Engine, workspace: str, folder: str, dest: Path,
              max_bytes: int = DEFAULT_MAX_BYTES) -> SyncReport:
    """Bring ``/notebook/<folder>`` of running ``workspace`` back into host directory ``dest`` (see the module)."""
    check_folder(folder)
    guest = f"{GUEST_NOTEBOOK_DIR}/{folder}"
    limit = max_bytes + (MAX_FILES + 16) * 1024  # the tar's own headers on top of the files' bytes
    spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)
    take = capped(limit, spool.write, lambda: InvalidState(
        f"{workspace}:{guest} holds more than {max_bytes >> 20} MiB; nothing was brought back (move large files "
        f"out with 'microagent cp')"))

    with spool:
        result = engine.exec(workspace, ["/bin/sh", "-c", 'cd "$1" 2>/dev/null || exit 0; exec tar -cf - .', "sh",
                                         guest], on_stdout=take, capture=False, max_output=4096, timeout=600)
        if not result.ok:
            raise InvalidState(f"reading {workspace}:{guest} failed (exit {result.exit_code})")
        report = SyncReport()
        if spool.tell() == 0:
            return report
        spool.seek(0)
        base = _real_dir(dest.parent, [dest.name])
        if base is None:
            raise InvalidState(f"{dest} is not a directory; rename it so that {folder} can come back")
        files = 0
        try:
            tar = tarfile.open(fileobj=spool, mode="r:")
        except tarfile.TarError as exc:
            raise InvalidState(f"{workspace}:{guest} sent a stream that is not a tar archive ({exc})") from None
        with tar:
            for member in tar:
                parts = _member_parts(member.name)
                if parts is None:
                    report.skipped.append(f"{member.name[:60]!r}: not a plain relative name")
                    continue
                if not parts:
                    continue
                shown = "/".join(parts)
                if member.isdir():
                    if _real_dir(base, parts) is None:
                        report.skipped.append(f"{shown}: a file or symlink of that name is in the way")
                    continue
                if not member.isfile():
                    report.skipped.append(f"{shown}: not a regular file")
                    continue
                files += 1
                if files > MAX_FILES:
                    report.skipped.append(f"{shown}: over {MAX_FILES} files")
                    continue
                parent = _real_dir(base, parts[:-1])
                target = (parent / parts[-1]) if parent is not None else None
                if target is None or (target.exists() and target.is_dir() and not target.is_symlink()):
                    report.skipped.append(f"{shown}: a directory or symlink of that name is in the way")
                    continue
                src = tar.extractfile(member)
                assert src is not None
                if _same_bytes(target, src, member.size):
                    report.unchanged += 1
                    continue
                src = tar.extractfile(member)
                assert src is not None
                fd, tmp = tempfile.mkstemp(dir=parent, prefix=".microagent-sync-")
                try:
                    with os.fdopen(fd, "wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                report.written.append(shown)
                report.bytes += member.size
    return report
