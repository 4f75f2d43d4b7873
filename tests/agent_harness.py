"""The guest agent on the host, in test mode, for tests that speak its protocol: compiled once per module from its
build's files (agent.c and the generated protocol.h), started as ``agent --connect PATH`` on a unix socket the test
serves, and driven frame by frame (:class:`Agent`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from microagent_engine.guest.initramfs import AGENT_SOURCE, agent_source, protocol_headers
from microagent_engine.protocol import (
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    decode_kv,
    encode_entries,
    encode_exec,
    encode_frame,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = [("e", "FOO=bar"), ("e", "BAR=from-config"), ("n", "none")]


# ---- building ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_build(tmp_path_factory):
    """The agent compiled from its build's files (agent.c and the generated protocol.h), with -Wextra as well."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("install gcc: apt-get install -y gcc libc6-dev")
    src_dir = tmp_path_factory.mktemp("agent")
    for name, body in {AGENT_SOURCE: agent_source(), **protocol_headers()}.items():
        (src_dir / name).write_bytes(body)
    out = src_dir / "agent"
    proc = subprocess.run(
        [gcc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src_dir / AGENT_SOURCE)],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"compiling the agent failed:\n{proc.stderr}")
    return out, proc.stderr


@pytest.fixture(scope="module")
def agent_bin(agent_build):
    return agent_build[0]


# ---- talking to the agent ---------------------------------------------------------------------------


@dataclass
class Result:
    stdout: bytes = b""
    stderr: bytes = b""
    exit: ExitStatus | None = None
    frames: list[Frame] = field(default_factory=list)


class FrameChannel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(ftype, stream, payload))

    def recv(self, timeout: float = 10.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the agent")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("agent closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)


class Agent(FrameChannel):
    def __init__(self, sock: socket.socket, proc: subprocess.Popen):
        super().__init__(sock)
        self.proc = proc
        self.med: FrameChannel | None = None  # the mediation channel (start_agent(..., mediation=True))

    def exec(self, stream: int, argv: list[str], **kw) -> None:
        self.send(FrameType.EXEC, stream, encode_exec(argv, **kw))

    def collect(self, streams: list[int], timeout: float = 10.0) -> dict[int, Result]:
        """Read frames until every stream in ``streams`` got its EXIT."""
        results = {s: Result() for s in streams}
        deadline = time.monotonic() + timeout
        while any(r.exit is None for r in results.values()):
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            res = results.get(frame.stream)
            assert res is not None, f"unexpected frame {frame}"
            assert res.exit is None, f"frame after EXIT: {frame}"
            res.frames.append(frame)
            if frame.type == FrameType.STDOUT:
                res.stdout += frame.payload
            elif frame.type == FrameType.STDERR:
                res.stderr += frame.payload
            elif frame.type == FrameType.EXIT:
                res.exit = ExitStatus.parse(frame.payload)
            elif frame.type == FrameType.ERROR:
                pass
            else:
                raise AssertionError(f"unexpected frame {frame}")
        return results

    def run(self, argv: list[str], stream: int = 1, wait: float = 10.0, **kw) -> Result:
        """EXEC ``argv`` on ``stream`` (``kw`` go to encode_exec) and collect its output and EXIT."""
        self.exec(stream, argv, **kw)
        return self.collect([stream], wait)[stream]


@pytest.fixture
def start_agent(agent_bin):
    started: list[tuple[Agent, str]] = []

    def start(
        config: list[tuple[str, str]] | None = None, mediation: bool = False
    ) -> tuple[Agent, dict[str, str], dict[str, str]]:
        """``mediation``: also pass ``--mediation-connect`` (the channel is ``agent.med`` if the agent connects)."""
        tmpdir = tempfile.mkdtemp(prefix="ma", dir="/tmp")
        path = os.path.join(tmpdir, "agent.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)
        args = [str(agent_bin), "--connect", path]
        med_listener = None
        if mediation:
            med_path = os.path.join(tmpdir, "mediation.sock")
            med_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            med_listener.bind(med_path)
            med_listener.listen(1)
            args += ["--mediation-connect", med_path]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        try:
            conn, _ = listener.accept()
        finally:
            listener.close()
        agent = Agent(conn, proc)
        started.append((agent, tmpdir))
        try:
            hello = agent.recv()
            assert hello.type == FrameType.HELLO and hello.stream == 0
            hello_kv = decode_kv(hello.payload)
            agent.send(FrameType.CONFIG, 0, encode_entries(DEFAULT_CONFIG if config is None else config))
            ready = agent.recv()
            assert ready.type == FrameType.READY and ready.stream == 0
            if med_listener is not None:
                # the agent connects while handling CONFIG (before READY), if it has a p entry
                med_listener.setblocking(False)
                try:
                    agent.med = FrameChannel(med_listener.accept()[0])
                    agent.med.sock.setblocking(True)
                except BlockingIOError:
                    pass
        finally:
            if med_listener is not None:
                med_listener.close()
        return agent, hello_kv, decode_kv(ready.payload)

    yield start

    for agent, tmpdir in started:
        for sock in (agent.sock, agent.med.sock if agent.med else None):
            try:
                if sock is not None:
                    sock.close()
            except OSError:
                pass
        try:
            agent.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def agent(start_agent) -> Agent:
    return start_agent()[0]
