"""The supervisor's core: one instance per running workspace. It owns the hypervisor process and its boot loop
(restart policy), the serial console, the guest agent's channel, and the workspace's state record.

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
import dataclasses
import json
import os
import secrets
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import HostError, MicroagentError, ProtocolError
from ..fsutil import open_private
from ..logfiles import RotatingLog, tail_bytes
from ..model import LaunchSpec
from ..protocol import (EXIT_STATUSES, ExitStatus, FrameDecoder, FrameType, HaltMode, InfoKey, NetworkMode, ReadyValue,
                        decode_kv, encode_config, encode_frame)
from ..records import WorkspaceDir, now_iso, process_start_time, signal as readiness
from ..sandbox import ConfinedVM, spawn_vm
from ..sandbox.network import NetworkSandbox
from ..snapshots.live import RESTORE_KEY, restore_argv
from ..snapshots.warm import BootPlan, WarmBoot
from ..states import allows, refusal, transition
from ..textsafe import safe_text
from .clients import CLIENT_STALL_LIMIT, ClientHub
from .guest_tasks import STOP_TIMEOUT, GuestTasks
from .mediation import MediationBridge, probe
from .publish import PORT_FRAME_TYPES, PortRelay
from ..backends.qmp import qmp_command

HALT_TIMEOUT = 30.0
KVM_FAILURE_MARKERS = ("KVM internal error", "emulation failure", "kvm run failed")
RESTART_DELAYS = (1, 2, 4, 8, 16, 30)  # bounded back-off between restarts, seconds
MAX_CONSECUTIVE_RESTARTS = 10
STABLE_AFTER = 30.0  # a VM that ran this long resets the back-off
#: frame types the agent sends; anything else from the guest is a protocol violation (the channel fails closed)
GUEST_FRAME_TYPES = frozenset({FrameType.HELLO, FrameType.READY, FrameType.HALTING, FrameType.STDOUT,
                               FrameType.STDERR, FrameType.EXIT, FrameType.PONG, FrameType.ERROR}) | PORT_FRAME_TYPES
#: the guest stream the supervisor's own liveness pings use (never given to a command)
LIVENESS_STREAM = 0xFFFFFFFF
PING_INTERVAL = 2.0  # seconds between liveness pings
LIVENESS_TIMEOUT = 10.0  # a ping unanswered this long saves execReady false (the VM is left running)
#: bytes the supervisor may queue towards the agent before a client's stdin waits for the guest to read
AGENT_BUFFER_LIMIT = 1 << 20


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's stream server logs a connection task cancelled at loop teardown as an error; it is not."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def tail_text(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a guest-written log file (read from its end), made safe to show."""
    text = "\n".join(tail_bytes(path, 8192).decode(errors="replace").splitlines()[-lines:])
    return safe_text(text, 4000, newlines=True)


