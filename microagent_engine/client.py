"""Blocking client of a workspace supervisor's control socket: exec streams, control requests, console."""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import ExecTimeout, GuestError, InvalidArgument
from .protocol import ExitKind, ExitStatus, Frame, FrameDecoder, FrameType, encode_exec, encode_frame

OutputCallback = Callable[[bytes], None]

#: default cap on each of stdout and stderr kept by a capturing exec (callbacks still see every byte)
DEFAULT_MAX_OUTPUT = 16 << 20
#: how long after its own timeout a command may go without an exit status before the host gives up on it
#: (the agent enforces the timeout; this only bounds the wait when the agent cannot, e.g. under a fork bomb)
HOST_TIMEOUT_MARGIN = 30.0


def truncation_marker(limit: int) -> bytes:
    """What ends a captured stream that was cut at ``limit`` bytes."""
    return (f"\n[microagent: output truncated after {limit} bytes; raise the limit with --max-output BYTES, "
            f"max_output= or maxOutput]\n").encode()


class Capture:
    """Collects one output stream up to ``limit`` bytes; past that, counts and marks the cut."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.limit - len(self.buf)
        if len(data) > room:
            self.truncated = True
            data = data[:max(0, room)]
        self.buf += data

    def value(self) -> bytes:
        return bytes(self.buf) + (truncation_marker(self.limit) if self.truncated else b"")


@dataclass
class ExecResult:
    """How a command ended, with its captured output (when capture was on)."""

    status: str
    exit_code: int
    code: int
    stdout: bytes = b""
    stderr: bytes = b""
    message: str = ""
    duration: float = 0.0
    truncated: bool = False  # stdout or stderr was cut at the capture limit (the marker ends it)

    @property
    def ok(self) -> bool:
        return self.status == ExitKind.EXITED and self.code == 0

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "exitCode": self.exit_code, "code": self.code,
                "stdout": self.stdout.decode(errors="replace"), "stderr": self.stderr.decode(errors="replace"),
                "message": self.message, "durationSeconds": round(self.duration, 6), "truncated": self.truncated}


@dataclass
class SupervisorConnection:
    """One connection to ``control.sock``. Not thread-safe: use one per thread (they are cheap)."""

    path: Path
    sock: socket.socket = field(init=False)
    _decoder: FrameDecoder = field(default_factory=FrameDecoder)
    _pending: list[Frame] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise GuestError(f"cannot reach the workspace supervisor at {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "SupervisorConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(ftype, stream, payload))

    def frames(self, timeout: float | None = None, *, deadline: float | None = None) -> Iterator[Frame]:
        """Yield frames as they arrive; raises ExecTimeout if none arrives within ``timeout`` or once the
        ``time.monotonic()`` ``deadline`` has passed."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            wait = timeout
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                raise ExecTimeout("no answer from the workspace supervisor in time")
            data = self.sock.recv(262144)
            if not data:
                raise GuestError("the workspace supervisor closed the connection (the VM may have exited)")
            self._pending.extend(self._decoder.feed(data))

    def control(self, op: str, params: dict[str, Any] | None = None, *,
                reply_timeout: float | None = None) -> dict[str, Any]:
        """Send a control request (``op`` with ``params``) and return the supervisor's JSON reply."""
        self.send(FrameType.CONTROL, 0, json.dumps({**(params or {}), "op": op}).encode())
        for frame in self.frames(reply_timeout):
            if frame.type == FrameType.REPLY:
                return json.loads(frame.payload)
            if frame.type == FrameType.ERROR:
                raise GuestError(frame.payload.decode(errors="replace"))
        raise GuestError("no reply")  # pragma: no cover - frames() never ends normally

    def ping(self, payload: bytes = b"p") -> float:
        """Round trip to the guest agent in seconds."""
        t0 = time.perf_counter()
        self.send(FrameType.PING, 1, payload)
        for frame in self.frames(10):
            if frame.type == FrameType.PONG:
                return time.perf_counter() - t0
            if frame.type == FrameType.ERROR:
                raise GuestError(frame.payload.decode(errors="replace"))
        raise GuestError("no pong")  # pragma: no cover

    def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | IO[bytes] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture: bool = True,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` in the guest, streaming output to the callbacks as it comes.

        Captured stdout and stderr keep at most ``max_output`` bytes each; past that the result is marked
        ``truncated`` and each cut stream ends with a marker (the callbacks still get every byte). With a
        ``timeout``, the host waits at most HOST_TIMEOUT_MARGIN seconds beyond it for the guest to report the
        end, then sends SIGKILL and raises ExecTimeout (the agent may be starved, e.g. by a fork bomb).

        On KeyboardInterrupt the command's process group gets SIGINT, then SIGTERM, then SIGKILL (see
        ``_interrupt``) before the interrupt propagates.
        """
        if max_output <= 0:
            raise InvalidArgument(f"max_output must be a positive number of bytes, got {max_output}")
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout + HOST_TIMEOUT_MARGIN if timeout else None
        stream = 1
        self.send(FrameType.EXEC, stream, encode_exec(argv, env, cwd, timeout, stdin=stdin is not None))
        feeder: threading.Thread | None = None
        if isinstance(stdin, (bytes, bytearray)):
            for i in range(0, len(stdin), 65536):
                self.send(FrameType.STDIN, stream, bytes(stdin[i:i + 65536]))
            self.send(FrameType.STDIN, stream, b"")
        elif stdin is not None:
            feeder = threading.Thread(target=self._feed, args=(stream, stdin), daemon=True)
            feeder.start()
        out, err = Capture(max_output), Capture(max_output)
        try:
            for frame in self.frames(deadline=deadline):
                if frame.type == FrameType.STDOUT:
                    if capture:
                        out.add(frame.payload)
                    if on_stdout:
                        on_stdout(frame.payload)
                elif frame.type == FrameType.STDERR:
                    if capture:
                        err.add(frame.payload)
                    if on_stderr:
                        on_stderr(frame.payload)
                elif frame.type == FrameType.EXIT:
                    st = ExitStatus.parse(frame.payload)
                    return ExecResult(st.status, st.exit_code, st.code, out.value(), err.value(), st.message,
                                      time.perf_counter() - t0, out.truncated or err.truncated)
                elif frame.type == FrameType.ERROR:
                    raise GuestError(frame.payload.decode(errors="replace"))
        except ExecTimeout:
            try:
                self.send(FrameType.SIGNAL, stream, str(int(signal.SIGKILL)).encode())
            except OSError:
                pass
            raise ExecTimeout(f"the command did not end within {HOST_TIMEOUT_MARGIN:.0f} s after its {timeout} s "
                              f"timeout: the guest agent is not answering (see execReady in status); the command "
                              f"was sent SIGKILL") from None
        except KeyboardInterrupt:
            self._interrupt(stream)
            raise
        except (GuestError, OSError):
            raise
        except Exception:  # a callback gave up (e.g. a size cap): the command must not run on
            try:
                self.send(FrameType.SIGNAL, stream, str(int(signal.SIGKILL)).encode())
            except OSError:
                pass
            raise
        raise GuestError("exec ended without an exit status")  # pragma: no cover

    INTERRUPT_GRACE = 2.0  # seconds each of SIGINT and SIGTERM get before the next, stronger signal

    def _interrupt(self, stream: int) -> None:
        """Stop the command after a KeyboardInterrupt: SIGINT to its process group, then SIGTERM, then SIGKILL,
        each after ``INTERRUPT_GRACE`` seconds without an exit status. The deadline is checked after every
        frame, so a command that ignores INT and TERM and keeps printing still ends; output arriving meanwhile
        is dropped. A second Ctrl-C goes straight to SIGKILL."""
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                self.send(FrameType.SIGNAL, stream, str(int(sig)).encode())
                if self._wait_exit(self.INTERRUPT_GRACE):
                    return
        except (OSError, GuestError, KeyboardInterrupt):
            try:
                self.send(FrameType.SIGNAL, stream, str(int(signal.SIGKILL)).encode())
            except OSError:
                pass

    def _wait_exit(self, grace: float) -> bool:
        """True once the exec's EXIT (or ERROR) frame arrives, or the connection ends; False after ``grace``."""
        deadline = time.monotonic() + grace
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = next(self.frames(left))
            except ExecTimeout:
                return False
            except GuestError:  # the supervisor closed the connection: nothing is left to stop
                return True
            if frame.type in (FrameType.EXIT, FrameType.ERROR):
                return True
        return False

    def _feed(self, stream: int, fh: IO[bytes]) -> None:
        try:
            reader = getattr(fh, "read1", fh.read)
            while chunk := reader(65536):
                self.send(FrameType.STDIN, stream, chunk)
            self.send(FrameType.STDIN, stream, b"")
        except OSError:
            pass
