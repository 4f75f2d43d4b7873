"""The supervisor's core: one instance per running workspace. It owns the hypervisor process and its boot loop
(restart policy), the serial console, the guest agent's channel, and the workspace's state record."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..fsutil import open_private
from ..model import LaunchSpec
from ..protocol import ExitStatus, FrameDecoder, FrameType, decode_kv, encode_entries, encode_frame
from ..records import WorkspaceDir, now_iso, process_start_time, signal as readiness
from .clients import ClientHub
from .guest_tasks import STOP_TIMEOUT, GuestTasks
from .mediation import MediationBridge, probe
from .qmp import qmp_command

HALT_TIMEOUT = 30.0
KVM_FAILURE_MARKERS = ("KVM internal error", "emulation failure", "kvm run failed")
RESTART_DELAYS = (1, 2, 4, 8, 16, 30)  # bounded back-off between restarts, seconds
MAX_CONSECUTIVE_RESTARTS = 10
STABLE_AFTER = 30.0  # a VM that ran this long resets the back-off


def _set_pdeathsig() -> None:
    """In the hypervisor child: die with the supervisor, so no VM outlives the process that records it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's stream server logs a connection task cancelled at loop teardown as an error; it is not."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def tail_text(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (read from its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class Supervisor:
    def __init__(self, ws: WorkspaceDir, launch: LaunchSpec, ready_fd: int | None) -> None:
        self.ws = ws
        self.launch = launch
        self.ready_fd = ready_fd
        self.state = ws.load_state()
        self.proc: asyncio.subprocess.Process | None = None
        self.agent_writer: asyncio.StreamWriter | None = None
        self.serial_writer: asyncio.StreamWriter | None = None
        self.hub = ClientHub(self)
        self.tasks = GuestTasks(self)
        self.next_stream = 1
        self.intent: str | None = None  # halt | stop | kill | restart | setup-failed
        self.exited = asyncio.Event()  # the supervisor is done (final state recorded)
        self.vm_exited = asyncio.Event()  # the current VM process has exited
        self.ready = asyncio.Event()
        self.ever_ready = False
        self.boot_t0 = time.monotonic()
        self.serial_log = open_private(ws.serial_log, "ab", buffering=0)
        self.restart_policy = launch.restart
        self.mediation = MediationBridge(launch.mediation, self.report_mediation) if launch.mediation else None

    # ---- state ---------------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.ws.save_state(self.state)

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
        servers = [
            await asyncio.start_unix_server(self.on_agent, path=str(self.ws.agent_socket)),
            await asyncio.start_unix_server(self.on_serial, path=str(self.ws.serial_socket)),
            await asyncio.start_unix_server(self.hub.on_client, path=str(self.ws.control_socket)),
        ]
        if self.mediation:
            servers.append(await asyncio.start_unix_server(self.mediation.on_port,
                                                           path=str(self.ws.mediation_socket)))
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
        consecutive = 0
        while True:
            ran_for = await self.boot_once()
            if self.intent == "restart" or (self.intent is None and self.ever_ready and self.wants_restart(None)):
                consecutive = 0 if ran_for >= STABLE_AFTER else consecutive + 1
                if consecutive > MAX_CONSECUTIVE_RESTARTS:
                    self.save(error=f"restarted {MAX_CONSECUTIVE_RESTARTS} times in a row; giving up "
                                    f"(restart policy {self.restart_policy})")
                    self.state.state = "failed"
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
            self.proc = await asyncio.create_subprocess_exec(
                *self.launch.argv, stdin=asyncio.subprocess.DEVNULL, stdout=vm_log,
                stderr=asyncio.subprocess.PIPE, preexec_fn=_set_pdeathsig)
        except OSError as exc:
            self.save(state="failed", error=f"could not start the hypervisor: {exc}")
            self.notify_ready(False, self.state.error)
            return 0.0
        self.save(state="starting", vm_pid=self.proc.pid, vm_start_time=process_start_time(self.proc.pid),
                  started_at=now_iso(), stopped_at=None, boot_seconds=None)
        watchers = [asyncio.create_task(self.watch_stderr(vm_log)), asyncio.create_task(self.boot_deadline())]
        rc = await self.proc.wait()
        await asyncio.sleep(0)  # let the stderr watcher record a last line
        for task in watchers:
            task.cancel()
        vm_log.close()
        self.vm_exited.set()
        self.state.exit_detail = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
        self.hub.fail_all(f"the VM exited ({self.state.exit_detail}) before the command finished")
        self.tasks.fail_all("the VM exited")
        return time.monotonic() - self.boot_t0

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
            self.set_signal(name, False, "VM not running")
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
        self.serial_log.write(data)
        self.hub.to_consoles(data)

    def to_serial(self, data: bytes) -> None:
        """Type into the serial console (a console client's STDIN)."""
        if self.serial_writer is not None:
            self.serial_writer.write(data)

    def new_stream(self) -> int:
        """A fresh guest stream id."""
        gsid = self.next_stream
        self.next_stream += 1
        return gsid

    def kill_vm(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()

    # ---- guest agent ---------------------------------------------------------------------------
    async def on_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.agent_writer is not None and not self.agent_writer.is_closing():
            writer.close()
            return
        self.agent_writer = writer
        decoder = FrameDecoder()
        try:
            while data := await reader.read(262144):
                for frame in decoder.feed(data):
                    self.on_agent_frame(frame.type, frame.stream, frame.payload)
        except Exception as exc:  # a broken channel is a guest failure, not a supervisor crash
            print(f"agent channel error: {exc!r}", file=sys.stderr)
        if self.agent_writer is writer:
            self.agent_writer = None
            self.set_signal("execReady", False, "agent channel closed")

    def to_agent(self, ftype: int, stream: int, payload: bytes = b"") -> bool:
        if self.agent_writer is None or self.agent_writer.is_closing():
            return False
        self.agent_writer.write(encode_frame(ftype, stream, payload))
        return True

    def exec_allowed(self) -> bool:
        return self.ready.is_set() and self.state.state in ("running", "quarantined") and \
            self.agent_writer is not None

    def on_agent_frame(self, ftype: int, stream: int, payload: bytes) -> None:
        if ftype == FrameType.HELLO:
            info = decode_kv(payload)
            self.set_signal("guestReady", True, f"agent v{info.get('version', '?')} on kernel {info.get('kernel', '?')}")
            self.state.kernel_release = info.get("kernel", "")
            self.save()
            self.to_agent(FrameType.CONFIG, 0, self.config_payload())
        elif ftype == FrameType.READY:
            asyncio.ensure_future(self.on_ready(decode_kv(payload)))
        elif ftype == FrameType.HALTING:
            pass
        elif not self.tasks.deliver(ftype, stream, payload):
            self.hub.deliver(ftype, stream, payload)

    async def on_ready(self, info: dict[str, str]) -> None:
        shell = self.launch.shell
        if info.get("shell") == "ok":
            self.set_signal("shellReady", True, f"{shell} on the serial console")
        else:
            self.set_signal("shellReady", False, error=f"shell {shell} not found in the guest")
        if self.mediation:
            med = info.get("mediation", "none")
            self.mediation.guest_ready(med == "ok", "" if med == "ok" else f"guest side: {med}")
        else:
            self.set_signal("mediationReady", False, "no mediation channel configured")
        errors = [f"{k}: {v}" for k, v in info.items() if v.startswith("error") and k != "mediation"]
        if any(k == "mounts" for k in info if info[k].startswith("error")):
            self.save(state="failed", error="attaching disks failed in the guest: " + info["mounts"])
            self.intent = "setup-failed"
            self.to_agent(FrameType.HALT, 0, b"halt")
            return
        if self.launch.setup and not self.state.setup_done:
            self.setting_up = True
            if not await self.tasks.run_setup(self.launch.setup):
                return
            self.setting_up = False
        boot = round(time.monotonic() - self.boot_t0, 3)
        self.set_signal("execReady", True, f"agent ready after {boot} s")
        self.ever_ready = True
        self.save(state="running", boot_seconds=boot, error="; ".join(errors))
        self.ready.set()
        self.notify_ready(True)
        if self.launch.entrypoint:
            asyncio.ensure_future(self.tasks.run_entrypoint(self.launch.entrypoint))

    def config_payload(self) -> bytes:
        entries = [("h", self.launch.hostname), ("n", self.launch.network), ("s", self.launch.shell)]
        entries += [("e", f"{k}={v}") for k, v in self.launch.env.items()]
        entries += [("m", "\t".join(m)) for m in self.launch.mounts]
        if self.mediation:
            entries.append(("p", str(self.mediation.cfg.port)))
        return encode_entries(entries)

    async def quarantine(self) -> dict[str, Any]:
        if self.state.state != "running":
            return {"ok": False, "error": f"workspace is {self.state.state}; only a running workspace can be "
                                          f"quarantined"}
        if self.launch.network == "user" and not await self.qmp("set_link", {"name": "net0", "up": False}):
            return {"ok": False, "error": "could not take the network link down through QMP"}
        if self.mediation:
            self.mediation.sever("workspace quarantined")
        self.set_signal("mediationReady", False, "quarantined", "workspace quarantined")
        self.save(state="quarantined", error="quarantined: network and mediation severed; halt, stop or kill "
                                              "it before starting again")
        return {"ok": True, "state": "quarantined"}

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
        if self.state.state not in ("running", "starting", "quarantined"):
            return {"ok": False, "error": f"workspace is {self.state.state}; use kill to force it off"}
        self.intent = how
        self.save(state="stopping")
        if self.proc is None or self.proc.returncode is not None:  # between restarts
            await self.exited.wait()
            return {"ok": True, "state": self.state.state}
        if how == "halt":
            sent = self.to_agent(FrameType.HALT, 0, b"halt")
            limit = timeout or HALT_TIMEOUT
        else:
            sent = self.to_agent(FrameType.HALT, 0, b"poweroff")
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
