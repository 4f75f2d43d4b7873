"""Clients of the control socket: their connections, the routing of their execs onto guest streams, and
their control requests (halt, stop, kill, quarantine, console, state).

Output to clients is bounded. Each client may have at most :data:`CLIENT_BUFFER_LIMIT` bytes queued on the
host; what happens past that depends on what the bytes are:

- **Exec output** (a client's own commands) is never dropped: an exact copy is what exec promises. Instead the
  supervisor stops reading the agent channel while a client that owns streams is over its bound (see
  ``Supervisor.hold_for_clients``). The channel's socket buffers then fill, QEMU stops taking data from the
  virtio-serial port and the guest blocks in its write: a slow reader slows the guest, it never grows the host.
  That also pauses every other exec in this workspace (one channel carries them all), so a client that stays
  over its bound for :data:`CLIENT_STALL_LIMIT` seconds is disconnected; its commands get SIGHUP, as when a
  client goes away, and the others continue. The limit is long enough that a reader that is merely slow (a
  pager, a busy notebook) keeps its command.
- **Console output** is a live view of a serial line whose full record is ``serial.log``: a console client over
  its bound loses console bytes (a marker says how many) rather than holding the guest back, and is also
  disconnected once stalled for :data:`CLIENT_STALL_LIMIT`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..protocol import FrameDecoder, FrameType, encode_frame

if TYPE_CHECKING:
    from .roles import ClientHost

#: bytes that may wait on the host for one client before it counts as congested
CLIENT_BUFFER_LIMIT = 4 << 20
#: seconds a congested client may go without draining below its bound before it is disconnected
CLIENT_STALL_LIMIT = 60.0
#: control requests one client may have in flight (each reply is queued for it)
MAX_CONTROL_PER_CLIENT = 16
#: which guest frame types each kind of client request may receive on its stream, and which one ends it
ROUTE_TYPES = {
    FrameType.EXEC: ({FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT, FrameType.ERROR}, FrameType.EXIT),
    FrameType.PING: ({FrameType.PONG, FrameType.ERROR}, FrameType.PONG),
}


class Client:
    """One connection to the control socket, with a bounded output queue."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.streams: dict[int, int] = {}  # client stream id -> guest stream id
        self.console = False
        self.stalled_since: float | None = None  # when it last went over its bound
        self.console_dropped = 0  # console bytes not sent because the client was over its bound
        self.control_tasks: set[asyncio.Future[None]] = set()
        # drain() waits while more than the limit is queued and wakes once a quarter of it is left
        writer.transport.set_write_buffer_limits(high=CLIENT_BUFFER_LIMIT)

    @property
    def queued(self) -> int:
        """Bytes written for this client that it has not taken yet (host side only)."""
        return self.writer.transport.get_write_buffer_size()

    @property
    def congested(self) -> bool:
        congested = not self.writer.is_closing() and self.queued > CLIENT_BUFFER_LIMIT
        if not congested:
            self.stalled_since = None
        elif self.stalled_since is None:
            self.stalled_since = time.monotonic()
        return congested

    def send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(ftype, stream, payload))
            _ = self.congested  # start the stall clock

    def send_console(self, data: bytes) -> None:
        """Console bytes: dropped (and counted, then reported in-band) while the client is over its bound."""
        if self.congested:
            self.console_dropped += len(data)
            return
        if self.console_dropped:
            note = f"\r\n[microagent: {self.console_dropped} console bytes dropped: this client was not " \
                   f"reading; serial.log has them]\r\n"
            self.console_dropped = 0
            self.send(FrameType.STDOUT, 0, note.encode())
        self.send(FrameType.STDOUT, 0, data)

    async def drained(self) -> None:
        """Return once this client's queue is below its bound (raises ConnectionError if it went away)."""
        await self.writer.drain()


@dataclass
class Route:
    """A guest stream opened for a client's request."""

    client: Client
    stream: int  # the client's stream id
    request: int  # FrameType.EXEC or FrameType.PING


