"""Small helpers shared by the magics, widgets and REST handlers. Only the engine's public Python API is used."""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator

from microagent_engine import Engine
from microagent_engine.config import parse_env_pairs as env_pairs  # noqa: F401 (re-exported)
from microagent_engine.errors import MicroagentError
from microagent_engine.logfiles import follow as follow_log


def get_engine(state_dir: str | os.PathLike[str] | None = None) -> Engine:
    """An engine on ``state_dir`` (default: ``$MICROAGENT_STATE_DIR``, else ``~/.microagent``)."""
    return Engine(state_dir or os.environ.get("MICROAGENT_STATE_DIR") or None)


def tail_serial_log(engine: Engine, name: str, stop: threading.Event, poll: float = 0.2,
                    follow: bool = True) -> Iterator[bytes]:
    """Yield the workspace's serial console log, then (with ``follow``) new bytes as they are written.

    Unlike ``Engine.logs(follow=True)``, which ends when the workspace stops, this keeps following across halts
    and restarts (the log file is the same), as a widget left open should, until ``stop`` is set or the
    workspace is deleted.
    """
    path = engine.status(name).dir.serial_log
    last_check = [0.0]

    def keep_going() -> bool:
        if not follow or stop.is_set():
            return False
        if time.monotonic() - last_check[0] > 2.0:  # the workspace was deleted: nothing more will come
            last_check[0] = time.monotonic()
            try:
                engine.status(name)
            except MicroagentError:
                return False
        return True

    return follow_log(path, keep_going, stop.wait, poll)

