"""The supervisor's part that puts the VM to sleep and wakes it (scale to zero) while every host-side stream stays.

Sleep: frames for the agent are held from now on (:meth:`Sleeping.hold_for_wake`, bounded in bytes), the agent
channel's outgoing bytes drain into the guest, QMP ``stop``, RAM and device state migrated into
``<run dir>/sleep-state`` (snapshots.live), QEMU killed: the workspace holds no VM and no guest memory on the host,
while the supervisor — the host end of every exec stream, published port and console — stays and keeps listening
(state ``sleeping``; its own ~12 MiB are what is left).

Wake: anything that sends to the agent (an exec, stdin, a signal, a connection or a byte on a published port) or
``resume`` restores the saved stream into a new QEMU as a snapshot clone is restored, sends CONFIG (the host's
clock, a fresh RNG seed), and after the agent's READY the held frames in their order. The restored agent is the
one that was saved, streams and all, so the supervisor's routes, port connections and frame decoder carry on where
they stopped: what QEMU had not read from the channel was drained before the save, and what the guest had not sent
yet is in the saved device state. A command that was running simply continues; a host client notices nothing but
the pause.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
import time
from collections import deque
from typing import Any

from ..backends.qmp import QmpError
from ..errors import HostError
from ..records import now_iso
from ..snapshots.live import memory_form, stop_and_save
from ..states import allows, refusal

#: how long the agent may take to read what the host had already sent it before a sleep gives up
DRAIN_TIMEOUT = 10.0
#: bytes of frames for the agent held while it sleeps; past this, senders wait for the wake (agent_drained)
SLEEP_QUEUE_LIMIT = 4 << 20


def _unread(writer: asyncio.StreamWriter) -> int:
    """Bytes written to the agent's socket that QEMU has not read yet (SIOCOUTQ); -1 when unknown."""
    sock = writer.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, AttributeError, ValueError):
        return -1


