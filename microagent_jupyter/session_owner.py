"""Which host process owns a session workspace, and the sweep of sessions whose owner is gone.

A per-notebook Python session (and a sandboxed kernel's, and a warm-snapshot build workspace) is removed by its
owner at exit. An owner killed hard (SIGKILL, OOM: no atexit) leaves its VM running. So the owner writes its pid and
start time (``/proc/PID/stat`` field 22: a pid reused by another process has another start time) into the
workspace's directory, and :func:`sweep` (run at the next session start and by ``%microagent session list``) kills
and deletes every workspace whose recorded owner no longer runs. Workspaces without the record (named sessions,
everything else) are never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from microagent_engine import Engine
from microagent_engine.engine.cleanup import remove_quietly
from microagent_engine.fsutil import read_json, write_json_atomic
from microagent_engine.records import process_matches, process_start_time

OWNER_FILE = "session-owner.json"


def _owner_path(engine: Engine, name: str) -> Path:
    return Path(engine.workspaces_dir) / name / OWNER_FILE


def record_owner(engine: Engine, name: str, pid: int | None = None, *, kind: str = "session",
                 kernel_id: str | None = None, notebook: str | None = None, writable: str | None = None) -> None:
    """Record this process (or ``pid``) as the owner of workspace ``name``: a ``session`` (the magic's), a
    ``kernel`` (a sandboxed notebook kernel's: its id, notebook path and writable folder in the guest, for the
    panel) or a ``build``."""
    pid = pid or os.getpid()
    record: dict[str, object] = {"pid": pid, "start": process_start_time(pid), "kind": kind}
    if kernel_id:
        record["kernelId"] = kernel_id
    if notebook:
        record["notebook"] = notebook
    if writable:
        record["writable"] = writable
    write_json_atomic(_owner_path(engine, name), record)


def owner_of(engine: Engine, name: str) -> dict[str, object] | None:
    """The owner record of workspace ``name`` (None: it has none, or it is unreadable), with ``alive``."""
    try:
        record = read_json(_owner_path(engine, name))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    keys = ("pid", "kind", "kernelId", "notebook", "writable")
    out = {k: record[k] for k in keys if isinstance(record.get(k), (str, int))}
    out["alive"] = owner_alive(record)
    return out


def owner_alive(record: dict[str, object]) -> bool:
    """True while the recorded owner process still runs (a zombie, exited but not yet reaped, does not)."""
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and pid > 0 and isinstance(start, int) and process_matches(pid, start)


def remove_workspace(engine: Engine, name: str) -> None:
    """Kill (if it runs) and delete workspace ``name``, quietly."""
    remove_quietly(engine, name)


def sweep(engine: Engine) -> list[str]:
    """Kill and delete the workspaces whose recorded owner process is gone; their names."""
    gone = []
    root = Path(engine.workspaces_dir)
    if not root.is_dir():
        return gone
    for path in sorted(root.glob(f"*/{OWNER_FILE}")):
        name = path.parent.name
        if name.startswith("."):
            continue
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and not owner_alive(record):
            remove_workspace(engine, name)
            gone.append(name)
    return gone
