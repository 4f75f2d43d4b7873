"""Small helpers shared by the magics, widgets and REST handlers. Only the engine's public Python API is used."""

from __future__ import annotations

import inspect
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, MicroagentError

# create() keyword arguments that newer engines accept; passed through only when the user gave them
STORAGE_KWARGS = ("volumes", "disks", "bundles", "outputs")


class FeatureUnavailable(MicroagentError):
    """The engine this surface runs on does not provide a feature yet (volumes, cp, spec files...)."""

    exit_code = 3


def get_engine(state_dir: str | os.PathLike[str] | None = None) -> Engine:
    """An engine on ``state_dir`` (default: ``$MICROAGENT_STATE_DIR``, else ``~/.microagent``)."""
    return Engine(state_dir or os.environ.get("MICROAGENT_STATE_DIR") or None)


def require(engine: Engine, attr: str, what: str) -> Any:
    """The engine attribute ``attr``, or a clear error when this engine version lacks it."""
    value = getattr(engine, attr, None)
    if value is None:
        raise FeatureUnavailable(f"{what} is not available in this version of microagent's engine "
                                 f"(Engine.{attr} is missing); upgrade microagent")
    return value


def create_kwargs(engine: Engine, **kwargs: Any) -> dict[str, Any]:
    """Drop unset values; check that storage options the user did give are supported by ``Engine.create``."""
    out = {k: v for k, v in kwargs.items() if v is not None and not (k in STORAGE_KWARGS and not v)}
    params = inspect.signature(engine.create).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in list(out):
        if key not in params and not accepts_any:
            flag = {"volumes": "-v/--volume", "disks": "--disk", "bundles": "--bundle", "outputs": "--output"}
            raise FeatureUnavailable(f"{flag.get(key, key)} is not supported by this version of microagent's "
                                     f"engine (Engine.create has no {key!r} argument)")
    return out


def env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (``KEY`` alone takes the host's value, as docker and the CLI do)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            if key in os.environ:
                value = os.environ[key]
            else:
                raise InvalidArgument(f"-e {pair!r}: use KEY=VALUE (or KEY to pass the host's value)")
        out[key] = value
    return out


def to_json(obj: Any) -> Any:
    return obj.to_json() if hasattr(obj, "to_json") else obj


def tail_serial_log(engine: Engine, name: str, stop: threading.Event, poll: float = 0.2,
                    follow: bool = True, until_stopped: bool = False) -> Iterator[bytes]:
    """Yield the workspace's serial console log, then (with ``follow``) new bytes as they are written.

    Unlike ``Engine.logs(follow=True)`` this checks ``stop`` between polls, so a widget or HTTP stream can end
    its thread at once even while the console is silent. It keeps following across restarts (the log file is
    the same) until ``stop`` is set or the workspace is deleted (``until_stopped``: or no longer running).
    """
    path = Path(engine.status(name).to_json()["serialLog"])
    fh = None
    last_check = 0.0
    try:
        while not stop.is_set():
            if fh is None and path.exists():
                fh = open(path, "rb")
            chunk = fh.read(65536) if fh else b""
            if chunk:
                yield chunk
                continue
            if not follow:
                return
            now = time.monotonic()
            if now - last_check > 2.0:  # the workspace was deleted: nothing more will come
                last_check = now
                try:
                    info = engine.status(name)
                except MicroagentError:
                    return
                if until_stopped and not info.running and not info.dir.supervisor_alive():
                    if fh and (rest := fh.read()):
                        yield rest
                    return
            stop.wait(poll)
    finally:
        if fh:
            fh.close()

