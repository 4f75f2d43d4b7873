"""Log files a guest can write into (the serial console): capped by rotation, and read from their end.

A guest writes its console as fast as it likes (~0.4 MB/s measured), so ``serial.log`` is kept to
:data:`SERIAL_LOG_MAX` bytes: when it would grow past that, it is renamed to ``serial.log.1`` (replacing the
previous one) and a new file begins. At most twice the cap is on disk per workspace. Readers never load a
whole log: :func:`tail_bytes` and :func:`tail_lines` seek to the end and read backwards a bounded amount.
:func:`follow` is the one reader that keeps up with a log as it grows, across rotations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable, Iterator

#: the serial log rotates to ``<name>.1`` when it would pass this size
SERIAL_LOG_MAX = 8 << 20
#: the most a tail reads, whatever number of lines is asked for
TAIL_MAX_BYTES = SERIAL_LOG_MAX


def rotated(path: Path) -> Path:
    """Where ``path``'s previous generation is kept."""
    return path.with_name(path.name + ".1")


class RotatingLog:
    """An append-only log file that rotates to ``<name>.1`` at ``max_bytes`` (files are created 0600)."""

    def __init__(self, path: Path, max_bytes: int = SERIAL_LOG_MAX) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd = self._open()
        self.size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        """Append ``data`` (rotating first if it would pass the cap). Write errors are ignored: a full disk
        must not take the supervisor down."""
        if self.size and self.size + len(data) > self.max_bytes:
            self.rotate()
        if len(data) > self.max_bytes:  # one write larger than the cap keeps only its end
            data = data[-self.max_bytes:]
        try:
            os.write(self._fd, data)
            self.size += len(data)
        except OSError:
            pass

    def rotate(self) -> None:
        try:
            os.replace(self.path, rotated(self.path))
        except OSError:
            pass
        os.close(self._fd)
        self._fd = self._open()
        self.size = os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)


def tail_bytes(path: Path, max_bytes: int = TAIL_MAX_BYTES) -> bytes:
    """The last ``max_bytes`` bytes of ``path`` (b"" if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, end - max_bytes))
            return fh.read(max_bytes)
    except OSError:
        return b""


def tail_lines(path: Path, lines: int, max_bytes: int = TAIL_MAX_BYTES) -> list[str]:
    """The last ``lines`` lines of ``path`` (CRLF as LF), reading backwards in blocks from the end, never more
    than ``max_bytes``."""
    if lines <= 0:
        return []
    try:
        fh = open(path, "rb")
    except OSError:
        return []
    with fh:
        pos = fh.seek(0, os.SEEK_END)
        data = b""
        block = 65536
        while pos > 0 and data.count(b"\n") <= lines and len(data) < max_bytes:
            step = min(block, pos, max_bytes - len(data))
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    text = data.decode(errors="replace").replace("\r\n", "\n")
    return text.splitlines()[-lines:]


def _replaced(fh: IO[bytes], path: Path) -> bool:
    """Is ``path`` now a different file from the open ``fh`` (the log rotated under a follower)?"""
    try:
        return os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino
    except OSError:
        return False


def follow(path: Path, keep_going: Callable[[], bool], wait: Callable[[float], object], poll: float = 0.1,
           chunk_bytes: int = 65536) -> Iterator[bytes]:
    """Yield ``path``'s bytes from its start, then new ones as they are written while ``keep_going()`` (asked
    whenever the reader has caught up; ``wait(poll)`` between checks). A rotation reopens the new file once the
    old one is read to its end; a file that does not exist yet is waited for. When ``keep_going()`` turns false
    what is left is read and the generator ends."""
    fh: IO[bytes] | None = None
    try:
        while True:
            if fh is None:
                try:
                    fh = open(path, "rb")
                except FileNotFoundError:
                    pass
            chunk = fh.read(chunk_bytes) if fh else b""
            if chunk:
                yield chunk
                continue
            if fh and _replaced(fh, path):  # the writer began a new file: continue there
                fh.close()
                fh = None
                continue
            if not keep_going():
                while fh and (rest := fh.read(chunk_bytes)):
                    yield rest
                return
            wait(poll)
    finally:
        if fh:
            fh.close()
