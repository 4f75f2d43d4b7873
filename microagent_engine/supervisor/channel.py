"""The supervisor's part that speaks to the guest: the serial console and the agent's channel (which fails closed on
anything malformed), routing of its frames, and the liveness pings."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
import traceback

from ..errors import ProtocolError
from ..protocol import EXIT_STATUSES, ExitStatus, FrameType, InfoKey, decode_kv, encode_frame
from ..states import allows
from ..textsafe import safe_text
from .clients import CLIENT_STALL_LIMIT
from .publish import PORT_FRAME_TYPES
from .timing import LIVENESS_STREAM, PING_INTERVAL, LIVENESS_TIMEOUT, AGENT_BUFFER_LIMIT

#: frame types the agent sends; anything else from the guest is a protocol violation (the channel fails closed)
GUEST_FRAME_TYPES = frozenset({FrameType.HELLO, FrameType.READY, FrameType.HALTING, FrameType.STDOUT,
                               FrameType.STDERR, FrameType.EXIT, FrameType.PONG, FrameType.ERROR}) | PORT_FRAME_TYPES


class GuestChannel:
    """The guest agent's channel and the console (a part of :class:`~.core.Supervisor`)."""

    # ---- serial console ------------------------------------------------------------------------
    async def on_serial(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.serial_writer = writer
        while data := await reader.read(65536):
            self.to_console(data)

    def to_console(self, data: bytes) -> None:
        """Console bytes: into the (rotating) serial log, then to console clients (lossy past their bound)."""
        self.serial_log.write(data)
        self.hub.to_consoles(data)

    def to_serial(self, data: bytes) -> None:
        """Type into the serial console (a console client's STDIN)."""
        if self.serial_writer is not None:
            self.serial_writer.write(data)

    def new_stream(self) -> int:
        """A fresh guest stream id: random, so that a guest program cannot guess another command's stream
        (the agent and the guest's root can still read them from PID 1's memory: commands in one VM share one
        trust domain; the host only guarantees that frames it did not ask for go nowhere)."""
        while True:
            gsid = secrets.randbelow(LIVENESS_STREAM - 1) + 1
            if gsid not in self.hub.routes and gsid not in self.tasks.jobs and gsid not in self.hub.orphans \
                    and not self.ports.owns(gsid):
                return gsid

    def kill_vm(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()

    # ---- guest agent ---------------------------------------------------------------------------
    async def on_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.agent_writer is not None and not self.agent_writer.is_closing():
            writer.close()
            return
        if self.channel_failed:  # QEMU reconnects the chardev; a failed channel stays closed for this boot
            writer.close()
            return
        self.agent_writer = writer
        writer.transport.set_write_buffer_limits(high=AGENT_BUFFER_LIMIT)
        decoder = self.agent_decoder  # a new one per boot, the same one across a sleep (sleeping.py)
        self.agent_readers += 1
        try:
            while not self.channel_failed and (data := await reader.read(262144)):
                for frame in decoder.feed(data):
                    self.on_agent_frame(frame.type, frame.stream, frame.payload)
                    if self.channel_failed:
                        break
                else:
                    await self.hold_for_clients()
        except ProtocolError as exc:
            self.fail_channel(str(exc))
        except (ConnectionError, OSError) as exc:
            print(f"agent channel error: {exc!r}", file=sys.stderr)
        except Exception as exc:  # a frame the supervisor could not handle: fail closed, never half-open
            traceback.print_exc()
            self.fail_channel(f"a guest frame could not be handled ({type(exc).__name__})")
        self.agent_readers -= 1
        if not self.asleep:  # asleep: the saved guest keeps these connections; they go on after the wake
            self.ports.channel_lost()
        if self.agent_writer is writer:
            self.agent_writer = None
            if not self.channel_failed:
                self.set_signal("execReady", False, "agent channel closed")
        writer.close()

    async def hold_for_clients(self) -> None:
        """Stop reading the agent while a client that owns streams is over its output bound (so the guest
        blocks in its writes instead of the host buffering without end), until it drains or, after
        CLIENT_STALL_LIMIT, is disconnected. Polls once a second so a client that goes away frees it at once."""
        while True:
            stalled = [c for c in self.hub.stream_owners() if c.congested]
            if not stalled:
                if self.held_since is not None:
                    self.held_since = None
                    self.pings.clear()  # the agent could not answer pings while held
                return
            client = stalled[0]
            if self.hub.check_stall(client):
                continue
            if self.held_since is None:
                self.held_since = time.monotonic()
            waited = time.monotonic() - (client.stalled_since or time.monotonic())
            try:
                await asyncio.wait_for(client.drained(), max(0.01, min(1.0, CLIENT_STALL_LIMIT - waited)))
            except (asyncio.TimeoutError, ConnectionError):
                pass

    async def agent_drained(self) -> None:
        """Wait while more than AGENT_BUFFER_LIMIT bytes wait for the guest to read (client stdin), or, while it
        sleeps, more than SLEEP_QUEUE_LIMIT bytes are held for it."""
        if self.asleep:
            await self.sleep_backpressure()
            return
        writer = self.agent_writer
        if writer is not None and not writer.is_closing():
            try:
                await writer.drain()
            except ConnectionError:
                pass

    def to_agent(self, ftype: int, stream: int, payload: bytes = b"") -> bool:
        """Send a frame to the agent (held, and the VM woken, while it sleeps)."""
        if self.asleep:
            return self.hold_for_wake(encode_frame(ftype, stream, payload))
        return self.write_agent(ftype, stream, payload)

    def write_agent(self, ftype: int, stream: int, payload: bytes = b"") -> bool:
        if self.agent_writer is None or self.agent_writer.is_closing():
            return False
        self.agent_writer.write(encode_frame(ftype, stream, payload))
        return True

    def exec_allowed(self) -> bool:
        if self.asleep:  # the request is held and wakes the VM
            return not self.channel_failed and self.intent in (None, "sleep")
        return self.ready.is_set() and allows("exec", self.state.state) and \
            self.agent_writer is not None and not self.channel_failed

    def fail_channel(self, reason: str) -> None:
        """The agent broke the protocol: end the channel, fail every command, save the truth, kill the VM."""
        if self.channel_failed:
            return
        self.channel_failed = True
        reason = safe_text(reason, 300)
        error = (f"the guest agent broke the channel protocol ({reason}); the channel was closed and the VM "
                 f"killed. Treat the guest as compromised: delete the workspace, or start it again")
        print(f"supervisor: {error}", file=sys.stderr)
        self.serial_note(f"agent channel failed: {reason}")
        for name in ("guestReady", "execReady"):
            self.set_signal(name, False, "agent channel closed", f"protocol violation: {reason}")
        if self.intent not in ("halt", "stop", "kill"):
            self.intent = "channel-failed"  # no restart: a hostile guest does not get another boot by itself
        self.save(state="failed", error=error)
        self.hub.fail_all(error)
        self.tasks.fail_all(error)
        if self.agent_writer is not None:
            self.agent_writer.close()
        self.agent_writer = None
        self.kill_vm()
        self.notify_ready(False, error)

    def drop_frame(self, ftype: int, stream: int, why: str) -> None:
        """Count (and log the first few of) a well-formed guest frame the host did not ask for."""
        self.state.dropped_frames += 1
        count = self.state.dropped_frames
        if count <= 10 or count % 1000 == 0:
            print(f"supervisor: dropped guest frame type 0x{ftype:02x} on stream {stream}: {why} "
                  f"({count} dropped this boot)", file=sys.stderr)
        self.save_soon()

    def on_agent_frame(self, ftype: int, stream: int, payload: bytes) -> None:
        """Dispatch one guest frame (raises ProtocolError for a frame that must end the channel)."""
        if ftype not in GUEST_FRAME_TYPES:
            raise ProtocolError(f"frame type 0x{ftype:02x} on stream {stream}, which the agent never sends")
        if stream == 0:
            self.on_agent_control(ftype, payload)
            return
        if ftype in PORT_FRAME_TYPES:
            self.ports.deliver(ftype, stream, payload)
            return
        if stream == LIVENESS_STREAM:
            if ftype == FrameType.PONG:
                self.on_pong(payload)
            else:
                self.drop_frame(ftype, stream, "not a PONG on the liveness stream")
            return
        job = stream in self.tasks.jobs
        route = self.hub.accepts(ftype, stream)
        if not job and route is None:
            if stream in self.hub.orphans:  # a command whose client left: expected, not forged
                if ftype == FrameType.EXIT:
                    self.hub.orphans.discard(stream)
                return
            self.drop_frame(ftype, stream, "no command runs on that stream")
            return
        if (job and ftype == FrameType.PONG) or route is False:
            self.drop_frame(ftype, stream, "that stream does not carry this type")
            return
        if ftype == FrameType.EXIT:
            payload = self.checked_exit(payload)
        elif ftype == FrameType.ERROR:
            payload = safe_text(payload, 1000).encode()
        if not self.tasks.deliver(ftype, stream, payload):
            self.hub.deliver(ftype, stream, payload)

    @staticmethod
    def checked_exit(payload: bytes) -> bytes:
        """An EXIT payload re-encoded from its parsed, validated fields (message made safe to show)."""
        st = ExitStatus.parse(payload)
        if st.status not in EXIT_STATUSES:
            raise ProtocolError(f"EXIT with unknown status {safe_text(st.status, 40)!r}")
        message = safe_text(st.message, 1000)
        return f"{st.status} {st.code}{' ' + message if message else ''}".encode()

    def on_agent_control(self, ftype: int, payload: bytes) -> None:
        """Stream 0: HELLO once, READY once after HELLO, HALTING, ERROR; anything else is dropped."""
        if ftype == FrameType.HELLO and not self.hello_seen:
            self.hello_seen = True
            info = decode_kv(payload)
            version = safe_text(info.get(InfoKey.VERSION, "?"), 40)
            kernel = safe_text(info.get(InfoKey.KERNEL, "?"), 120)
            self.set_signal("guestReady", True, f"agent v{version} on kernel {kernel}")
            self.state.kernel_release = kernel
            self.save()
            self.to_agent(FrameType.CONFIG, 0, self.config_payload())
        elif ftype == FrameType.READY and self.hello_seen and not self.ready_seen:
            self.ready_seen = True
            asyncio.ensure_future(self.on_ready(decode_kv(payload)))
        elif ftype == FrameType.HALTING:
            pass
        elif ftype == FrameType.ERROR:
            print(f"agent reported: {safe_text(payload, 500)}", file=sys.stderr)
        else:
            what = {int(FrameType.HELLO): "a second HELLO", int(FrameType.READY): "READY out of order"}.get(
                ftype, "a type stream 0 does not carry")
            self.drop_frame(ftype, 0, f"{what} (ignored)")

    # ---- liveness ------------------------------------------------------------------------------
    async def liveness_loop(self) -> None:
        """Ping the agent every PING_INTERVAL; save execReady false once a ping has waited LIVENESS_TIMEOUT for
        its answer (a fork bomb, a wedged agent) and true again when one is answered promptly. The VM is left
        alone: the user decides whether to wait or to kill it. Pings are not judged while the host itself
        holds the channel for a congested client."""
        self.pings.clear()
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if self.channel_failed or self.agent_writer is None:
                return
            now = time.monotonic()
            if self.held_since is not None or self.state.state == "paused" or self.snapshotting:
                self.pings.clear()
                continue
            if len(self.pings) < 64:  # an agent that answers nothing gets no more than this many queued
                self.ping_seq += 1
                self.pings[self.ping_seq] = now
                self.to_agent(FrameType.PING, LIVENESS_STREAM, str(self.ping_seq).encode())
            waited = now - min(self.pings.values())
            if waited > LIVENESS_TIMEOUT and self.state.readiness.get("execReady", {}).get("ready"):
                self.set_signal("execReady", False, "agent not answering",
                                f"the guest agent has not answered a ping for {waited:.0f} s (guest overloaded "
                                f"or wedged); commands may hang; wait, or kill the workspace")
                self.save()

    def on_pong(self, payload: bytes) -> None:
        try:
            sent = self.pings.pop(int(payload))
        except (ValueError, KeyError):
            self.drop_frame(FrameType.PONG, LIVENESS_STREAM, "an answer to no ping")
            return
        for seq in [seq for seq in self.pings if self.pings[seq] <= sent]:  # answers arrive in order
            del self.pings[seq]
        prompt = time.monotonic() - sent < LIVENESS_TIMEOUT / 2
        sig = self.state.readiness.get("execReady", {})
        if prompt and self.ready.is_set() and not sig.get("ready") and sig.get("detail") == "agent not answering":
            self.set_signal("execReady", True, "agent answering again")
            self.save()
