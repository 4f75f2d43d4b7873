"""Published ports: host TCP listeners whose connections the guest agent relays to ``127.0.0.1:<guest port>``
inside the guest, over the agent channel (so they work with ``--network isolated``).

Each accepted host connection becomes a port stream: POPEN (host -> agent, the guest port), then PDATA both
ways, PEOF for a half-close each way and PCLOSE when it is finished (see docs/protocol.md "Published ports").

Bounds. Every stream has a window of :data:`~microagent_engine.protocol.PUBLISH_WINDOW` bytes each way: a side
sends PDATA only while the other has not acknowledged (PACK) less than a window. The supervisor acknowledges
guest bytes only once the host client's socket took them, so a host client that does not read holds at most a
window (plus the socket's small write buffer) on the host and stalls only its own connection, never the agent
channel that every exec shares. Host -> guest bytes are read from the client only within the agent's window
and only while the agent channel's own write buffer is below its bound. At most :data:`MAX_CONNECTIONS`
connections are open per workspace; more are closed at once.

The agent is hostile: a port frame on a stream the supervisor did not open is dropped (counted like every
dropped frame); PDATA beyond the window, a PACK for more than was sent, or data after the guest's PEOF end that
connection (PCLOSE ``protocol: ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MicroagentError, PortUnavailable
from ..host_ports import port_error
from ..model import Publish
from ..protocol import PUBLISH_WINDOW, FrameType
from ..textsafe import safe_text

if TYPE_CHECKING:
    from .roles import AgentChannel

#: connections open at once through all of one workspace's published ports
MAX_CONNECTIONS = 256
#: host -> guest bytes read from a client per PDATA frame (at most)
READ_CHUNK = 65536
#: bytes the host client's socket may hold before the relay waits for it (and withholds the guest's credit)
HOST_WRITE_BUFFER = 65536
#: guest frame types this module takes (the agent sends these on port streams)
PORT_FRAME_TYPES = frozenset({FrameType.PDATA, FrameType.PACK, FrameType.PEOF, FrameType.PCLOSE})
_EOF, _CLOSE = object(), object()


@dataclass(eq=False)
class Listener:
    """One published host address."""

    item: Publish  # with the bound port (not 0); host_port 0 for a unix socket
    dynamic: bool  # published at run time (Engine.publish), not from the workspace's config
    server: asyncio.AbstractServer | None = None
    conns: set["PortConn"] = field(default_factory=set)
    path: str | None = None  # a unix socket (0600 in the workspace's 0700 run dir) instead of a TCP port

    def to_json(self) -> dict[str, Any]:
        where = {"hostPath": self.path, "guestPort": self.item.guest_port} if self.path else self.item.to_json()
        return {**where, "listening": self.server is not None, "error": None, "dynamic": self.dynamic}

    def __str__(self) -> str:
        return f"{self.path}->{self.item.guest_port}" if self.path else str(self.item)


class PortConn:
    """One host connection relayed to the guest on guest stream ``stream``."""

    def __init__(self, relay: "PortRelay", listener: Listener, stream: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.relay, self.listener, self.stream = relay, listener, stream
        self.reader, self.writer = reader, writer
        self.credit = PUBLISH_WINDOW  # bytes we may still send to the agent
        self.credit_changed = asyncio.Event()
        self.sent_unacked = 0  # host -> guest bytes the agent has not acknowledged
        self.received_unacked = 0  # guest -> host bytes received and not yet acknowledged
        self.inbox: deque[Any] = deque()  # guest bytes (or _EOF/_CLOSE) for the host client
        self.inbox_ready = asyncio.Event()
        self.guest_eof = False  # the agent sent PEOF
        self.aborted = False  # we sent PCLOSE: frames until the agent's PCLOSE are expected and ignored
        self.tasks: list[asyncio.Task[None]] = []
        self.reset_at_end = False  # the agent's PCLOSE said why: end the client's connection with a reset

    # ---- from the agent ------------------------------------------------------------------------
    def on_data(self, payload: bytes) -> None:
        if self.guest_eof:
            self.abort("protocol: PDATA after PEOF")
        elif self.received_unacked + len(payload) > PUBLISH_WINDOW:
            self.abort(f"protocol: PDATA beyond the window ({self.received_unacked + len(payload)} bytes "
                       f"unacknowledged > {PUBLISH_WINDOW})")
        elif payload:
            self.received_unacked += len(payload)
            self._put(payload)

    def on_ack(self, payload: bytes) -> None:
        text = payload.decode("ascii", "replace")
        count = int(text) if text.isdigit() and len(text) <= 10 else -1
        if not 0 < count <= self.sent_unacked:
            self.abort(f"protocol: PACK {safe_text(text, 20)!r} for {self.sent_unacked} unacknowledged bytes")
            return
        self.sent_unacked -= count
        self.credit += count
        self.credit_changed.set()

    def on_eof(self) -> None:
        if not self.guest_eof:
            self.guest_eof = True
            self._put(_EOF)

    def on_close(self, failed: bool) -> None:
        """The agent finished the stream: deliver what is queued to the client, then close it; ``failed`` (the
        PCLOSE had a reason: connect refused, reset, ...) resets the client's connection instead of a FIN, as a
        direct TCP connection would."""
        for task in self.tasks[:1]:  # the upstream reader: nothing more goes to the guest
            task.cancel()
        self.reset_at_end = failed
        self._put(_CLOSE)

    def _put(self, item: Any) -> None:
        self.inbox.append(item)
        self.inbox_ready.set()

    # ---- host side -----------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """End the connection from the host side: PCLOSE to the agent (its answering PCLOSE frees the stream),
        the client's socket reset."""
        if self.aborted:
            return
        self.aborted = True
        if reason.startswith("protocol:"):
            self.relay.sup.drop_frame(int(FrameType.PDATA), self.stream, reason)
        self.relay.sup.to_agent(FrameType.PCLOSE, self.stream, reason.encode()[:1000])
        for task in self.tasks:
            task.cancel()
        self.writer.transport.abort()
        self.relay.forget_socket(self)

    async def upstream(self) -> None:
        """Client -> guest, within the agent's window and the agent channel's buffer bound."""
        sup = self.relay.sup
        try:
            while True:
                while self.credit <= 0:
                    self.credit_changed.clear()
                    await self.credit_changed.wait()
                await sup.agent_drained()
                data = await self.reader.read(min(READ_CHUNK, self.credit))
                if self.aborted:
                    return
                if not data:
                    sup.to_agent(FrameType.PEOF, self.stream)
                    return
                self.credit -= len(data)
                self.sent_unacked += len(data)
                sup.to_agent(FrameType.PDATA, self.stream, data)
        except (ConnectionError, OSError) as exc:
            self.abort(f"host client: {exc.__class__.__name__}")

    async def downstream(self) -> None:
        """Guest -> client; credit goes back to the agent once the client's socket took the bytes."""
        sup = self.relay.sup
        try:
            while True:
                while not self.inbox:
                    self.inbox_ready.clear()
                    await self.inbox_ready.wait()
                item = self.inbox.popleft()
                if item is _CLOSE:
                    if self.reset_at_end:
                        await self.writer.drain()
                        self.writer.transport.abort()
                        self.relay.forget_socket(self)
                        return
                    break
                if item is _EOF:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    continue
                self.writer.write(item)
                await self.writer.drain()
                if not self.aborted and self.stream in self.relay.conns:
                    sup.to_agent(FrameType.PACK, self.stream, str(len(item)).encode())
                self.received_unacked -= len(item)
        except (ConnectionError, OSError) as exc:
            if not self.aborted and self.stream in self.relay.conns:
                self.abort(f"host client: {exc.__class__.__name__}")
            return
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        self.relay.forget_socket(self)


