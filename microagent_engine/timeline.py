"""Wall-clock marks of a workspace's steps across the processes that take them (the CLI or another caller, the
supervisor), for benchmarks: with ``$MICROAGENT_TRACE`` naming a file, :func:`mark` appends one line
``<unix time> <pid> <label>`` to it (one ``O_APPEND`` write, so processes can share the file); without it a mark
costs an environment lookup. ``bench/bench_core.py --trace`` reads them back."""

from __future__ import annotations

import os
import time
from pathlib import Path

TRACE_ENV = "MICROAGENT_TRACE"


def mark(label: str) -> None:
    """Record that ``label`` happened now (nothing unless ``$MICROAGENT_TRACE`` is set; never raises)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{time.time():.6f} {os.getpid()} {label}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def read(path: Path) -> list[tuple[float, int, str]]:
    """The marks in ``path``, in time order: (unix time, pid, label)."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            try:
                out.append((float(parts[0]), int(parts[1]), parts[2]))
            except ValueError:
                continue
    return sorted(out)
