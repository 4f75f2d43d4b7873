"""Helpers shared by the tests (no fixtures here: those live in conftest.py): the checkout, free ports, kernels'
environments, workspace listings, other users' access and sockets' listeners."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (bound and released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_config(state_dir: Path, allowed_roots: list[Path] | tuple[Path, ...] = ()) -> dict[str, Any]:
    """pytest-jupyter's ``jp_server_config`` for a server with the microagent extension on ``state_dir``."""
    return {"ServerApp": {"jpserver_extensions": {"microagent_jupyter": True}},
            "MicroagentConfig": {"state_dir": str(state_dir), "allowed_roots": [str(r) for r in allowed_roots]}}


def kernel_env(state_dir: Path) -> dict[str, str]:
    """Environment for a spawned kernel: the test state dir and this checkout on the path."""
    return {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def kernel_spec_argv() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def running(engine: Any) -> set[str]:
    """Names of the workspaces whose VMs run now."""
    return {i.name for i in engine.ps()}


def run_names(engine: Any, prefixes: tuple[str, ...] = ("run-", "nb-", "mg-")) -> list[str]:
    """Running workspaces this module's tests could have started: one-shot ``run-*`` and the notebooks'/magics'
    named ones (other modules' workspaces, like the session's ``shared``, are ignored)."""
    return sorted(n for n in running(engine) if n.startswith(prefixes))


def connect_as_other_user(path: str, uid: int = 65534) -> str:
    """Try to open the unix socket ``path`` as another local user (``nobody``); the error it got, or "connected".
    Runs the system Python (readable by every user) with setpriv, so no file of this checkout is needed."""
    import subprocess

    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
            "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c",
                          code, path], capture_output=True, text=True, timeout=60, cwd="/")
    return (out.stdout.strip() or out.stderr.strip()).splitlines()[-1]


def tcp_listeners(pid: int) -> list[str]:
    """The TCP (v4 and v6) sockets in LISTEN state that process ``pid`` holds, as ``addr:port`` hex strings."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append(cols[1])
    return found