class PortRelay:
    """All published ports of one supervisor and the guest streams of their connections."""

    def __init__(self, sup: AgentChannel) -> None:
        self.sup = sup
        self.listeners: list[Listener] = []
        self.conns: dict[int, PortConn] = {}  # guest stream -> connection, until the agent's PCLOSE
        self.open_sockets = 0  # host connections not yet closed (bounded by MAX_CONNECTIONS)

    # ---- listeners -----------------------------------------------------------------------------
    async def bind(self, item: Publish, dynamic: bool) -> Listener:
        """Listen on ``item``'s host address; PortUnavailable (naming the port) if it cannot be bound."""
        if any(lst.item.host_ip == item.host_ip and lst.item.host_port == item.host_port and item.host_port
               for lst in self.listeners):
            raise PortUnavailable(f"host port {item.host_address} is already published by this workspace")
        listener = Listener(item, dynamic)
        try:
            server = await asyncio.start_server(lambda r, w: self.on_client(listener, r, w), host=item.host_ip,
                                                port=item.host_port, reuse_address=True, backlog=128)
        except OSError as exc:
            raise PortUnavailable(port_error(item, exc)) from None
        bound = server.sockets[0].getsockname()[1]
        listener.item = Publish(bound, item.guest_port, item.host_ip)
        listener.server = server
        self.listeners.append(listener)
        self.record()
        return listener

    async def bind_socket(self, guest_port: int) -> Listener:
        """Listen on a unix socket ``<run dir>/ports/p-GUEST_PORT`` (the directory 0700, the socket 0600): only
        this user reaches it, unlike a TCP port on 127.0.0.1, which every local user can connect to. ZMQ names it
        ``ipc://<run dir>/ports/p-GUEST_PORT``."""
        item = Publish(0, guest_port)
        ports = self.sup.ws.run_dir / "ports"
        ports.mkdir(mode=0o700, exist_ok=True)
        ports.chmod(0o700)
        path = str(ports / f"p-{item.guest_port}")
        if any(lst.path == path for lst in self.listeners):
            raise PortUnavailable(f"guest port {item.guest_port} is already published on {path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a supervisor that was killed
        listener = Listener(item, dynamic=True, path=path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(lambda r, w: self.on_client(listener, r, w), path=path,
                                                     backlog=128)
        except OSError as exc:
            raise PortUnavailable(f"cannot listen on {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        listener.server = server
        self.listeners.append(listener)
        self.record()
        return listener

    async def unbind(self, host_ip: str, host_port: int, path: str | None = None) -> bool:
        """Stop listening on ``host_ip:host_port`` (or the unix socket ``path``) and close its connections;
        False if nothing listens there."""
        for listener in self.listeners:
            if (listener.path == path) if path else (listener.path is None and listener.item.host_ip == host_ip
                                                       and listener.item.host_port == host_port):
                self.listeners.remove(listener)
                if listener.server is not None:
                    listener.server.close()
                for conn in list(listener.conns):
                    conn.abort("unpublished")
                if listener.path:
                    with contextlib.suppress(OSError):
                        os.unlink(listener.path)
                self.record()
                return True
        return False

    async def close(self) -> None:
        """The supervisor is ending: every listener and connection goes."""
        for listener in list(self.listeners):
            await self.unbind(listener.item.host_ip, listener.item.host_port, listener.path)

    async def control(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """The control ops ``publish`` ({hostIp, hostPort, guestPort} or {socket: true, guestPort}) and
        ``unpublish`` ({hostIp, hostPort} or {hostPath})."""
        try:
            if op == "publish" and request.get("socket") is True:
                listener = await self.bind_socket(request.get("guestPort"))  # type: ignore[arg-type]
                return {"ok": True, **listener.to_json()}
            if op == "unpublish" and isinstance(request.get("hostPath"), str):
                if await self.unbind("", 0, request["hostPath"]):
                    return {"ok": True}
                return {"ok": False, "error": f"nothing is published on {request['hostPath']}"}
            if op == "publish":
                item = Publish.from_json({k: request.get(k) for k in ("hostIp", "hostPort", "guestPort")})
                listener = await self.bind(item, dynamic=True)
                return {"ok": True, **listener.to_json()}
            item = Publish.from_json({"hostIp": request.get("hostIp"), "hostPort": request.get("hostPort"),
                                      "guestPort": 1})
        except PortUnavailable as exc:
            return {"ok": False, "error": str(exc), "portTaken": True}
        except MicroagentError as exc:
            return {"ok": False, "error": str(exc)}
        if not await self.unbind(item.host_ip, item.host_port):
            return {"ok": False, "error": f"nothing is published on {item.host_address}; see the workspace's "
                                          f"status for its published ports"}
        return {"ok": True}

    def snapshot(self) -> list[dict[str, Any]]:
        return [listener.to_json() for listener in self.listeners]

    def record(self) -> None:
        self.sup.state.publish = self.snapshot()
        self.sup.save()

    # ---- host connections ----------------------------------------------------------------------
    async def on_client(self, listener: Listener, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        sup = self.sup
        # streams the agent has not answered yet count too: an agent that never answers PCLOSE cannot grow them
        full = self.open_sockets >= MAX_CONNECTIONS or len(self.conns) >= 2 * MAX_CONNECTIONS
        if full or not sup.exec_allowed() or (sup.state.state != "running" and not sup.asleep):
            why = "too many connections" if full else f"workspace {sup.state.state}"
            print(f"supervisor: refused a connection to {listener}: {why}", file=sys.stderr)
            writer.transport.abort()
            return
        writer.transport.set_write_buffer_limits(high=HOST_WRITE_BUFFER)
        stream = sup.new_stream()
        conn = PortConn(self, listener, stream, reader, writer)
        self.conns[stream] = conn
        listener.conns.add(conn)
        self.open_sockets += 1
        sup.to_agent(FrameType.POPEN, stream, str(listener.item.guest_port).encode())
        conn.tasks = [asyncio.ensure_future(conn.upstream()), asyncio.ensure_future(conn.downstream())]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        self.forget_socket(conn)

    def forget_socket(self, conn: PortConn) -> None:
        if conn in conn.listener.conns:
            conn.listener.conns.discard(conn)
            self.open_sockets -= 1
            if not conn.writer.is_closing():
                conn.writer.close()

    # ---- from the agent ------------------------------------------------------------------------
    def owns(self, stream: int) -> bool:
        return stream in self.conns

    def deliver(self, ftype: int, stream: int, payload: bytes) -> None:
        """A guest port frame (hostile input): to its connection, or dropped and counted."""
        conn = self.conns.get(stream)
        if conn is None:
            self.sup.drop_frame(ftype, stream, "no published-port connection on that stream")
            return
        if ftype == FrameType.PCLOSE:
            del self.conns[stream]
            if not conn.aborted:
                conn.on_close(bool(payload))
            return
        if conn.aborted:
            return  # crossing our PCLOSE: expected
        if ftype == FrameType.PDATA:
            conn.on_data(payload)
        elif ftype == FrameType.PACK:
            conn.on_ack(payload)
        elif ftype == FrameType.PEOF:
            conn.on_eof()

    def channel_lost(self) -> None:
        """The agent channel is gone (VM exit, channel failure): every connection is closed, no frames."""
        conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            conn.aborted = True
            for task in conn.tasks:
                task.cancel()
            conn.writer.transport.abort()
            self.forget_socket(conn)

    def sever(self) -> None:
        """Quarantine: close every connection (listeners stay, refusing connections while not running)."""
        for conn in list(self.conns.values()):
            conn.abort("workspace quarantined")
