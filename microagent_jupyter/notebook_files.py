"""The notebook's directory inside its sandbox: a read-only copy taken when the kernel (or the session) starts.

The copy goes through the guest agent as a tar stream on a command's stdin, so it works on a warm (resumed)
workspace and never exposes a live host directory. Only regular files and directories are copied (no symlinks,
devices or sockets; ``.ipynb_checkpoints`` and ``__pycache__`` are left out), up to a byte budget: what does not
fit is listed in ``MICROAGENT-COPY-INCOMPLETE.txt`` beside the files. The kernel starts in the copy. Changes made
in the guest stay there (bring results back with ``%microagent cp WORKSPACE:/notebook/FILE .`` or ``--out``), but
for an opt-in writable folder whose files come back (:mod:`.notebook_sync`).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError

#: where the copy lands in the guest (the kernel's working directory)
GUEST_NOTEBOOK_DIR = "/notebook"
#: the default byte budget of the copy
DEFAULT_MAX_BYTES = 256 << 20
#: at most this many files (a directory of millions of small files would take forever under TCG)
MAX_FILES = 20_000
SKIPPED_DIRS = (".ipynb_checkpoints", "__pycache__", ".git", "node_modules", ".venv")
INCOMPLETE = "MICROAGENT-COPY-INCOMPLETE.txt"


def build_tar(root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[tempfile.SpooledTemporaryFile, int, list[str]]:
    """A tar of ``root``'s regular files (not following symlinks) within the budget: (tar file at offset 0,
    files copied, relative paths left out)."""
    out = tempfile.SpooledTemporaryFile(max_size=16 << 20)
    left_out: list[str] = []
    count, used = 0, 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if count >= MAX_FILES or used + st.st_size > max_bytes:
                    left_out.append(rel)
                    continue
                info = tarfile.TarInfo(rel)
                info.size, info.mode, info.mtime = st.st_size, (st.st_mode & 0o755) | 0o444, int(st.st_mtime)
                try:
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                except OSError:
                    left_out.append(rel)
                    continue
                count, used = count + 1, used + st.st_size
        if left_out:
            note = ("These files of the notebook's directory were not copied into the sandbox (over the copy's "
                    f"budget of {max_bytes >> 20} MiB or {MAX_FILES} files, or unreadable):\n"
                    + "\n".join(left_out[:1000]) + "\n").encode()
            info = tarfile.TarInfo(INCOMPLETE)
            info.size, info.mode = len(note), 0o444
            tar.addfile(info, io.BytesIO(note))
    out.seek(0)
    return out, count, left_out


#: where a writable folder's files live in the guest (bind-mounted at /notebook/FOLDER)
GUEST_WRITABLE_DIR = "/var/lib/microagent-writable"


def copy_into(engine: Engine, workspace: str, root: Path, max_bytes: int = DEFAULT_MAX_BYTES,
              writable: str | None = None) -> str:
    """Copy ``root`` into the running ``workspace`` at :data:`GUEST_NOTEBOOK_DIR` (read-only, but for the
    ``writable`` folder: a name checked by :func:`.notebook_sync.check_folder`); a line saying what was copied.
    MicroagentError when the guest cannot unpack it."""
    tar, count, left_out = build_tar(root, max_bytes)
    with tar:
        # read-only for root too: a read-only bind mount of the copy. Few processes: each costs ~0.1 s under TCG.
        d = GUEST_NOTEBOOK_DIR
        w = f"{GUEST_WRITABLE_DIR}/{writable}"
        unmount = (f"umount {d}/{writable} 2>/dev/null; " if writable else "") + f"umount {d} 2>/dev/null"
        steps = [f"if [ -e {d} ]; then {unmount}; rm -rf {d}; fi"]  # a restart copies afresh
        if writable:
            steps.append(f"if [ -e {w} ]; then rm -rf {w}; fi")
        unpack = [f"mkdir -p {d} {GUEST_WRITABLE_DIR}" if writable else f"mkdir -p {d}", f"tar -x -C {d}"]
        if writable:  # its files move to a writable directory, bound over the read-only copy's empty folder
            unpack += [f"mkdir -p {d}/{writable}", f"mv {d}/{writable} {w}", f"mkdir {d}/{writable}"]
        unpack.append(f"mount -o bind,ro {d} {d}")
        if writable:
            unpack.append(f"mount --bind {w} {d}/{writable}")
        script = "; ".join(steps) + "; " + " && ".join(unpack)
        result = engine.exec(workspace, ["/bin/sh", "-c", script], stdin=tar, timeout=600, max_output=4096)
    if not result.ok:
        raise MicroagentError(f"the notebook's directory could not be copied into {workspace}: "
                              f"{result.stderr.decode(errors='replace')[-300:]}")
    extra = f"; {len(left_out)} left out (see {GUEST_NOTEBOOK_DIR}/{INCOMPLETE})" if left_out else ""
    if writable:
        extra += f"; {GUEST_NOTEBOOK_DIR}/{writable} is writable and comes back to {root / writable}"
    return f"copied {count} file(s) of {root} to {GUEST_NOTEBOOK_DIR} (read-only){extra}"


class Background:
    """``fn(*args, **kwargs)`` running in a daemon thread (a notebook folder's copy beside a kernel's launch);
    :meth:`result` waits for its value (or raises its error)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name="microagent-copy",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (raised in the caller's thread by result())
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

