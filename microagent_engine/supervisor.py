"""The supervisor: one small process per running workspace.

It owns the hypervisor process, appends the serial console to ``serial.log``, speaks to the guest agent over the
virtio-serial socket, multiplexes clients' execs onto that one channel, runs setup (first boot) and the
entrypoint, applies the restart policy, bridges mediation, and records every state transition durably in
``state.json`` -- so ``ps``/``status`` stay true after a crash or a ``kill -9`` of the VM.

Run as ``python -m microagent_engine.supervisor WORKSPACE_DIR --ready-fd N`` (the engine does this).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import MicroagentError
from .fsutil import read_json
from .mediation import MediationBridge, MediationConfig, probe
from .protocol import ExitStatus, FrameDecoder, FrameType, decode_kv, encode_entries, encode_exec, encode_frame
from .records import WorkspaceDir, WorkspaceState, now_iso, process_start_time, signal as readiness
from .sandbox import ConfinedVM, spawn_vm

HALT_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
KVM_FAILURE_MARKERS = ("KVM internal error", "emulation failure", "kvm run failed")
RESTART_DELAYS = (1, 2, 4, 8, 16, 30)  # bounded back-off between restarts, seconds
MAX_CONSECUTIVE_RESTARTS = 10
STABLE_AFTER = 30.0  # a VM that ran this long resets the back-off
SETUP_TIMEOUT = 3600.0


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's stream server logs a connection task cancelled at loop teardown as an error; it is not."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def tail_text(path: Path, lines: int = 15) -> str:
    try:
        data = path.read_bytes()[-8192:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class Client:
    """One connection to the control socket."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.streams: dict[int, int] = {}  # client stream id -> guest stream id
        self.console = False

    def send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(ftype, stream, payload))


class InternalExec:
    """A command the supervisor itself runs in the guest (setup, entrypoint)."""

    def __init__(self, on_output: Callable[[bytes], None]) -> None:
        self.on_output = on_output
        self.done: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()