class Sleeping:
    """Sleep and wake (a part of :class:`~.core.Supervisor`)."""

    def init_sleep(self) -> None:
        self.asleep = False  # from the start of a sleep until the woken agent's READY: frames for it are held
        self.sleep_queue: deque[bytes] = deque()
        self.sleep_queued = 0
        self.sleep_restore: dict[str, Any] | None = None
        self.wake_requested = asyncio.Event()
        self.awake = asyncio.Event()
        self.awake.set()
        self.slept = asyncio.Event()
        self.slept_at = 0.0
        self.agent_readers = 0  # agent channel readers still decoding (the old one ends at the sleeping QEMU's EOF)

    async def sleep(self) -> dict[str, Any]:
        """The control op ``sleep``: save the VM's memory and end QEMU, keeping every stream (see the module)."""
        state = self.state.state
        if not allows("sleep", state):
            return {"ok": False, "error": refusal("sleep", state, self.ws.name)}
        if self.snapshotting or self.asleep:
            return {"ok": False, "error": "a snapshot or a sleep of this workspace is under way; wait for it"}
        if self.ram_file:
            return {"ok": False, "error": "this workspace's RAM is a file a snapshot keeps; take the snapshot instead"}
        if self.agent_writer is None or self.channel_failed:
            return {"ok": False, "error": "the guest agent's channel is not up; the workspace cannot sleep now"}
        self.asleep = True
        self.awake.clear()
        if not await self._agent_flushed():
            self._finish_wake("the guest did not read its channel")
            return {"ok": False, "error": f"the guest agent did not read what the host sent it within "
                                          f"{DRAIN_TIMEOUT:.0f} s; the workspace runs on (try again later)"}
        path = self.ws.sleep_state
        self.snapshotting = True
        try:
            stopped, _ = await asyncio.to_thread(stop_and_save, self, path, ignore_shared=False, disk=None,
                                                 cont="on-error")
        except (OSError, QmpError, HostError) as exc:
            path.unlink(missing_ok=True)
            self._finish_wake("saving failed")
            return {"ok": False, "error": f"saving the workspace's memory failed: {exc}; it runs on"}
        finally:
            self.snapshotting = False
            self.pings.clear()
        self.sleep_restore = {"state": str(path), "memory": memory_form(self.state.boot_mode),
                              "snapshot": "its own sleep"}
        self.slept.clear()
        self.intent = "sleep"
        self.kill_vm()
        await asyncio.wait([asyncio.ensure_future(self.slept.wait()), asyncio.ensure_future(self.exited.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        size = path.stat().st_size if path.exists() else 0
        self.serial_note(f"asleep: memory saved ({size >> 20} MiB, the VM stopped {stopped:.2f} s), QEMU ended")
        return {"ok": True, "state": self.state.state, "stateBytes": size, "stoppedSeconds": round(stopped, 3)}

    async def _agent_flushed(self) -> bool:
        """Until QEMU has read every byte the supervisor wrote to the agent's channel (False after the timeout):
        a byte it had not read would be lost with it."""
        writer = self.agent_writer
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            if writer is None or writer.is_closing():
                return False
            if writer.transport.get_write_buffer_size() == 0 and _unread(writer) == 0:
                return True
            await asyncio.sleep(0.005)
        return False

    async def sleep_until_woken(self) -> bool:
        """The boot loop's stop while the VM sleeps: True when it is to be woken (the next boot restores the saved
        memory), False when the workspace is to end (killed while asleep)."""
        self.save(state="sleeping", vm_pid=None, vm_start_time=None, stopped_at=now_iso())
        self.slept_at = time.monotonic()
        self.slept.set()
        await self.wake_requested.wait()
        self.wake_requested.clear()
        if self.intent != "sleep":
            self.ws.sleep_state.unlink(missing_ok=True)
            return False
        self.intent = None
        self.pending_restore = self.sleep_restore
        for _ in range(500):  # the old channel's last bytes are decoded before the woken agent's first
            if not self.agent_readers:
                break
            await asyncio.sleep(0.01)
        return True

    def request_wake(self) -> None:
        if self.asleep:
            self.wake_requested.set()

    def hold_for_wake(self, frame: bytes) -> bool:
        """A frame for the agent while it sleeps: held (in order) and the VM woken."""
        self.sleep_queue.append(frame)
        self.sleep_queued += len(frame)
        self.request_wake()
        return True

    async def sleep_backpressure(self) -> None:
        """A sender waits for the wake once SLEEP_QUEUE_LIMIT bytes are held (or the supervisor ends)."""
        if self.asleep and self.sleep_queued > SLEEP_QUEUE_LIMIT:
            await asyncio.wait([asyncio.ensure_future(self.awake.wait()),
                                asyncio.ensure_future(self.exited.wait())], return_when=asyncio.FIRST_COMPLETED)

    def agent_ready_after_wake(self) -> None:
        """The woken agent said READY: the held frames go to it, in order, before anything new."""
        if self.asleep and self.restored:
            took = time.monotonic() - self.slept_at
            self._finish_wake(f"awake (asleep {took:.1f} s; {len(self.sleep_queue)} held frames sent)")
            self.ws.sleep_state.unlink(missing_ok=True)

    def _finish_wake(self, note: str) -> None:
        self.asleep = False
        while self.sleep_queue:
            frame = self.sleep_queue.popleft()
            if self.agent_writer is not None and not self.agent_writer.is_closing():
                self.agent_writer.write(frame)
        self.sleep_queued = 0
        self.awake.set()
        self.serial_note(note)

    async def wake(self) -> dict[str, Any]:
        """The control op ``resume`` on a sleeping workspace: wake it and answer once it runs (or has failed)."""
        self.request_wake()
        await asyncio.wait([asyncio.ensure_future(self.awake.wait()), asyncio.ensure_future(self.exited.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not self.awake.is_set():
            return {"ok": False, "error": self.state.error or "the workspace did not wake", "state": self.state.state}
        return {"ok": True, "state": self.state.state}
