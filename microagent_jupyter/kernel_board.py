"""What this server's sandboxed kernels are doing: each launch's preparation steps, its VM and its notebook.

The provisioner runs in the Jupyter server's process and reports here; ``GET /microagent/api/kernels`` hands the
board to JupyterLab, whose sandbox status item shows a first start's steps (building the Python image, the warm
snapshot, booting) in the notebook instead of a bare "Initializing", and then the kernel's VM. Thread-safe (launches
run in worker threads) and bounded: at most :data:`MAX_ENTRIES` launches, :data:`MAX_STEPS` steps each, messages
cut at :data:`MAX_MESSAGE` characters. Every message is the engine's own wording, never guest output.
"""

from __future__ import annotations

import threading
import time
from typing import Any

MAX_ENTRIES = 64
MAX_STEPS = 40
MAX_MESSAGE = 300
#: a finished launch stays on the board this long (the status item shows "ready" once), unless it runs on
KEEP_FAILED_SECONDS = 600.0

_lock = threading.Lock()
_entries: dict[str, dict[str, Any]] = {}


def begin(kernel_id: str, notebook: str | None, workspace: str | None = None) -> None:
    """A launch (or a restart, in ``workspace``) of kernel ``kernel_id`` for ``notebook`` (its path under the
    server's root) began."""
    with _lock:
        _entries.pop(kernel_id, None)
        while len(_entries) >= MAX_ENTRIES:
            _entries.pop(next(iter(_entries)))
        _entries[kernel_id] = {"kernelId": kernel_id, "notebook": notebook, "workspace": workspace,
                               "phase": "preparing", "steps": [], "startedAt": time.time(), "readyAt": None,
                               "error": None}


def step(kernel_id: str, message: str) -> None:
    """One more preparation step of ``kernel_id``'s launch."""
    with _lock:
        entry = _entries.get(kernel_id)
        if entry is None:
            return
        steps = entry["steps"]
        if len(steps) >= MAX_STEPS:
            del steps[1]  # keep the first (what the launch is) and the latest
        steps.append({"t": round(time.time() - entry["startedAt"], 1), "message": str(message)[:MAX_MESSAGE]})


def workspace(kernel_id: str, name: str) -> None:
    """The VM of ``kernel_id`` is ``name``."""
    with _lock:
        if kernel_id in _entries:
            _entries[kernel_id]["workspace"] = name


def ready(kernel_id: str) -> None:
    with _lock:
        entry = _entries.get(kernel_id)
        if entry is not None:
            entry["phase"], entry["readyAt"] = "ready", time.time()


def failed(kernel_id: str, error: str) -> None:
    with _lock:
        entry = _entries.get(kernel_id)
        if entry is not None:
            entry["phase"], entry["error"] = "failed", str(error)[:MAX_MESSAGE * 3]


def forget(kernel_id: str) -> None:
    """The kernel was shut down."""
    with _lock:
        _entries.pop(kernel_id, None)


def entries() -> list[dict[str, Any]]:
    """A copy of the board (failed launches drop off after :data:`KEEP_FAILED_SECONDS`)."""
    now = time.time()
    with _lock:
        for kid in [k for k, e in _entries.items()
                    if e["phase"] == "failed" and now - e["startedAt"] > KEEP_FAILED_SECONDS]:
            _entries.pop(kid)
        return [{**e, "steps": list(e["steps"])} for e in _entries.values()]


def entry(kernel_id: str) -> dict[str, Any] | None:
    with _lock:
        e = _entries.get(kernel_id)
        return None if e is None else {**e, "steps": list(e["steps"])}