class Supervisor:
    def __init__(self, ws: WorkspaceDir, launch: dict[str, Any], ready_fd: int | None) -> None:
        self.ws = ws
        self.launch = launch
        self.ready_fd = ready_fd
        self.state = ws.load_state()
        self.proc: ConfinedVM | None = None
        self.agent_writer: asyncio.StreamWriter | None = None
        self.serial_writer: asyncio.StreamWriter | None = None
        self.clients: set[Client] = set()
        self.routes: dict[int, tuple[Client, int]] = {}  # guest stream -> (client, client stream)
        self.internal: dict[int, InternalExec] = {}
        self.next_stream = 1
        self.control_tasks: set[asyncio.Future[None]] = set()
        self.intent: str | None = None  # halt | stop | kill | restart | setup-failed
        self.exited = asyncio.Event()  # the supervisor is done (final state recorded)
        self.vm_exited = asyncio.Event()  # the current VM process has exited
        self.ready = asyncio.Event()
        self.ever_ready = False
        self.boot_t0 = time.monotonic()
        self.serial_log = open(ws.serial_log, "ab", buffering=0)
        self.restart_policy = launch.get("restart", "never")
        med = launch.get("mediation")
        self.mediation = MediationBridge(MediationConfig.from_json(med), self.report_mediation) if med else None

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
        # the VM's chardevs are socket pairs made per boot by sandbox.spawn_vm; only clients connect here
        servers = [await asyncio.start_unix_server(self.on_client, path=str(self.ws.control_socket))]
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
        if self.control_tasks:  # let halt/stop/kill requests answer before the connections close
            await asyncio.wait(self.control_tasks, timeout=5)
        return await self._close(servers, sockets)

    def _sockets(self) -> list[Path]:
        return [self.ws.agent_socket, self.ws.serial_socket, self.ws.qmp_socket, self.ws.control_socket,
                self.ws.mediation_socket]

    async def _close(self, servers: list[asyncio.Server], sockets: list[Path]) -> int:
        for server in servers:
            server.close()
        for client in list(self.clients):
            client.writer.close()
        # let each connection's task see its EOF and end, rather than be cancelled by asyncio.run's teardown
        for _ in range(100):
            if not self.clients:
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
        self.serial_note(f"boot at {now_iso()} (accel {self.launch['accel']})")
        vm_log = open(self.ws.vm_log, "ab")
        vm_log.write(f"--- {now_iso()} {' '.join(self.launch['argv'])}\n".encode())
        vm_log.flush()
        try:
            self.proc = await spawn_vm(self.ws, self.launch, self.state.backend, {
                "agent": self.on_agent, "ser0": self.on_serial,
                "mediation": self.mediation.on_port if self.mediation else None}, stdout=vm_log)
        except (OSError, MicroagentError) as exc:
            self.save(state="failed", error=f"could not start the hypervisor: {exc}")
            self.notify_ready(False, self.state.error)
            return 0.0
        self.save(state="starting", vm_pid=self.proc.pid, vm_start_time=process_start_time(self.proc.pid),
                  started_at=now_iso(), stopped_at=None, boot_seconds=None, confinement=self.proc.confinement)
        watchers = [asyncio.create_task(self.watch_stderr(vm_log)), asyncio.create_task(self.boot_deadline())]
        rc = await self.proc.wait()
        await asyncio.sleep(0)  # let the stderr watcher record a last line
        for task in watchers:
            task.cancel()
        vm_log.close()
        self.vm_exited.set()
        self.state.exit_detail = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
        for client, csid in list(self.routes.values()):
            client.send(FrameType.ERROR, csid,
                        f"the VM exited ({self.state.exit_detail}) before the command finished".encode())
        self.routes.clear()
        for job in self.internal.values():
            if not job.done.done():
                job.done.set_result(ExitStatus("failed_to_start", 127, "the VM exited"))
        self.internal.clear()
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
        timeout = float(self.launch.get("boot_timeout", 60))
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
        for client in self.clients:
            if client.console:
                client.send(FrameType.STDOUT, 0, data)

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
        elif stream in self.internal:
            job = self.internal[stream]
            if ftype in (FrameType.STDOUT, FrameType.STDERR):
                job.on_output(payload)
            elif ftype == FrameType.EXIT:
                del self.internal[stream]
                job.done.set_result(ExitStatus.parse(payload))
            elif ftype == FrameType.ERROR:
                job.on_output(b"microagent: " + payload + b"\n")
        elif stream in self.routes:
            client, csid = self.routes[stream]
            client.send(ftype, csid, payload)
            if ftype in (FrameType.EXIT, FrameType.PONG):
                del self.routes[stream]
                client.streams.pop(csid, None)

    async def on_ready(self, info: dict[str, str]) -> None:
        shell = self.launch.get("shell", "/bin/sh")
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
        if self.launch.get("setup") and not self.state.setup_done:
            self.setting_up = True
            if not await self.run_setup(self.launch["setup"]):
                return
            self.setting_up = False
        boot = round(time.monotonic() - self.boot_t0, 3)
        self.set_signal("execReady", True, f"agent ready after {boot} s")
        self.ever_ready = True
        self.save(state="running", boot_seconds=boot, error="; ".join(errors))
        self.ready.set()
        self.notify_ready(True)
        if self.launch.get("entrypoint"):
            asyncio.ensure_future(self.run_entrypoint(self.launch["entrypoint"]))

    def internal_exec(self, argv: list[str], on_output: Callable[[bytes], None],
                      timeout: float | None = None) -> InternalExec:
        gsid = self.next_stream
        self.next_stream += 1
        job = InternalExec(on_output)
        self.internal[gsid] = job
        self.to_agent(FrameType.EXEC, gsid, encode_exec(argv, self.launch.get("env"), "/", timeout))
        return job

    async def run_setup(self, commands: list[str]) -> bool:
        log_path = self.ws.path / "setup.log"
        with open(log_path, "ab") as log:
            def out(data: bytes) -> None:
                log.write(data)
                log.flush()
                self.to_console(data)

            for i, command in enumerate(commands, 1):
                header = f"--- microagent: setup {i}/{len(commands)}: {command}\n".encode()
                out(header)
                st = await self.internal_exec(["/bin/sh", "-c", command], out, SETUP_TIMEOUT).done
                out(f"--- microagent: setup {i} ended: {st.status} {st.code}\n".encode())
                if st.status != "exited" or st.code != 0:
                    error = (f"setup command {i} ({command!r}) failed ({st.status} {st.code}); its output is "
                             f"in {log_path} and the serial log. Fix it, then delete and recreate the workspace")
                    self.save(state="failed", error=error)
                    self.intent = "setup-failed"
                    self.to_agent(FrameType.HALT, 0, b"halt")
                    return False
        self.save(setup_done=True)
        return True

    async def run_entrypoint(self, command: str) -> None:
        self.save(entrypoint="running")
        st = await self.internal_exec(["/bin/sh", "-c", command], self.to_console).done
        if self.vm_exited.is_set() or self.intent is not None:
            return
        self.save(entrypoint=f"{st.status} {st.code}")
        self.serial_note(f"entrypoint ended: {st.status} {st.code}")
        if self.wants_restart(st) and self.state.state == "running":
            self.intent = "restart"
            self.to_agent(FrameType.HALT, 0, b"poweroff")
            try:
                await asyncio.wait_for(self.vm_exited.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                if self.proc and self.proc.returncode is None:
                    self.proc.kill()

    def config_payload(self) -> bytes:
        entries = [("h", self.launch["hostname"]), ("n", self.launch["network"]), ("s", self.launch["shell"])]
        entries += [("e", f"{k}={v}") for k, v in self.launch.get("env", {}).items()]
        entries += [("m", "\t".join(m)) for m in self.launch.get("mounts", [])]
        if self.mediation:
            entries.append(("p", str(self.mediation.cfg.port)))
        return encode_entries(entries)

    # ---- clients -------------------------------------------------------------------------------
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
                self.to_agent(FrameType.SIGNAL, gsid, str(int(signal.SIGHUP)).encode())
            writer.close()

    def exec_allowed(self) -> bool:
        return self.ready.is_set() and self.state.state in ("running", "quarantined") and \
            self.agent_writer is not None

    async def on_client_frame(self, client: Client, ftype: int, stream: int, payload: bytes) -> None:
        if ftype == FrameType.CONTROL:
            request = json.loads(payload or b"{}")
            task = asyncio.ensure_future(self.control(client, stream, request))
            self.control_tasks.add(task)
            task.add_done_callback(self.control_tasks.discard)
        elif ftype in (FrameType.EXEC, FrameType.PING):
            if not self.exec_allowed():
                client.send(FrameType.ERROR, stream, f"workspace is {self.state.state}, not ready for exec".encode())
                return
            gsid = self.next_stream
            self.next_stream += 1
            client.streams[stream] = gsid
            self.routes[gsid] = (client, stream)
            self.to_agent(ftype, gsid, payload)
        elif ftype == FrameType.STDIN and stream == 0 and client.console:
            if self.serial_writer is not None:
                self.serial_writer.write(payload)
        elif ftype in (FrameType.STDIN, FrameType.SIGNAL) and stream in client.streams:
            self.to_agent(ftype, client.streams[stream], payload)

    async def control(self, client: Client, stream: int, request: dict[str, Any]) -> None:
        op = request.get("op")
        try:
            if op in ("halt", "stop", "kill"):
                reply = await self.end_vm(op, float(request.get("timeout") or 0) or None)
            elif op == "quarantine":
                reply = await self.quarantine()
            elif op == "console":
                client.console = True
                reply = {"ok": True}
            elif op == "state":
                reply = {"ok": True, "state": self.state.to_json()}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # report, never crash the supervisor
            traceback.print_exc()
            reply = {"ok": False, "error": str(exc)}
        client.send(FrameType.REPLY, stream, json.dumps(reply).encode())

    async def quarantine(self) -> dict[str, Any]:
        if self.state.state != "running":
            return {"ok": False, "error": f"workspace is {self.state.state}; only a running workspace can be "
                                          f"quarantined"}
        if self.launch["network"] == "user" and not await self.qmp("set_link", {"name": "net0", "up": False}):
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
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.ws.qmp_socket))
            await reader.readline()
            ok = True
            for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                msg: dict[str, Any] = {"execute": cmd, **({"arguments": args} if args else {})}
                writer.write(json.dumps(msg).encode() + b"\n")
                await writer.drain()
                while True:  # skip asynchronous events until the command's answer
                    answer = json.loads(await reader.readline() or b"{}")
                    if "event" not in answer:
                        break
                ok = ok and "return" in answer
            writer.close()
            return ok
        except (OSError, ValueError):
            return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="microagent-supervisor")
    parser.add_argument("workspace_dir")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--foreground", action="store_true", help="do not detach (for debugging)")
    args = parser.parse_args(argv)
    ws = WorkspaceDir(Path(args.workspace_dir))
    if not args.foreground:
        if os.fork() > 0:  # the engine waits for this parent; the child lives on, reparented to init
            os._exit(0)
    lock_fd = os.open(ws.supervisor_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b'{"ok": false, "error": "another supervisor is already running"}\n')
        return 1
    launch = read_json(ws.run_dir / "launch.json")
    sup = Supervisor(ws, launch, args.ready_fd)
    try:
        return asyncio.run(sup.run())
    except Exception:
        traceback.print_exc()
        error = "the supervisor crashed; see supervisor.log"
        state: WorkspaceState = ws.load_state()
        state.state, state.error, state.supervisor_pid = "failed", error, None
        ws.save_state(state)
        sup.notify_ready(False, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
