"""The supervisor's mediation bridge, driven in-process over a real socket pair (the test plays the agent) to a
real TCP target on 127.0.0.1: per-stream bookkeeping is released whichever side closes, and a port that carries
garbage fails closed. The same rules with a real VM and a hostile guest program: tests/test_hostile_guest.py."""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from microagent_engine.model import Mediation
from microagent_engine.protocol import HEADER, MAX_PAYLOAD, FrameDecoder, FrameType, encode_frame
from microagent_engine.supervisor.mediation import MediationBridge

CYCLES = 2000


class Rig:
    """A bridge serving one end of a socket pair; ``agent_*`` is the other end; an echo server is the target."""

    def __init__(self) -> None:
        self.reports: list[tuple[bool, str, str]] = []
        self.notes: list[str] = []
        self.target_closed = 0  # target connections whose peer (the bridge) closed them

    async def start(self) -> "Rig":
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.bridge = MediationBridge(Mediation(2048, "127.0.0.1", port), self._report)
        self.bridge.note = self.notes.append
        self.bridge.guest_ready(True)
        self.port_task, self.agent_reader, self.agent_writer = await self.connect_port()
        self.decoder = FrameDecoder()
        self.pending: list[tuple[int, int, bytes]] = []
        return self

    def _report(self, ready: bool, detail: str, error: str) -> None:
        self.reports.append((ready, detail, error))

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        self.target_closed += 1
        writer.close()

    async def connect_port(self) -> tuple["asyncio.Task[None]", asyncio.StreamReader, asyncio.StreamWriter]:
        host_end, agent_end = socket.socketpair()
        hr, hw = await asyncio.open_connection(sock=host_end)
        task = asyncio.ensure_future(self.bridge.on_port(hr, hw))
        ar, aw = await asyncio.open_connection(sock=agent_end)
        return task, ar, aw

    def send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        self.agent_writer.write(encode_frame(ftype, stream, payload))

    async def frame(self) -> tuple[int, int, bytes]:
        """The next frame the host sent to the agent."""
        while not self.pending:
            data = await asyncio.wait_for(self.agent_reader.read(65536), 60)
            assert data, "the host closed the mediation port"
            self.pending += [(f.type, f.stream, f.payload) for f in self.decoder.feed(data)]
        return self.pending.pop(0)

    async def cycle(self, stream: int) -> None:
        """A guest program connects, is answered, and closes first."""
        self.send(FrameType.MOPEN, stream)
        self.send(FrameType.MDATA, stream, b"ping %d" % stream)
        assert await self.frame() == (FrameType.MDATA, stream, b"ping %d" % stream)
        self.send(FrameType.MCLOSE, stream)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Rendezvous: let the loop run until ``predicate`` holds (a generous bound, not a timing assertion)."""
        for _ in range(60_000):
            if predicate():
                return
            await asyncio.sleep(0.001)
        pytest.fail(f"gave up waiting for {what}")

    async def close(self) -> None:
        self.agent_writer.close()
        await asyncio.wait_for(self.port_task, 60)
        self.server.close()


def run(test: Callable[[Rig], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        rig = await Rig().start()
        try:
            return await test(rig)
        finally:
            await rig.close()
    return asyncio.run(main())


def test_streams_the_guest_closes_first_release_their_bookkeeping() -> None:
    async def test(rig: Rig) -> tuple[int, int]:
        for stream in range(1, 201):  # warm up (first-use allocations of asyncio and the allocator)
            await rig.cycle(stream)
        await rig.until(lambda: rig.target_closed == 200, "the warm-up target connections to close")
        gc.collect()  # transports end in reference cycles: count what is left, not what awaits the collector
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for stream in range(1001, 1001 + CYCLES):
            await rig.cycle(stream)
        await rig.until(lambda: rig.target_closed == 200 + CYCLES, "every target connection to close")
        await rig.until(lambda: not rig.bridge.tasks, "every bridge task to end")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return grown, rig.bridge.open_streams()

    grown, still_open = run(test)
    # the old code kept one counter per stream (~0.1 KB each): 2000 cycles grew ~200 KB
    assert grown < 32 * 1024, f"{CYCLES} guest-closed streams left {grown} bytes behind"
    assert still_open == 0


def test_streams_the_target_closes_first_are_released() -> None:
    async def test(rig: Rig) -> None:
        rig.send(FrameType.MOPEN, 7)
        rig.send(FrameType.MEOF, 7)  # the echo target reads EOF and closes: the host ends the stream
        assert await rig.frame() == (FrameType.MCLOSE, 7, b"")
        await rig.until(lambda: rig.bridge.open_streams() == 0, "the stream's bookkeeping to be released")

    run(test)


def test_an_empty_mdata_is_not_a_half_close() -> None:
    async def test(rig: Rig) -> None:
        rig.send(FrameType.MOPEN, 3)
        rig.send(FrameType.MDATA, 3, b"")  # documented as ignored: it must not end what the target reads
        rig.send(FrameType.MDATA, 3, b"after")
        assert await rig.frame() == (FrameType.MDATA, 3, b"after")
        assert rig.target_closed == 0

    run(test)


GARBAGE = {
    "unknown type": encode_frame(0x7E, 5, b"\x00garbage"),
    "agent-channel type": encode_frame(FrameType.STDOUT, 1, b"INJECTED"),
    "supervisor-only type": encode_frame(FrameType.CONTROL, 1, b"{}"),
    "oversized length": HEADER.pack(FrameType.MDATA, 1, MAX_PAYLOAD + 1) + b"A" * 4096,
    "stream 0": encode_frame(FrameType.MDATA, 0, b"x"),
    "MOPEN with a payload": encode_frame(FrameType.MOPEN, 9, b"x"),
    "MOPEN of an open stream": encode_frame(FrameType.MOPEN, 1),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_on_the_port_fails_closed(kind: str) -> None:
    async def test(rig: Rig) -> None:
        rig.send(FrameType.MOPEN, 1)  # a live connection when the garbage arrives
        rig.send(FrameType.MDATA, 1, b"hello")
        assert await rig.frame() == (FrameType.MDATA, 1, b"hello")
        rig.agent_writer.write(GARBAGE[kind])
        # the host closes the port: the agent reads EOF (and so closes its guest connections)
        assert await asyncio.wait_for(rig.agent_reader.read(), 60) == b""
        await asyncio.wait_for(rig.port_task, 60)
        await rig.until(lambda: rig.target_closed == 1, "the bridged target connection to close")
        await rig.until(lambda: rig.bridge.open_streams() == 0, "the stream's bookkeeping to be released")
        ready, detail, error = rig.reports[-1]
        assert not ready and detail == "mediation channel closed" and error.startswith("protocol violation: ")
        assert len(rig.notes) == 1 and rig.notes[0].startswith("mediation channel failed: ")
        assert len(rig.notes[0]) < 500
        # a new port connection (QEMU's, a restored clone's) is refused for the rest of this boot
        task, reader, writer = await rig.connect_port()
        await asyncio.wait_for(task, 60)
        assert await asyncio.wait_for(reader.read(), 60) == b""
        writer.close()
        rig.bridge.guest_ready(True)  # a late READY does not make it ready again
        assert rig.reports[-1][0] is False and rig.reports[-1][2].startswith("protocol violation: ")

    run(test)
