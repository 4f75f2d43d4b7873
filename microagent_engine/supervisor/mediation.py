"""Host side of the mediation channel: guest connections bridged to one host TCP target.

In the guest a program connects to ``127.0.0.1:<port>`` (the spec's ``mediation.port``); the agent carries each
connection over the dedicated virtio-serial port ``org.microagent.mediation`` as MOPEN/MDATA/MCLOSE frames, and
this bridge opens one TCP connection to ``target`` per guest connection and copies bytes both ways.

Health: the target is probed (TCP connect, then close) every few seconds. With ``failClosed`` a failed probe or a
refused connection cuts the channel (MCUT: all connections closed, new ones refused) until the VM restarts;
without it the channel stays open and ``mediationReady`` says the target is down until it comes back.

The guest is hostile, and the port fails closed like the agent channel: a frame that cannot be decoded, of a type
the agent never sends here, or that breaks the stream rules (stream 0, a payload on MOPEN, an MOPEN of an open
stream) closes the port for the rest of this boot. Every bridged connection is closed (so are the guest's: the
agent sees the port hang up), new port connections are refused, ``mediationReady`` is saved false with the
reason, and one bounded line goes to the serial log. Each stream's bookkeeping lives in one :class:`_Stream`,
released whichever side closes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ProtocolError
from ..model import Mediation
from ..protocol import FrameDecoder, FrameType, encode_frame
from ..textsafe import safe_text

PROBE_INTERVAL = 2.0
CONNECT_TIMEOUT = 3.0
#: guest bytes queued for one slow target connection before that connection is closed (the port is never stalled)
CONN_BUFFER = 1 << 20
#: bridged connections at once; further MOPENs are refused
MAX_CONNECTIONS = 64
#: frame types the agent sends on the mediation port; anything else is a protocol violation (the port fails closed)
GUEST_MEDIATION_TYPES = frozenset({FrameType.MOPEN, FrameType.MDATA, FrameType.MCLOSE, FrameType.MEOF,
                                   FrameType.PONG, FrameType.ERROR})
#: the per-connection types, which never use stream 0
_STREAM_TYPES = frozenset({FrameType.MOPEN, FrameType.MDATA, FrameType.MCLOSE, FrameType.MEOF})


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


@dataclass
class _Stream:
    """One guest connection: bytes for the target (None ends it) and how many of them wait in the queue."""

    queue: "asyncio.Queue[bytes | None]" = field(default_factory=asyncio.Queue)
    queued: int = 0

    def end(self) -> None:
        self.queue.put_nowait(None)


class MediationBridge:
    """One per supervisor; serves whatever mediation port connection the current VM makes."""

    def __init__(self, cfg: Mediation, report: Callable[[bool, str, str], None],
                 note: Callable[[str], None] = lambda _text: None) -> None:
        self.cfg = cfg
        self.report = report  # (ready, detail, error) -> records mediationReady
        self.note = note  # one line for the serial log
        self.writer: asyncio.StreamWriter | None = None
        self.streams: dict[int, _Stream] = {}  # guest stream -> its bookkeeping (the only per-stream record)
        self.tasks: set[asyncio.Task[None]] = set()  # one bridge per open stream, until its target is closed
        self.cut_reason = ""
        self.failed_reason = ""  # the guest broke the protocol on the port: closed until the VM restarts
        self.guest_ok = False
        self.target_error = ""

    @property
    def cut(self) -> bool:
        return bool(self.cut_reason or self.failed_reason)

    def open_streams(self) -> int:
        """Streams with any host-side bookkeeping left (records or bridge tasks); 0 when every one is released."""
        return max(len(self.streams), len(self.tasks))

    def _send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode_frame(ftype, stream, payload))

    def _publish(self) -> None:
        detail = f"guest 127.0.0.1:{self.cfg.port} -> host {self.cfg.target}"
        if self.failed_reason:
            self.report(False, "mediation channel closed",
                        f"protocol violation: {self.failed_reason}; the mediation channel is closed until the VM "
                        f"restarts. Treat the guest as compromised")
        elif self.cut_reason:
            self.report(False, detail, f"channel cut: {self.cut_reason}")
        elif not self.guest_ok:
            self.report(False, detail, "guest side not connected")
        else:
            self.report(not self.target_error, detail, self.target_error)

    def guest_ready(self, ok: bool, error: str = "") -> None:
        self.guest_ok = ok
        if error and not self.failed_reason:
            self.report(False, "", error)
        else:
            self._publish()

    def _end_all(self) -> None:
        for st in self.streams.values():
            st.end()
        self.streams.clear()

    def sever(self, reason: str) -> None:
        """Cut the channel: close every bridged connection and refuse new ones (until the VM restarts)."""
        if self.cut:
            return
        self.cut_reason = reason
        self._send(FrameType.MCUT, 0)
        self._end_all()
        self._publish()

    def fail(self, reason: str) -> None:
        """The guest broke the protocol on the port: close it and every connection, refuse new ones, say why."""
        if self.failed_reason:
            return
        self.failed_reason = safe_text(reason, 300)
        print(f"supervisor: mediation channel failed: {self.failed_reason}", file=sys.stderr)
        self.note(f"mediation channel failed: {self.failed_reason}; closed until the VM restarts")
        self._end_all()
        if self.writer is not None:
            self.writer.close()
        self._publish()

    def reset(self) -> None:
        """A new boot: the cut or failure (if any) ends with the VM that had it."""
        self.cut_reason = ""
        self.failed_reason = ""
        self.guest_ok = False
        self._end_all()

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
        if self.failed_reason:
            writer.close()  # a failed port stays closed for this boot
            return
        self.writer = writer
        decoder = FrameDecoder()
        try:
            while not self.failed_reason and (data := await reader.read(262144)):
                for frame in decoder.feed(data):
                    self._on_frame(frame.type, frame.stream, frame.payload)
                    if self.failed_reason:
                        break
        except ProtocolError as exc:
            self.fail(str(exc))
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # a frame the bridge could not handle: fail closed, never half-open
            traceback.print_exc()
            self.fail(f"a mediation frame could not be handled ({type(exc).__name__})")
        if self.writer is writer:  # (a previous boot's port may end after the next boot's began)
            self._end_all()
            self.writer = None
        writer.close()

    def _on_frame(self, ftype: int, stream: int, payload: bytes) -> None:
        """One guest frame (raises ProtocolError for a frame that must close the port). Never awaits a target:
        the agent's writes to us block, so a slow target must not stall the port."""
        if ftype not in GUEST_MEDIATION_TYPES:
            raise ProtocolError(f"frame type 0x{ftype:02x} on stream {stream}, which the agent never sends on the "
                                f"mediation channel")
        if ftype in _STREAM_TYPES and stream == 0:
            raise ProtocolError(f"{FrameType(ftype).name} on stream 0")
        if ftype == FrameType.MOPEN:
            if payload:
                raise ProtocolError(f"MOPEN with a {len(payload)}-byte payload on stream {stream}")
            if stream in self.streams:
                raise ProtocolError(f"MOPEN of stream {stream}, which is open")
            self._open(stream)
        elif ftype == FrameType.MDATA and payload and (st := self.streams.get(stream)) is not None:
            st.queued += len(payload)
            if st.queued > CONN_BUFFER:  # the target does not keep up: end this connection only
                self._drop(stream)
                self._send(FrameType.MCLOSE, stream, b"the host target is not reading; connection closed")
                return
            st.queue.put_nowait(payload)
        elif ftype == FrameType.MCLOSE:
            self._drop(stream)
        elif ftype == FrameType.MEOF and (st := self.streams.get(stream)) is not None:
            st.queue.put_nowait(b"")  # half-close towards the target; its answer still flows back
        # an empty MDATA (b"" in the queue would half-close the target), frames for a stream that is not open
        # (crossing our MCLOSE), PONG and ERROR: nothing to do

    def _open(self, stream: int) -> None:
        if self.cut:
            self._send(FrameType.MCLOSE, stream, f"mediation channel cut: {self.cut_reason}".encode())
            return
        if len(self.streams) >= MAX_CONNECTIONS:
            self._send(FrameType.MCLOSE, stream, b"too many mediation connections")
            return
        st = self.streams[stream] = _Stream()
        task = asyncio.ensure_future(self._bridge(stream, st))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _drop(self, stream: int) -> _Stream | None:
        """Release ``stream``'s record (its bridge then closes the target connection and ends)."""
        st = self.streams.pop(stream, None)
        if st is not None:
            st.end()
        return st

    async def _bridge(self, stream: int, st: _Stream) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.cfg.host, self.cfg.target_port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            error = f"target {self.cfg.target} unreachable: {getattr(exc, 'strerror', None) or exc}"
            if self.streams.get(stream) is st:
                self._drop(stream)
                self._send(FrameType.MCLOSE, stream, error.encode())
            self._target_failed(error)
            return
        pump = asyncio.ensure_future(self._pump(stream, st, reader))
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while (data := await st.queue.get()) is not None:
                    if data:
                        st.queued -= len(data)
                        writer.write(data)
                        await writer.drain()
                    elif writer.can_write_eof():
                        writer.write_eof()
        finally:
            pump.cancel()
            writer.close()
            if self.streams.get(stream) is st:  # the target side failed first
                self._drop(stream)
                self._send(FrameType.MCLOSE, stream)

    async def _pump(self, stream: int, st: _Stream, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                self._send(FrameType.MDATA, stream, data)
                if self.writer is not None:  # backpressure: a guest that does not read slows the target
                    await self.writer.drain()
        if self.streams.get(stream) is st:  # the target finished: the stream ends both ways
            self._drop(stream)
            self._send(FrameType.MCLOSE, stream)