class ClientHub:
    """All client connections of one supervisor and the guest streams they own."""

    def __init__(self, sup: ClientHost) -> None:
        self.sup = sup
        self.clients: set[Client] = set()
        self.none_left = asyncio.Event()  # set while no client is connected
        self.none_left.set()
        self.routes: dict[int, Route] = {}  # guest stream -> route
        # guest streams whose client went away before the command ended: their frames are expected, not forged
        self.orphans: set[int] = set()
        self.control_tasks: set[asyncio.Future[None]] = set()

    # ---- from the guest ------------------------------------------------------------------------
    def accepts(self, ftype: int, stream: int) -> bool | None:
        """Does a client route take ``ftype`` on ``stream``? None if no client route has that stream."""
        route = self.routes.get(stream)
        if route is None:
            return None
        return ftype in ROUTE_TYPES[route.request][0]  # type: ignore[index]

    def deliver(self, ftype: int, stream: int, payload: bytes) -> bool:
        """Pass a guest frame to the client that owns ``stream``; False if no client does."""
        route = self.routes.get(stream)
        if route is None:
            return False
        route.client.send(ftype, route.stream, payload)
        if ftype == ROUTE_TYPES[route.request][1]:  # type: ignore[index]
            del self.routes[stream]
            route.client.streams.pop(route.stream, None)
        return True

    def fail_all(self, message: str) -> None:
        """End every routed exec with an error (the VM or its channel is gone)."""
        for route in list(self.routes.values()):
            route.client.send(FrameType.ERROR, route.stream, message.encode())
            route.client.streams.pop(route.stream, None)
        self.routes.clear()
        self.orphans.clear()

    def to_consoles(self, data: bytes) -> None:
        for client in list(self.clients):
            if client.console:
                client.send_console(data)
                self.check_stall(client)

    def stream_owners(self) -> list[Client]:
        """Clients that own at least one guest stream (their output is never dropped)."""
        return [route.client for route in self.routes.values()]

    def check_stall(self, client: Client) -> bool:
        """Disconnect ``client`` if it has been over its bound for too long; True if it was."""
        if client.congested and client.stalled_since is not None and \
                time.monotonic() - client.stalled_since >= CLIENT_STALL_LIMIT:
            self.disconnect(client, f"it read none of its output for {CLIENT_STALL_LIMIT:.0f} s while "
                                    f"{client.queued} bytes waited")
            return True
        return False

    def disconnect(self, client: Client, why: str) -> None:
        """Drop a client now: its queued output is discarded and its commands get SIGHUP."""
        print(f"supervisor: disconnecting a client: {why}", file=sys.stderr)
        self.hang_up(client)
        client.writer.transport.abort()

    def hang_up(self, client: Client) -> None:
        """The client is gone: SIGHUP its commands; their remaining frames are expected and dropped."""
        self.clients.discard(client)
        if not self.clients:
            self.none_left.set()
        for gsid in client.streams.values():
            if self.routes.pop(gsid, None) is not None:
                self.orphans.add(gsid)
                self.sup.to_agent(FrameType.SIGNAL, gsid, str(int(signal.SIGHUP)).encode())
        client.streams.clear()

    def close_all(self) -> None:
        for client in list(self.clients):
            client.writer.close()

    # ---- from clients --------------------------------------------------------------------------
    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        self.clients.add(client)
        self.none_left.clear()
        decoder = FrameDecoder()
        try:
            while data := await reader.read(262144):
                for frame in decoder.feed(data):
                    await self.on_client_frame(client, frame.type, frame.stream, frame.payload)
                await writer.drain()  # a client that sends requests but reads no replies is not read either
                await self.sup.agent_drained()  # nor one whose stdin the guest does not take
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the supervisor is ending; the connection closes below
        except Exception as exc:
            client.send(FrameType.ERROR, 0, f"supervisor error: {exc}".encode())
        finally:
            self.hang_up(client)
            writer.close()

    async def on_client_frame(self, client: Client, ftype: int, stream: int, payload: bytes) -> None:
        sup = self.sup
        if ftype == FrameType.CONTROL:
            request = json.loads(payload or b"{}")
            while len(client.control_tasks) >= MAX_CONTROL_PER_CLIENT:
                await asyncio.wait(client.control_tasks, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.ensure_future(self.control(client, stream, request))
            for tasks in (self.control_tasks, client.control_tasks):
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        elif ftype in (FrameType.EXEC, FrameType.PING):
            if not sup.exec_allowed():
                hint = "; resume it first" if sup.state.state == "paused" else ""
                why = f"workspace is {sup.state.state}, not ready for exec{hint}"
                client.send(FrameType.ERROR, stream, why.encode())
                return
            if stream in client.streams:
                client.send(FrameType.ERROR, stream, f"stream {stream} is already in use".encode())
                return
            gsid = sup.new_stream()
            client.streams[stream] = gsid
            self.routes[gsid] = Route(client, stream, ftype)
            sup.to_agent(ftype, gsid, payload)
        elif ftype == FrameType.STDIN and stream == 0 and client.console:
            sup.to_serial(payload)
        elif ftype in (FrameType.STDIN, FrameType.SIGNAL) and stream in client.streams:
            sup.to_agent(ftype, client.streams[stream], payload)

    async def control(self, client: Client, stream: int, request: dict[str, Any]) -> None:
        sup = self.sup
        op = request.get("op")
        try:
            if op in ("halt", "stop", "kill"):
                reply = await sup.end_vm(op, float(request.get("timeout") or 0) or None)
            elif op == "quarantine":
                reply = await sup.quarantine()
            elif op in ("pause", "resume"):
                reply = await sup.pause(op == "pause")
            elif op == "snapshot":
                from ..snapshots.live import save

                reply = await save(sup, Path(str(request.get("dir", ""))))
            elif op == "sleep":
                reply = await sup.sleep()
            elif op == "console":
                client.console = True
                reply = {"ok": True}
            elif op in ("publish", "unpublish"):
                reply = await sup.ports.control(op, request)
            elif op == "allow":  # widen the running workspace's allow-list (the engine records it too)
                policy = sup.network_policy.with_allowed([str(e) for e in request.get("entries") or []])
                if sup.net is not None:
                    sup.net.update_policy(policy)
                sup.network_policy = policy
                reply = {"ok": True, "networkPolicy": policy.to_json()}
            elif op == "state":
                reply = {"ok": True, "state": sup.state.to_json()}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # report, never crash the supervisor
            traceback.print_exc()
            reply = {"ok": False, "error": str(exc)}
        client.send(FrameType.REPLY, stream, json.dumps(reply).encode())
