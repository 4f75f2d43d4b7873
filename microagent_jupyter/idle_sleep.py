"""Scale to zero for Python sessions and sandboxed kernels: once no cell has run for ``MICROAGENT_SLEEP_AFTER``
seconds (default 600; 0 turns it off), the workspace is put to sleep (:meth:`Engine.sleep`: its memory saved to a
file, its VM ended, every stream and published socket kept by its supervisor). The next cell's messages wake it;
nothing on the host side reconnects (see the README's "Scale to zero").
"""

from __future__ import annotations

import os
import threading

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError

SLEEP_AFTER_ENV = "MICROAGENT_SLEEP_AFTER"
DEFAULT_SLEEP_AFTER = 600.0


def sleep_after() -> float:
    """Idle seconds before a session's or kernel's workspace sleeps (0: never); a bad value means the default."""
    try:
        value = float(os.environ.get(SLEEP_AFTER_ENV, DEFAULT_SLEEP_AFTER))
    except ValueError:
        return DEFAULT_SLEEP_AFTER
    return value if value >= 0 else DEFAULT_SLEEP_AFTER


class IdleSleeper:
    """Puts workspace ``name`` to sleep when nothing has been busy for ``after`` seconds. ``busy()`` / ``idle()``
    bracket each request (they nest); the timer runs only while no request is open."""

    def __init__(self, engine: Engine, name: str, after: float | None = None) -> None:
        self.engine, self.name = engine, name
        self.after = sleep_after() if after is None else after
        self._lock = threading.Lock()
        self._busy = 0
        self._timer: threading.Timer | None = None
        self._closed = False
        self.sleeps = 0  # how many times it put the workspace to sleep

    def start(self) -> None:
        """Run the timer from now (when nothing is busy)."""
        with self._lock:
            if not self._busy:
                self._arm()

    def on_busy(self, busy: bool) -> None:
        """:meth:`busy` or :meth:`idle` (a relay's callback)."""
        self.busy() if busy else self.idle()

    def busy(self) -> None:
        with self._lock:
            self._busy += 1
            self._cancel()

    def idle(self) -> None:
        with self._lock:
            self._busy = max(0, self._busy - 1)
            if not self._busy:
                self._arm()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cancel()

    def _arm(self) -> None:
        self._cancel()
        if self.after > 0 and not self._closed:
            timer = threading.Timer(self.after, self._fire)
            timer.daemon = True
            timer.name = f"microagent-idle-{self.name}"
            self._timer = timer
            timer.start()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        with self._lock:
            if self._busy or self._closed or self._timer is None or self._timer is not threading.current_thread():
                return
            self._timer = None
        try:  # a request that starts meanwhile is held by the supervisor and wakes it again
            self.engine.sleep(self.name)
            self.sleeps += 1
        except MicroagentError:
            pass  # not running any more (stopped, removed) or busy: nothing to save