class Supervisor:
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
        self.restored = False  # this boot resumed a workspace snapshot: its processes (entrypoint too) run on

    # ---- state ---------------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        """Record ``changes`` (a new ``state`` only through :func:`states.transition`)."""
        if "state" in changes:
            changes["state"] = transition(self.state.state, changes["state"])
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.ws.save_state(self.state)

    def save_soon(self) -> None:
        """Save within a second (for counters a guest can drive: one write per burst, not per frame)."""
        if self._save_handle is None:
            def later() -> None:
                self._save_handle = None
                self.save()
            self._save_handle = asyncio.get_running_loop().call_later(1.0, later)

    def set_signal(self, name: str, ready: bool, detail: str = "", error: str = "") -> None:
        self.state.readiness[name] = readiness(ready, detail, error)

    def report_mediation(self, ready: bool, detail: str, error: str) -> None:
        old = self.state.readiness.get("mediationReady", {})
        if (old.get("ready"), old.get("detail"), old.get("error")) != (ready, detail, error):
            self.set_signal("mediationReady", ready, detail, error)
            self.save()

    def notify_ready(self, ok: bool, error: str = "") -> None:
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, (json.dumps({"ok": ok, "error": error}) + "\n").encode())
            os.close(self.ready_fd)
        self.ready_fd = None

    def serial_note(self, text: str) -> None:
        self.serial_log.write(f"\n--- microagent: {text} ---\n".encode())

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
        for _ in range(100):
            if not self.hub.clients:
                break
            await asyncio.sleep(0.01)
        for sock in sockets:
            sock.unlink(missing_ok=True)
        return 0 if self.state.state != "failed" else 1

    async def boot_once(self) -> float:
        """Launch the VM and wait for it to exit; returns how long it ran."""
        self.ready = asyncio.Event()
        self.vm_exited = asyncio.Event()
        self.agent_writer = None
        self.hello_seen = self.ready_seen = self.channel_failed = False
        self.state.dropped_frames = 0
        if self.mediation:
            self.mediation.reset()
        for name in self.state.readiness:
            self.set_signal(name, False, "booting")
        self.boot_t0 = time.monotonic()
        self.serial_note(f"boot at {now_iso()} (accel {self.launch.accel})")
        vm_log = open_private(self.ws.vm_log, "ab")
        vm_log.write(f"--- {now_iso()} {' '.join(self.launch.argv)}\n".encode())
        vm_log.flush()
        try:
            self.net = await NetworkSandbox.open(self.network_policy, self.ws.run_dir, self.launch.secrets,
                                                 self.launch.secret_values, self.ws.path)
            self.proc = await self.start_vm(vm_log)
        except (OSError, MicroagentError) as exc:
            await self.close_network()
            prefix = "" if isinstance(exc, MicroagentError) else "could not start the hypervisor: "
            self.save(state="failed", error=f"{prefix}{exc}")
            self.notify_ready(False, self.state.error)
            return 0.0
        for note in self.net.notes if self.net else []:
            self.serial_note(note)
        self.save(state="starting", vm_pid=self.proc.pid, vm_start_time=process_start_time(self.proc.pid),
                  started_at=now_iso(), stopped_at=None, boot_seconds=None, confinement=self.proc.confinement)
        watchers = [asyncio.create_task(self.watch_stderr(vm_log)), asyncio.create_task(self.boot_deadline())]
        rc = await self.proc.wait()
        await asyncio.sleep(0)  # let the stderr watcher record a last line
        if self.liveness_task:
            watchers.append(self.liveness_task)
            self.liveness_task = None
        for task in watchers:
            task.cancel()
        vm_log.close()
        await self.close_network()
        self.vm_exited.set()
        self.state.exit_detail = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
        self.hub.fail_all(f"the VM exited ({self.state.exit_detail}) before the command finished")
        self.tasks.fail_all("the VM exited")
        return time.monotonic() - self.boot_t0

    async def start_vm(self, vm_log: Any) -> ConfinedVM:
        """Spawn this boot's VM: a clone of the machine shape's template (snapshots.warm), or a cold boot when
        there is none to be had (the reason saved as ``cold_reason`` and noted in the serial log)."""
        self.restored = False
        if self.pending_restore is not None:
            restore, self.pending_restore = self.pending_restore, None
            return await self.start_restored(restore, vm_log)
        plan = await self.warm.plan()
        vm = await self.spawn(plan.argv, vm_log)
        if plan.mode == "warm":
            error = await self.warm.restore(vm)
            if error:
                vm.kill()
                await vm.wait()
                key = plan.template.key if plan.template else "?"
                plan = BootPlan("cold", self.launch.argv, f"restoring template {key} failed: {error}")
                vm = await self.spawn(plan.argv, vm_log)
            else:
                await self.configure_clone()
        key = plan.template.key if plan.template else "?"
        built = ", built by this start" if plan.built else ""
        how = f"warm (clone of template {key}{built})" if plan.mode == "warm" else f"cold: {plan.reason}"
        self.serial_note(f"boot mode {how}")
        self.state.boot_mode, self.state.cold_reason = plan.mode, plan.reason
        return vm

    async def start_restored(self, restore: dict[str, Any], vm_log: Any) -> ConfinedVM:
        """Spawn a clone of a workspace snapshot and resume it (no cold fallback: its processes would be lost)."""
        name = restore.get("snapshot", "?")
        vm = await self.spawn(restore_argv(self.launch.argv, restore), vm_log)
        error = await self.warm.restore(vm, ignore_shared=False)
        if error:
            vm.kill()
            await vm.wait()
            raise HostError(f"restoring snapshot {name!r} failed: {error}; 'microagent start --cold' boots its disk "
                            f"without its processes")
        self.restored = True
        await self.configure_clone(f"agent resumed from snapshot {name}")
        self.serial_note(f"boot mode snapshot (resumed {name})")
        self.state.boot_mode, self.state.cold_reason = "snapshot", ""
        return vm

    async def spawn(self, argv: list[str], vm_log: Any) -> ConfinedVM:
        return await spawn_vm(self.ws, dataclasses.replace(self.launch, argv=argv), self.state.backend, {
            "agent": self.on_agent, "ser0": self.on_serial,
            "mediation": self.mediation.on_port if self.mediation else None}, stdout=vm_log,
            join_namespaces=self.net.join_namespaces() if self.net else None)

    async def configure_clone(self, detail: str = "agent restored from a template") -> None:
        """A restored clone's agent said HELLO in the template (or snapshot): send its CONFIG (own hostname, env,
        disks, clock and RNG seed) now that it runs."""
        for _ in range(500):
            if self.agent_writer is not None:
                break
            await asyncio.sleep(0.002)
        self.hello_seen = True
        self.set_signal("guestReady", True, detail)
        self.to_agent(FrameType.CONFIG, 0, self.config_payload())

    async def close_network(self) -> None:
        if self.net is not None:
            await self.net.close()
            self.net = None

    def wants_restart(self, entrypoint_status: ExitStatus | None) -> bool:
        """The restart policy's verdict on a crash (None) or an entrypoint exit."""
        if self.restart_policy == "always":
            return True
        if self.restart_policy == "on-failure":
            return entrypoint_status is None or entrypoint_status.exit_code != 0
        return False

    def finalize(self) -> None:
        how = self.state.exit_detail
        for name in self.state.readiness:
            # after a channel failure the reason stays on the signals it ended
            kept = self.state.readiness[name].get("error", "") if self.intent == "channel-failed" else ""
            self.set_signal(name, False, "VM not running", kept)
        if self.intent == "kill":
            final, error = "stopped", ""
        elif self.intent == "halt" and self.state.state == "stopping":
            final, error = "halted", ""
        elif self.intent == "stop" and self.state.state == "stopping":
            final, error = "stopped", ""
        elif self.state.state == "failed":
            final, error = "failed", self.state.error
        elif not self.ever_ready:
            final = "failed"
            error = self.state.error or (f"the VM exited during boot ({how}). Last console lines:\n"
                                         + tail_text(self.ws.serial_log))
        else:
            final, error = "failed", f"the VM exited unexpectedly ({how})"
        self.save(state=final, error=error, vm_pid=None, vm_start_time=None, supervisor_pid=None,
                  stopped_at=now_iso())
        self.notify_ready(False, error or f"the VM exited ({how})")

    async def watch_stderr(self, vm_log: Any) -> None:
        assert self.proc and self.proc.stderr
        while line := await self.proc.stderr.readline():
            vm_log.write(line)
            vm_log.flush()
            text = line.decode(errors="replace")
            if any(marker in text for marker in KVM_FAILURE_MARKERS) and self.proc.returncode is None:
                self.save(state="failed", error=f"the hypervisor reported: {text.strip()}; "
                                                f"try --accel tcg (see microagent doctor)")
                self.proc.kill()

    async def boot_deadline(self) -> None:
        timeout = self.launch.boot_timeout
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            if self.proc and self.proc.returncode is None and not self.setting_up:
                self.save(state="failed", error=f"the guest agent did not become ready within {timeout:.0f} s. "
                          f"Last console lines:\n{tail_text(self.ws.serial_log)}")
                self.proc.kill()

    setting_up = False

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
        decoder = FrameDecoder()
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
        """Wait while more than AGENT_BUFFER_LIMIT bytes wait for the guest to read (client stdin)."""
        writer = self.agent_writer
        if writer is not None and not writer.is_closing():
            try:
                await writer.drain()
            except ConnectionError:
                pass

    def to_agent(self, ftype: int, stream: int, payload: bytes = b"") -> bool:
        if self.agent_writer is None or self.agent_writer.is_closing():
            return False
        self.agent_writer.write(encode_frame(ftype, stream, payload))
        return True

    def exec_allowed(self) -> bool:
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

    async def on_ready(self, info: dict[str, str]) -> None:
        shell = self.launch.shell
        if InfoKey.KERNEL in info:  # READY repeats it: a template clone's HELLO went to the template's host
            kernel = safe_text(info[InfoKey.KERNEL], 120)
            self.state.kernel_release = kernel
            version = safe_text(info.get(InfoKey.VERSION, "?"), 40)
            self.set_signal("guestReady", True, f"agent v{version} on kernel {kernel}")
        if info.get(InfoKey.SHELL) == ReadyValue.OK:
            self.set_signal("shellReady", True, f"{shell} on the serial console")
        else:
            self.set_signal("shellReady", False, error=f"shell {shell} not found in the guest")
        if self.mediation:
            med = safe_text(info.get(InfoKey.MEDIATION, ReadyValue.NONE), 200)
            ok = med == ReadyValue.OK
            self.mediation.guest_ready(ok, "" if ok else f"guest side: {med}")
        else:
            self.set_signal("mediationReady", False, "no mediation channel configured")
        errors = [safe_text(f"{k}: {v}", 300) for k, v in info.items()
                  if v.startswith(ReadyValue.ERROR) and k != InfoKey.MEDIATION]
        if info.get(InfoKey.MOUNTS, "").startswith(ReadyValue.ERROR):
            self.save(state="failed",
                      error="attaching disks failed in the guest: " + safe_text(info[InfoKey.MOUNTS], 500))
            self.intent = "setup-failed"
            self.to_agent(FrameType.HALT, 0, HaltMode.HALT.encode())
            return
        if self.launch.setup and not self.state.setup_done:
            self.setting_up = True
            if not await self.tasks.run_setup(self.launch.setup):
                return
            self.setting_up = False
        if self.channel_failed or self.vm_exited.is_set():
            return
        boot = round(time.monotonic() - self.boot_t0, 3)
        self.set_signal("execReady", True, f"agent ready after {boot} s")
        self.ever_ready = True
        self.save(state="running", boot_seconds=boot, error="; ".join(errors[:8]))
        self.ready.set()
        self.notify_ready(True)
        self.liveness_task = asyncio.ensure_future(self.liveness_loop())
        if self.launch.entrypoint and not self.restored:  # a resumed snapshot's entrypoint is still running
            asyncio.ensure_future(self.tasks.run_entrypoint(self.launch.entrypoint))

    def config_payload(self) -> bytes:
        return encode_config(self.launch.hostname, self.launch.network, self.launch.shell, self.launch.env,
                             self.launch.mounts, self.mediation.cfg.port if self.mediation else None,
                             clock=time.time(), seed=secrets.token_bytes(32))

    async def quarantine(self) -> dict[str, Any]:
        if not allows("quarantine", self.state.state):
            return {"ok": False, "error": refusal("quarantine", self.state.state, self.ws.name)}
        if self.net is not None:
            self.net.sever()
        if self.launch.network == NetworkMode.USER and not await self.qmp("set_link", {"name": "net0", "up": False}):
            return {"ok": False, "error": "could not take the network link down through QMP"}
        if self.mediation:
            self.mediation.sever("workspace quarantined")
        self.ports.sever()
        self.set_signal("mediationReady", False, "quarantined", "workspace quarantined")
        self.save(state="quarantined", error="quarantined: network and mediation severed; halt, stop or kill "
                                              "it before starting again")
        return {"ok": True, "state": "quarantined"}

    async def pause(self, pause: bool) -> dict[str, Any]:
        """pause: stop the vCPUs (QMP ``stop``), keeping memory and processes; resume: ``cont``."""
        op = "pause" if pause else "resume"
        if not allows(op, self.state.state):
            return {"ok": False, "error": refusal(op, self.state.state, self.ws.name)}
        if not await self.qmp("stop" if pause else "cont"):
            return {"ok": False, "error": f"QEMU did not {'stop' if pause else 'continue'} the VM through QMP"}
        self.pings.clear()  # the guest could not answer pings while paused
        if pause:
            self.set_signal("execReady", False, "paused", "workspace paused; resume it to run commands")
        else:
            self.set_signal("execReady", True, "resumed")
        self.save(state="paused" if pause else "running")
        return {"ok": True, "state": self.state.state}

    async def end_vm(self, how: str, timeout: float | None = None) -> dict[str, Any]:
        """halt (graceful, via the agent), stop (ask once, wait 5 s, no escalation) or kill (hard)."""
        if self.exited.is_set():
            return {"ok": True, "state": self.state.state}
        if how == "kill":
            self.intent = "kill"
            if self.proc and self.proc.returncode is None:
                self.proc.kill()
            await self.exited.wait()
            return {"ok": True, "state": self.state.state}
        if not allows(how, self.state.state):
            return {"ok": False, "error": refusal(how, self.state.state, self.ws.name)}
        self.intent = how
        self.save(state="stopping")
        if self.proc is None or self.proc.returncode is not None:  # between restarts
            await self.exited.wait()
            return {"ok": True, "state": self.state.state}
        if how == "halt":
            sent = self.to_agent(FrameType.HALT, 0, HaltMode.HALT.encode())
            limit = timeout or HALT_TIMEOUT
        else:
            sent = self.to_agent(FrameType.HALT, 0, HaltMode.POWEROFF.encode())
            limit = timeout or STOP_TIMEOUT
        if not sent:
            await self.qmp("system_powerdown")
        try:
            await asyncio.wait_for(self.exited.wait(), limit)
        except asyncio.TimeoutError:
            error = (f"{how}: the guest did not shut down within {limit:.0f} s; it is still running. "
                     f"Run 'microagent kill {self.ws.name}' to force it off")
            self.save(state="failed", error=error)
            return {"ok": False, "error": error, "state": "failed"}
        return {"ok": True, "state": self.state.state}

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> bool:
        return await qmp_command(self.ws.qmp_socket, command, arguments)
