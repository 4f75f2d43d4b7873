"""The supervisor's core: one instance per running workspace, in parts that share its state. ``core`` sets it up
and runs the main loop (boots, the restart policy's back-off, the sockets); ``record`` keeps the workspace's state
record, ``boot`` boots the VM (cold, template, snapshot), ``channel`` speaks to the guest agent and the serial
console, ``control`` acts on the running VM (quarantine, pause, halt, stop, kill). Each collaborator outside these
parts (clients, guest tasks, published ports, snapshots) sees only its role (``roles.py``).

The guest, its agent included, is treated as hostile. The agent channel fails closed: a frame that cannot be
decoded (oversized, truncated into garbage) or of a type the agent never sends ends the channel; every
in-flight command gets an error, readiness is saved false with the reason, the workspace is marked failed
and the VM is killed. Well-formed frames the host did not ask for (a stream it did not open, a type that
stream does not carry, a second HELLO or READY) are dropped and counted in the record (``dropped_frames``).
Guest stream ids are random, so a guest program cannot name another command's stream by counting. Every
string the guest supplies passes :func:`microagent_engine.textsafe.safe_text` before it is saved or relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from ..errors import MicroagentError
from ..logfiles import RotatingLog
from ..model import LaunchSpec
from ..protocol import FrameDecoder
from ..records import WorkspaceDir
from ..sandbox import ConfinedVM
from ..sandbox.network import NetworkSandbox
from ..snapshots.live import RAM_FILE_KEY, RESTORE_KEY
from ..snapshots.warm import WarmBoot
from ..states import transition
from .clients import ClientHub
from .guest_tasks import GuestTasks
from .mediation import MediationBridge, probe
from .publish import PortRelay
from .boot import Booting
from .channel import GuestChannel
from .control import VmControl
from .record import StateRecording
from .sleeping import Sleeping
from .timing import MAX_CONSECUTIVE_RESTARTS, RESTART_DELAYS, STABLE_AFTER


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's stream server logs a connection task cancelled at loop teardown as an error; it is not."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


class Supervisor(StateRecording, Booting, GuestChannel, VmControl, Sleeping):
    """One per running workspace: the parts (record, boot, channel, control) share this object's state, set up
    here; ``run`` is the main loop."""

    def __init__(self, ws: WorkspaceDir, launch: LaunchSpec, ready_fd: int | None) -> None:
        self.ws = ws
        self.launch = launch
        self.ready_fd = ready_fd
        self.state = ws.load_state()
        self.proc: ConfinedVM | None = None
        self.agent_writer: asyncio.StreamWriter | None = None
        self.serial_writer: asyncio.StreamWriter | None = None
        self.hub = ClientHub(self)
        self.tasks = GuestTasks(self)
        self.intent: str | None = None  # halt | stop | kill | restart | setup-failed
        self.exited = asyncio.Event()  # the supervisor is done (final state recorded)
        self.vm_exited = asyncio.Event()  # the current VM process has exited
        self.ready = asyncio.Event()
        self.ever_ready = False
        self.boot_t0 = time.monotonic()
        self.serial_log = RotatingLog(ws.serial_log)
        self.hello_seen = False  # this boot's agent said HELLO (a second one is dropped)
        self.ready_seen = False  # ... and READY
        self.channel_failed = False  # the agent broke the protocol: the channel is closed for this boot
        self.held_since: float | None = None  # reading the agent is paused for a congested client
        self.pings: dict[int, float] = {}  # liveness pings not answered yet: sequence -> when sent
        self.ping_seq = 0
        self.liveness_task: asyncio.Task[None] | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self.restart_policy = launch.restart
        self.network_policy = launch.network_policy
        self.net: NetworkSandbox | None = None  # this boot's network enforcement (None when isolated)
        self.mediation = MediationBridge(launch.mediation, self.report_mediation, self.serial_note) \
            if launch.mediation else None
        self.warm = WarmBoot(self)
        self.ports = PortRelay(self)  # published ports (-p, Engine.publish)
        self.snapshotting = False  # a workspace snapshot is being saved (the VM is stopped meanwhile)
        #: the first boot restores this workspace snapshot (create --from-snapshot); restarts boot normally
        self.pending_restore: dict[str, Any] | None = launch.extra.get(RESTORE_KEY)
        #: every boot's RAM is this shared file (``Engine.start(ram_file=True)``)
        self.ram_file: str | None = launch.extra.get(RAM_FILE_KEY)
        self.init_sleep()
        self.agent_decoder = FrameDecoder()  # kept across a sleep: the woken agent goes on mid-frame if it was
        self.restored = False  # this boot resumed a workspace snapshot: its processes (entrypoint too) run on

    # ---- main ----------------------------------------------------------------------------------
    async def run(self) -> int:
        self.ws.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sockets = self._sockets()
        for sock in sockets:
            sock.unlink(missing_ok=True)
        # the VM's chardevs are socket pairs made per boot by sandbox.spawn_vm; only clients connect here
        servers = [await asyncio.start_unix_server(self.hub.on_client, path=str(self.ws.control_socket))]
        os.chmod(self.ws.control_socket, 0o600)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_ignore_cancelled)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.end_vm("kill")))
        self.save(supervisor_pid=os.getpid(), error="", exit_detail="")
        background: list[asyncio.Task[None]] = []
        if self.mediation:
            cfg = self.mediation.cfg
            error = await probe(cfg)
            if error and cfg.required and cfg.fail_closed:
                error = (f"mediation is required and fail-closed, but {error}; start the service at "
                         f"{cfg.target} or change mediation.target")
                self.save(state="failed", error=error, supervisor_pid=None)
                self.notify_ready(False, error)
                return await self._close(servers, sockets)
            background.append(asyncio.create_task(self.mediation.probe_loop()))
        self.state.publish = []
        for item in self.launch.publish:
            try:
                await self.ports.bind(item, dynamic=False)
            except MicroagentError as exc:
                self.save(state="failed", error=str(exc), supervisor_pid=None)
                self.notify_ready(False, str(exc))
                await self.ports.close()
                return await self._close(servers, sockets)
        consecutive = 0
        while True:
            ran_for = await self.boot_once()
            if self.intent == "sleep":
                if await self.sleep_until_woken():
                    continue
                break
            if self.intent == "restart" or (self.intent is None and self.ever_ready and self.wants_restart(None)):
                consecutive = 0 if ran_for >= STABLE_AFTER else consecutive + 1
                if consecutive > MAX_CONSECUTIVE_RESTARTS:
                    self.save(error=f"restarted {MAX_CONSECUTIVE_RESTARTS} times in a row; giving up "
                                    f"(restart policy {self.restart_policy})")
                    self.state.state = transition(self.state.state, "failed")
                    break
                delay = RESTART_DELAYS[min(consecutive, len(RESTART_DELAYS)) - 1] if consecutive else 0
                self.save(state="starting", restart_count=self.state.restart_count + 1)
                self.serial_note(f"restarting (policy {self.restart_policy}, restart "
                                 f"#{self.state.restart_count}) in {delay} s")
                await asyncio.sleep(delay)
                if self.intent in ("halt", "stop", "kill"):  # asked to end during the back-off
                    break
                self.intent = None
                continue
            break
        self.finalize()
        self.exited.set()
        for task in background:
            task.cancel()
        await self.ports.close()
        if self.hub.control_tasks:  # let halt/stop/kill requests answer before the connections close
            await asyncio.wait(self.hub.control_tasks, timeout=5)
        return await self._close(servers, sockets)

    def _sockets(self) -> list[Path]:
        return [self.ws.agent_socket, self.ws.serial_socket, self.ws.qmp_socket, self.ws.control_socket,
                self.ws.mediation_socket]

    async def _close(self, servers: list[asyncio.Server], sockets: list[Path]) -> int:
        for server in servers:
            server.close()
        self.hub.close_all()
        # let each connection's task see its EOF and end, rather than be cancelled by asyncio.run's teardown
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.hub.none_left.wait(), 1.0)
        for sock in sockets:
            sock.unlink(missing_ok=True)
        return 0 if self.state.state != "failed" else 1

    setting_up = False
