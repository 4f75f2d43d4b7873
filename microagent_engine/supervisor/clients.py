"""Clients of the control socket: their connections, the routing of their execs onto guest streams, and
their control requests (halt, stop, kill, quarantine, console, state)."""

from __future__ import annotations

import asyncio
import json
import signal
import traceback
from typing import TYPE_CHECKING, Any

from ..protocol import FrameDecoder, FrameType, encode_frame

if TYPE_CHECKING:
    from .core import Supervisor


class Client:
    """One connection to the control socket."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.streams: dict[int, int] = {}  # client stream id -> guest stream id
        self.console = False

    def send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(ftype, stream, payload))


class ClientHub:
    """All client connections of one supervisor and the guest streams they own."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.clients: set[Client] = set()
        self.routes: dict[int, tuple[Client, int]] = {}  # guest stream -> (client, client stream)
        self.control_tasks: set[asyncio.Future[None]] = set()

    # ---- from the guest ------------------------------------------------------------------------
    def deliver(self, ftype: int, stream: int, payload: bytes) -> bool:
        """Pass a guest frame to the client that owns ``stream``; False if no client does."""
        route = self.routes.get(stream)
        if route is None:
            return False
        client, csid = route
        client.send(ftype, csid, payload)
        if ftype in (FrameType.EXIT, FrameType.PONG):
            del self.routes[stream]
            client.streams.pop(csid, None)
        return True

    def fail_all(self, message: str) -> None:
        """End every routed exec with an error (the VM or its channel is gone)."""
        for client, csid in list(self.routes.values()):
            client.send(FrameType.ERROR, csid, message.encode())
        self.routes.clear()

    def to_consoles(self, data: bytes) -> None:
        for client in self.clients:
            if client.console:
                client.send(FrameType.STDOUT, 0, data)

    def close_all(self) -> None:
        for client in list(self.clients):
            client.writer.close()

    # ---- from clients --------------------------------------------------------------------------
    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        self.clients.add(client)
        decoder = FrameDecoder()
        try:
            while data := await reader.read(262144):
                for frame in decoder.feed(data):
                    await self.on_client_frame(client, frame.type, frame.stream, frame.payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the supervisor is ending; the connection closes below
        except Exception as exc:
            client.send(FrameType.ERROR, 0, f"supervisor error: {exc}".encode())
        finally:
            self.clients.discard(client)
            for gsid in client.streams.values():  # the client went away: hang up its commands
                self.routes.pop(gsid, None)
                self.sup.to_agent(FrameType.SIGNAL, gsid, str(int(signal.SIGHUP)).encode())
            writer.close()

    async def on_client_frame(self, client: Client, ftype: int, stream: int, payload: bytes) -> None:
        sup = self.sup
        if ftype == FrameType.CONTROL:
            request = json.loads(payload or b"{}")
            task = asyncio.ensure_future(self.control(client, stream, request))
            self.control_tasks.add(task)
            task.add_done_callback(self.control_tasks.discard)
        elif ftype in (FrameType.EXEC, FrameType.PING):
            if not sup.exec_allowed():
                client.send(FrameType.ERROR, stream, f"workspace is {sup.state.state}, not ready for exec".encode())
                return
            gsid = sup.new_stream()
            client.streams[stream] = gsid
            self.routes[gsid] = (client, stream)
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
            elif op == "console":
                client.console = True
                reply = {"ok": True}
            elif op == "state":
                reply = {"ok": True, "state": sup.state.to_json()}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # report, never crash the supervisor
            traceback.print_exc()
            reply = {"ok": False, "error": str(exc)}
        client.send(FrameType.REPLY, stream, json.dumps(reply).encode())
