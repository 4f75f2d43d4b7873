"""Host side of the mediation channel: guest connections bridged to one host TCP target.

In the guest a program connects to ``127.0.0.1:<port>`` (the spec's ``mediation.port``); the agent carries each
connection over the dedicated virtio-serial port ``org.microagent.mediation`` as MOPEN/MDATA/MCLOSE frames, and
this bridge opens one TCP connection to ``target`` per guest connection and copies bytes both ways.

Health: the target is probed (TCP connect, then close) every few seconds. With ``failClosed`` a failed probe or a
refused connection cuts the channel (MCUT: all connections closed, new ones refused) until the VM restarts;
without it the channel stays open and ``mediationReady`` says the target is down until it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from ..model import Mediation
from ..protocol import FrameDecoder, FrameType, encode_frame

PROBE_INTERVAL = 2.0
CONNECT_TIMEOUT = 3.0
#: guest bytes queued for one slow target connection before that connection is closed (the port is never stalled)
CONN_BUFFER = 1 << 20
#: bridged connections at once; further MOPENs are refused
MAX_CONNECTIONS = 64


async def probe(cfg: Mediation) -> str:
    """'' if the target accepts a TCP connection, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(cfg.host, cfg.target_port),
                                           CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"target {cfg.target} unreachable: {getattr(exc, 'strerror', None) or exc.__class__.__name__}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


class MediationBridge:
    """One per supervisor; serves whatever mediation port connection the current VM makes."""

    def __init__(self, cfg: Mediation, report: Callable[[bool, str, str], None]) -> None:
        self.cfg = cfg
        self.report = report  # (ready, detail, error) -> records mediationReady
        self.writer: asyncio.StreamWriter | None = None
        self.conns: dict[int, asyncio.Queue[bytes | None]] = {}  # guest stream -> bytes for the target
        self.queued: dict[int, int] = {}  # guest stream -> bytes in its queue (bounded by CONN_BUFFER)
        self.cut_reason = ""
        self.guest_ok = False
        self.target_error = ""

    @property
    def cut(self) -> bool:
        return bool(self.cut_reason)

    def _send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode_frame(ftype, stream, payload))

    def _publish(self) -> None:
        detail = f"guest 127.0.0.1:{self.cfg.port} -> host {self.cfg.target}"
        if self.cut:
            self.report(False, detail, f"channel cut: {self.cut_reason}")
        elif not self.guest_ok:
            self.report(False, detail, "guest side not connected")
        else:
            self.report(not self.target_error, detail, self.target_error)

    def guest_ready(self, ok: bool, error: str = "") -> None:
        self.guest_ok = ok
        if error:
            self.report(False, "", error)
        else:
            self._publish()

    def sever(self, reason: str) -> None:
        """Cut the channel: close every bridged connection and refuse new ones (until the VM restarts)."""
        if self.cut:
            return
        self.cut_reason = reason
        self._send(FrameType.MCUT, 0)
        for queue in self.conns.values():
            queue.put_nowait(None)
        self.conns.clear()
        self._publish()

    def reset(self) -> None:
        """A new boot: the cut (if any) ends with the VM that had it."""
        self.cut_reason = ""
        self.guest_ok = False
        self.conns.clear()

    def _target_failed(self, error: str) -> None:
        self.target_error = error
        if self.cfg.fail_closed:
            self.sever(error)
        else:
            self._publish()

    async def probe_loop(self) -> None:
        while True:
            error = await probe(self.cfg)
            if error:
                self._target_failed(error)
            elif self.target_error:
                self.target_error = ""
                self._publish()
            elif self.guest_ok:
                self._publish()
            await asyncio.sleep(PROBE_INTERVAL)

    async def on_port(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        decoder = FrameDecoder()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(262144):
                for frame in decoder.feed(data):
                    await self._on_frame(frame.type, frame.stream, frame.payload)
        for queue in self.conns.values():
            queue.put_nowait(None)
        self.conns.clear()
        self.writer = None

    async def _on_frame(self, ftype: int, stream: int, payload: bytes) -> None:
        # never await a target here: the agent's writes to us block, so a slow target must not stall the port
        if ftype == FrameType.MOPEN:
            if self.cut:
                self._send(FrameType.MCLOSE, stream, f"mediation channel cut: {self.cut_reason}".encode())
                return
            if stream in self.conns or len(self.conns) >= MAX_CONNECTIONS:
                self._send(FrameType.MCLOSE, stream, b"too many mediation connections")
                return
            queue: asyncio.Queue[bytes | None] = asyncio.Queue()
            self.conns[stream] = queue
            self.queued[stream] = 0
            asyncio.ensure_future(self._bridge(stream, queue))
        elif ftype == FrameType.MDATA and stream in self.conns:
            self.queued[stream] = self.queued.get(stream, 0) + len(payload)
            if self.queued[stream] > CONN_BUFFER:  # the target does not keep up: end this connection only
                self.conns.pop(stream).put_nowait(None)
                self.queued.pop(stream, None)
                self._send(FrameType.MCLOSE, stream, b"the host target is not reading; connection closed")
                return
            self.conns[stream].put_nowait(payload)
        elif ftype == FrameType.MCLOSE and stream in self.conns:
            self.conns.pop(stream).put_nowait(None)
        elif ftype == FrameType.MEOF and stream in self.conns:
            self.conns[stream].put_nowait(b"")  # half-close towards the target; its answer still flows back

    async def _bridge(self, stream: int, queue: "asyncio.Queue[bytes | None]") -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.cfg.host, self.cfg.target_port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            error = f"target {self.cfg.target} unreachable: {getattr(exc, 'strerror', None) or exc}"
            if self.conns.pop(stream, None) is not None:
                self._send(FrameType.MCLOSE, stream, error.encode())
            self._target_failed(error)
            return
        pump = asyncio.ensure_future(self._pump(stream, reader))
        with contextlib.suppress(ConnectionError, OSError):
            while (data := await queue.get()) is not None:
                if data:
                    if stream in self.queued:
                        self.queued[stream] -= len(data)
                    writer.write(data)
                    await writer.drain()
                elif writer.can_write_eof():
                    writer.write_eof()
        pump.cancel()
        writer.close()

    async def _pump(self, stream: int, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self._send(FrameType.MDATA, stream, data)
                if self.writer is not None:  # backpressure: a guest that does not read slows the target
                    await self.writer.drain()
        queue = self.conns.pop(stream, None)
        self.queued.pop(stream, None)
        if queue is not None:
            self._send(FrameType.MCLOSE, stream)
            queue.put_nowait(None)
