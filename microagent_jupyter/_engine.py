"""Small helpers shared by the magics, widgets and REST handlers. Only the engine's public Python API is used."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

from microagent_engine import Engine
from microagent_engine.config import parse_env_pairs as env_pairs  # noqa: F401 (re-exported)
from microagent_engine.errors import MicroagentError
from microagent_engine.logfiles import follow as follow_log
from microagent_engine.model import parse_attachment_flags, parse_output_flag
from microagent_engine.sandbox.network import NetworkPolicy

def get_engine(state_dir: str | os.PathLike[str] | None = None) -> Engine:
    """An engine on ``state_dir`` (default: ``$MICROAGENT_STATE_DIR``, else ``~/.microagent``)."""
    return Engine(state_dir or os.environ.get("MICROAGENT_STATE_DIR") or None)


def create_kwargs(**kwargs: Any) -> dict[str, Any]:
    """The create() arguments the user actually gave (unset values and empty lists dropped)."""
    return {k: v for k, v in kwargs.items() if v is not None and v != []}


def network_kwarg(args: Any) -> Any:
    """The network policy of ``--network``/``--allow``/``--allow-host-port`` (None: the default policy)."""
    return NetworkPolicy.from_flags(args.network, args.allow, args.allow_host_port)


def storage_kwargs(args: Any) -> dict[str, Any]:
    """``attachments`` and ``outputs`` from the ``-v``/``--disk``/``--bundle``/``--output`` strings of a magic's
    parsed arguments, through the engine's one parser of that grammar (unset when none were given)."""
    attachments = parse_attachment_flags(args.volume or [], args.disk or [], args.bundle or [])
    outputs = [parse_output_flag(o) for o in args.output or []]
    return {"attachments": attachments or None, "outputs": outputs or None}


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

