"""QEMU's QMP monitor: a blocking session (commands, descriptor passing, migrations) and a one-shot command
for the event loop. The supervisor, templates and snapshots all talk to QEMU through this."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import HostError


def ignore_shared_caps(on: bool) -> dict[str, Any]:
    """``migrate-set-capabilities`` arguments for ``x-ignore-shared``: on, RAM that is a shared file is left out of
    the stream (a template's, a RAM-file snapshot's); the saving and the restoring side must agree."""
    return {"capabilities": [{"capability": "x-ignore-shared", "state": on}]}


class QmpError(HostError):
    """QEMU refused a QMP command, or its monitor went away."""


class QmpSession:
    """One QMP connection (capabilities negotiated on open)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise QmpError(f"could not reach QEMU's monitor at {path}: {exc}") from exc
        self.file = self.sock.makefile("rb")
        self._line()  # greeting
        self.command("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except OSError as exc:
            raise QmpError(f"QEMU's monitor did not answer: {exc}") from exc
        if not line:
            raise QmpError("QEMU's monitor closed the connection (QEMU exited?)")
        return json.loads(line)

    def command(self, name: str, arguments: dict[str, Any] | None = None, fds: list[int] | None = None) -> Any:
        """Run ``name``; its ``return`` value, or QmpError with QEMU's message. ``fds`` ride along (getfd)."""
        msg = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})}).encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [msg], fds)
        else:
            self.sock.sendall(msg)
        while True:
            answer = self._line()
            if "event" in answer:
                continue
            if "error" in answer:
                raise QmpError(f"QEMU refused {name}: {answer['error'].get('desc', answer['error'])}")
            return answer.get("return")

    def wait_migration(self, timeout: float = 60.0) -> None:
        """Poll ``query-migrate`` until the migration completed (QmpError if it failed or took too long)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.command("query-migrate") or {}
            status = info.get("status", "none")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration still {status} after {timeout:.0f} s")
            time.sleep(0.002)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> "QmpSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def qmp_command(socket_path: Path, command: str, arguments: dict[str, Any] | None = None) -> bool:
    """Run one QMP command from the event loop (in a thread); True if QEMU answered it with a ``return``."""
    def run() -> bool:
        try:
            with QmpSession(socket_path, timeout=10.0) as qmp:
                qmp.command(command, arguments)
            return True
        except (QmpError, OSError, ValueError):
            return False

    import asyncio  # (the supervisor's side: the engine imports this module without it)

    return await asyncio.to_thread(run)
