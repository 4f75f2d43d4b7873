"""Small filesystem helpers: private files and directories, atomic JSON files, advisory locks, build-once
artifacts, leftover sweeps.

Everything under the state dir is private to its owner whatever the umask: directories 0700, files 0600
(guest disks, consoles and records may hold secrets). Every creation point goes through :func:`private_dir`,
:func:`open_private`, :func:`make_private` or :func:`write_json_atomic`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import Busy


PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: temp files (``.NAME.tmp``, ``.NAME.XXXX`` of write_json_atomic) a killed command may leave;
#: older than this they belong to no live operation and are swept on the next use of their directory
STALE_TEMP_SECONDS = 3600.0
_OPEN_FLAGS = {"wb": os.O_WRONLY | os.O_TRUNC, "w": os.O_WRONLY | os.O_TRUNC, "ab": os.O_WRONLY | os.O_APPEND,
               "a": os.O_WRONLY | os.O_APPEND}


def private_dir(path: Path) -> Path:
    """Create directory ``path`` (and missing parents) with mode 0700 regardless of the umask; an existing
    directory owned by us is tightened to 0700. Returns ``path``."""
    path = Path(path)
    missing = []
    cur = path
    while not cur.exists() and cur != cur.parent:
        missing.append(cur)
        cur = cur.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, PRIVATE_DIR_MODE)
            os.chmod(d, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
    make_private(path, PRIVATE_DIR_MODE)
    return path


def make_private(path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
    """chmod ``path`` to ``mode`` (default 0600) if we own it and it is looser; never raises for a file we may
    not change (someone else's, a read-only filesystem)."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 != mode:
            os.chmod(path, mode)


def open_private(path: Path, mode: str = "ab", buffering: int = -1) -> IO[Any]:
    """``open(path, mode)`` for ``"wb"``/``"ab"``/``"w"``/``"a"`` that creates the file 0600 whatever the umask
    and tightens an existing one (a log or disk written before this rule)."""
    fd = os.open(path, _OPEN_FLAGS[mode] | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
                os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, buffering)
    except BaseException:
        os.close(fd)
        raise


def sweep_stale_temp(directory: Path, patterns: tuple[str, ...] = (".*.tmp",),
                     stale_after: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete files in ``directory`` matching ``patterns`` that are older than ``stale_after`` seconds: what a
    killed command left (a live operation rewrites its temp file, so its mtime stays fresh). Returns them."""
    now, removed = time.time(), []
    for pattern in patterns:
        for path in Path(directory).glob(pattern):
            try:
                if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > stale_after:
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
    return removed


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` (mode 0600) so a reader sees the old or the new file, never a mix."""
    if not path.parent.is_dir():
        private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True, what: str = "",
              on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a dedicated lock file, never the data file itself). When another
    process holds it: Busy if not ``blocking``, else ``on_wait()`` (if given) is called once and we wait."""
    if not path.parent.is_dir():
        private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if not blocking:
                raise Busy(f"{what or path} is busy with another operation; try again when it finishes") from None
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def waiting_note(what: str) -> str:
    """What a process says while it waits for another one to finish building ``what``."""
    return f"Waiting for another process to finish building {what}"


def build_once(out: Path, build: Callable[[Path], None], what: str,
               progress: Callable[[str], None] | None = None) -> Path:
    """``out``, made by ``build(target)`` unless it exists. Concurrent first uses wait for one build: it runs under
    the lock ``<out's dir>/locks/<out's name>.lock`` (the others wait, then reuse ``out``), writes ``target`` in a
    private staging directory beside ``out`` (``build`` may use that directory for scratch) and is renamed to
    ``out`` only when complete, so no one ever sees a half-built file. Staging left by a killed build is removed
    under the lock; a failed build leaves nothing behind."""
    if out.exists():
        return out
    say = progress or (lambda _msg: None)
    private_dir(out.parent)
    with file_lock(out.parent / "locks" / f"{out.name}.lock", what=what,
                   on_wait=lambda: say(waiting_note(what))):
        if out.exists():  # built by the process we waited for
            return out
        for stale in out.parent.glob(f".{out.name}.*.build"):  # we hold the lock: no live build owns these
            shutil.rmtree(stale, ignore_errors=True)
        staging = private_dir(out.parent / f".{out.name}.{secrets.token_hex(4)}.build")
        try:
            target = staging / out.name
            build(target)
            os.replace(target, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


SPARSE_BLOCK = 4096
_SPARSE_CHUNK = 1 << 20
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


def copy_sparse(read: Callable[[int], bytes], fd: int, limit: int) -> tuple[int, int]:
    """Copy what ``read`` yields into ``fd`` from offset 0 in bounded memory (1 MiB at a time), seeking over
    all-zero 4 KiB blocks so they stay holes; the caller truncates ``fd`` to the final size.

    Reads at most ``limit + 1`` bytes (one more tells the caller the source was longer than ``limit``).
    Returns (bytes read, bytes written to ``fd``).
    """
    pos = written = 0
    while pos <= limit:
        chunk = read(min(_SPARSE_CHUNK, limit + 1 - pos))
        if not chunk:
            break
        start = None  # first block of the current run of data
        for off in range(0, len(chunk), SPARSE_BLOCK):
            zero = chunk[off:off + SPARSE_BLOCK] == _ZERO_BLOCK[:min(SPARSE_BLOCK, len(chunk) - off)]
            if not zero and start is None:
                start = off
            elif zero and start is not None:
                written += os.pwrite(fd, chunk[start:off], pos + start)
                start = None
        if start is not None:
            written += os.pwrite(fd, chunk[start:], pos + start)
        pos += len(chunk)
    return pos, written


def capped(cap: int, write: Callable[[bytes], object], over: Callable[[], Exception]) -> Callable[[bytes], None]:
    """An output callback that counts bytes as they arrive (a guest decides what it sends): past ``cap`` it raises
    ``over()`` (the exec is then killed and nothing beyond the cap is kept), else it passes them to ``write``."""
    seen = [0]

    def take(data: bytes) -> None:
        seen[0] += len(data)
        if seen[0] > cap:
            raise over()
        write(data)

    return take
