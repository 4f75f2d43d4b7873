"""The supervisor: one small process per running workspace.

It owns the hypervisor process, appends the serial console to ``serial.log``, speaks to the guest agent over the
virtio-serial socket, multiplexes clients' execs onto that one channel, runs setup (first boot) and the
entrypoint, applies the restart policy, bridges mediation, and records every state transition durably in
``state.json`` -- so ``ps``/``status`` stay true after a crash or a ``kill -9`` of the VM.

- ``core``: the Supervisor, set up in parts that share its state: ``record`` (the state record, through
  ``states.transition``), ``boot`` (cold, template and snapshot boots, the restart decision), ``channel`` (the agent
  channel, the serial console, liveness) and ``control`` (quarantine, pause, halt, stop, kill, QMP); ``timing`` holds
  their timeouts and bounds
- ``roles``: what each collaborator below may use of the supervisor (none imports ``core``)
- ``clients``: control-socket connections, routing of their execs, control requests
- ``guest_tasks``: setup and entrypoint commands the supervisor runs itself
- ``mediation``: the guest-to-host TCP bridge over its own virtio-serial port
- ``publish``: published host ports relayed into the guest

Run as ``python -m microagent_engine.supervisor WORKSPACE_DIR --ready-fd N`` (the engine does this).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import traceback
from pathlib import Path

from ..fsutil import read_json
from ..model import LaunchSpec
from ..records import WorkspaceDir, WorkspaceState
from ..timeline import mark
from .core import Supervisor

__all__ = ["Supervisor", "main"]


def read_secrets(fd: int) -> dict[str, str]:
    """The placeholder -> value map the engine wrote into the pipe ``fd`` (closed after reading)."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = json.loads(b"".join(chunks) or b"{}")
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="microagent-supervisor")
    parser.add_argument("workspace_dir")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--secrets-fd", type=int, help="a pipe holding the secrets' values (JSON), read once")
    parser.add_argument("--foreground", action="store_true", help="do not detach (for debugging)")
    args = parser.parse_args(argv)
    mark("supervisor: main")
    ws = WorkspaceDir(Path(args.workspace_dir))
    if not args.foreground:
        if os.fork() > 0:  # the engine waits for this parent; the child lives on, reparented to init
            os._exit(0)
    lock_fd = os.open(ws.supervisor_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b'{"ok": false, "error": "another supervisor is already running"}\n')
        return 1
    launch = LaunchSpec.from_json(read_json(ws.run_dir / "launch.json"))
    if args.secrets_fd is not None:
        launch.secret_values = read_secrets(args.secrets_fd)
    sup = Supervisor(ws, launch, args.ready_fd)
    try:
        return asyncio.run(sup.run())
    except Exception:
        traceback.print_exc()
        error = "the supervisor crashed; see supervisor.log"
        state: WorkspaceState = ws.load_state()
        state.state, state.error, state.supervisor_pid = "failed", error, None
        ws.save_state(state)
        sup.notify_ready(False, error)
        return 1


