"""Talking to a running workspace: commands (exec, ping), the serial console and its log."""

from __future__ import annotations

import secrets
import threading
import time
from typing import IO, Iterator

from ..client import DEFAULT_MAX_OUTPUT, ExecResult, OutputCallback, SupervisorConnection
from .. import logfiles
from ..errors import GuestError, InvalidArgument, InvalidState
from ..states import require
from ..protocol import FrameType
from .context import EngineContext
from .store import WorkspaceInfo


class Sessions:
    """``exec``, ``ping``, ``console``, ``console_send`` and ``logs``."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def running(self, name: str) -> WorkspaceInfo:
        info = self.ctx.store.status(name)
        require("exec", info.state.state, name, info.vm_alive)
        return info

    def connection(self, name: str) -> SupervisorConnection:
        return SupervisorConnection(self.running(name).dir.control_socket)

    def exec(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float | None = None, stdin: bytes | IO[bytes] | None = None,
             on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None,
             capture: bool = True, max_output: int = DEFAULT_MAX_OUTPUT) -> ExecResult:
        if not argv:
            raise InvalidArgument("exec needs a command: microagent exec NAME -- COMMAND [ARGS...]")
        if cwd is not None and not cwd.startswith("/"):
            raise InvalidArgument(f"--cwd must be an absolute guest path, got {cwd!r}")
        if timeout is not None and timeout <= 0:
            raise InvalidArgument(f"--timeout must be positive, got {timeout}")
        if max_output <= 0:
            raise InvalidArgument(f"--max-output must be a positive number of bytes, got {max_output}")
        info = self.running(name)
        with SupervisorConnection(info.dir.control_socket) as conn:
            return conn.exec(argv, env=env, cwd=cwd or info.config.workdir, timeout=timeout, stdin=stdin,
                             on_stdout=on_stdout, on_stderr=on_stderr, capture=capture, max_output=max_output)

    def ping(self, name: str) -> float:
        with self.connection(name) as conn:
            return conn.ping()

    def logs(self, name: str, *, follow: bool = False, poll: float = 0.1,
             stop: threading.Event | None = None) -> Iterator[bytes]:
        """The serial log; with ``follow``, new bytes while the workspace runs and ``stop`` is not set."""
        store = self.ctx.store
        ws = store.existing(name)

        def keep_going() -> bool:
            return follow and not (stop is not None and stop.is_set()) and \
                (ws.supervisor_alive() or store.info(ws).running)

        return logfiles.follow(ws.serial_log, keep_going, stop.wait if stop is not None else time.sleep, poll)

    def console(self, name: str) -> SupervisorConnection:
        conn = self.connection(name)
        reply = conn.control("console", reply_timeout=10)
        if not reply.get("ok"):
            conn.close()
            raise GuestError(reply.get("error", "console unavailable"))
        return conn

    def console_send(self, name: str, line: str, timeout: float = 30.0) -> str:
        info = self.running(name)
        if not info.state.readiness.get("shellReady", {}).get("ready"):
            raise InvalidState(f"workspace {name!r} has no console shell ({info.config.shell} missing in the guest)")
        tag = secrets.token_hex(4)
        begin, end = f"MA-BEGIN-{tag}", f"MA-END-{tag}"
        # the quotes split the markers so the echoed command line never matches them
        script = f"echo \"MA-BEGIN\"\"-{tag}\"; {line}; echo \"MA-END\"\"-{tag}\"\n"
        buf = b""
        with self.console(name) as conn:
            conn.send(FrameType.STDIN, 0, b"\n" + script.encode())
            deadline = time.monotonic() + timeout
            for frame in conn.frames(timeout):
                if frame.type == FrameType.STDOUT:
                    buf += frame.payload
                    text = buf.decode(errors="replace")
                    if end in text and begin in text:
                        body = text.split(begin, 1)[1].split(end, 1)[0]
                        return body.replace("\r\n", "\n").strip("\n")
                if time.monotonic() > deadline:
                    break
        raise GuestError(f"no answer from the console shell within {timeout:.0f} s")
