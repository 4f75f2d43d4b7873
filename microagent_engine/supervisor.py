"""The supervisor: one small process per running workspace.

It owns the hypervisor process, appends the serial console to ``serial.log``, speaks to the guest agent over the
virtio-serial socket, multiplexes clients' execs onto that one channel, records every state transition durably
in ``state.json`` and reacts to the VM's exit, so ``ps``/``status`` stay true after a crash or a ``kill -9``.

Run as ``python -m microagent_engine.supervisor WORKSPACE_DIR --ready-fd N`` (the engine does this).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .fsutil import read_json
from .protocol import (
    ExitStatus,
    FrameDecoder,
    FrameType,
    decode_kv,
    encode_entries,
    encode_frame,
)
from .records import WorkspaceDir, WorkspaceState, now_iso, process_start_time, signal as readiness

HALT_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
KVM_FAILURE_MARKERS = ("KVM internal error", "emulation failure", "kvm run failed")


def _set_pdeathsig() -> None:
    """In the hypervisor child: die with the supervisor, so no VM outlives the process that records it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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


class Supervisor:
    def __init__(self, ws: WorkspaceDir, launch: dict[str, Any], ready_fd: int | None) -> None:
        self.ws = ws
        self.launch = launch
        self.ready_fd = ready_fd
        self.state = ws.load_state()
        self.proc: asyncio.subprocess.Process | None = None
        self.agent_writer: asyncio.StreamWriter | None = None
        self.serial_writer: asyncio.StreamWriter | None = None
        self.clients: set[Client] = set()
        self.routes: dict[int, tuple[Client, int]] = {}  # guest stream -> (client, client stream)
        self.next_stream = 1
        self.control_tasks: set[asyncio.Future[None]] = set()
        self.intent: str | None = None  # halt | stop | kill, set when the host asked the VM to end
        self.exited = asyncio.Event()
        self.ready = asyncio.Event()
        self.t0 = time.monotonic()
        self.serial_log = open(ws.serial_log, "ab", buffering=0)

    # ---- state ---------------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.ws.save_state(self.state)

    def set_signal(self, name: str, ready: bool, detail: str = "", error: str = "") -> None:
        self.state.readiness[name] = readiness(ready, detail, error)

    def notify_ready(self, ok: bool, error: str = "") -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, (json.dumps({"ok": ok, "error": error}) + "\n").encode())
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = None

    # ---- main ----------------------------------------------------------------------------------
    async def run(self) -> int:
        run_dir = self.ws.run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sock in (self.ws.agent_socket, self.ws.serial_socket, self.ws.qmp_socket, self.ws.control_socket):
            sock.unlink(missing_ok=True)
        servers = [
            await asyncio.start_unix_server(self.on_agent, path=str(self.ws.agent_socket)),
            await asyncio.start_unix_server(self.on_serial, path=str(self.ws.serial_socket)),
            await asyncio.start_unix_server(self.on_client, path=str(self.ws.control_socket)),
        ]
        os.chmod(self.ws.control_socket, 0o600)
        self.serial_log.write(f"\n--- microagent: boot at {now_iso()} (accel {self.launch['accel']}) ---\n".encode())
        vm_log = open(self.ws.vm_log, "ab")
        vm_log.write(f"--- {now_iso()} {' '.join(self.launch['argv'])}\n".encode())
        vm_log.flush()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.launch["argv"], stdin=asyncio.subprocess.DEVNULL, stdout=vm_log,
                stderr=asyncio.subprocess.PIPE, preexec_fn=_set_pdeathsig)
        except OSError as exc:
            error = f"could not start the hypervisor: {exc}"
            self.save(state="failed", error=error, supervisor_pid=None)
            self.notify_ready(False, error)
            return 1
        self.save(state="starting", supervisor_pid=os.getpid(), vm_pid=self.proc.pid,
                  vm_start_time=process_start_time(self.proc.pid), started_at=now_iso(), stopped_at=None,
                  error="", exit_detail="", boot_seconds=None)
        watchers = [asyncio.create_task(self.watch_stderr(vm_log)), asyncio.create_task(self.boot_deadline())]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.end_vm("kill")))
        rc = await self.proc.wait()
        await asyncio.sleep(0)  # let the stderr watcher record a last line
        self.finalize(rc)
        self.exited.set()
        for task in watchers:
            task.cancel()
        if self.control_tasks:  # let halt/stop/kill requests answer before the connections close
            await asyncio.wait(self.control_tasks, timeout=5)
        for server in servers:
            server.close()
        for client in list(self.clients):
            with contextlib.suppress(ConnectionError):
                await client.writer.drain()
            client.writer.close()
        for sock in (self.ws.agent_socket, self.ws.serial_socket, self.ws.qmp_socket, self.ws.control_socket):
            sock.unlink(missing_ok=True)
        return 0

    def finalize(self, rc: int) -> None:
        how = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
        for name in self.state.readiness:
            self.set_signal(name, False, "VM not running")
        for gsid, (client, csid) in list(self.routes.items()):
            client.send(FrameType.ERROR, csid, f"the VM exited ({how}) before the command finished".encode())
        self.routes.clear()
        if self.intent == "kill":
            final, error = "stopped", ""
        elif self.intent == "halt" and self.state.state == "stopping":
            final, error = "halted", ""
        elif self.intent == "stop" and self.state.state == "stopping":
            final, error = "stopped", ""
        elif self.state.state == "failed":
            final, error = "failed", self.state.error
        elif not self.ready.is_set():
            final = "failed"
            error = self.state.error or f"the VM exited during boot ({how}). Last console lines:\n" + tail_text(self.ws.serial_log)
        else:
            final, error = "failed", f"the VM exited unexpectedly ({how})"
        self.save(state=final, error=error, exit_detail=how, vm_pid=None, vm_start_time=None,
                  supervisor_pid=None, stopped_at=now_iso())
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
            if self.proc and self.proc.returncode is None:
                self.save(state="failed", error=f"the guest agent did not become ready within {timeout:.0f} s. "
                          f"Last console lines:\n{tail_text(self.ws.serial_log)}")
                self.proc.kill()

    # ---- serial console ------------------------------------------------------------------------
    async def on_serial(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.serial_writer = writer
        while data := await reader.read(65536):
            self.serial_log.write(data)
            for client in self.clients:
                if client.console:
                    client.send(FrameType.STDOUT, 0, data)

    # ---- guest agent ---------------------------------------------------------------------------
    async def on_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.agent_writer is not None:
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
            info = decode_kv(payload)
            boot = round(time.monotonic() - self.t0, 3)
            self.set_signal("execReady", True, f"agent ready after {boot} s")
            shell = self.launch.get("shell", "/bin/sh")
            if info.get("shell") == "ok":
                self.set_signal("shellReady", True, f"{shell} on the serial console")
            else:
                self.set_signal("shellReady", False, error=f"shell {shell} not found in the guest")
            self.set_signal("mediationReady", False, "no mediation channel configured")
            errors = [f"{k}: {v}" for k, v in info.items() if v.startswith("error")]
            self.save(state="running", boot_seconds=boot, error="; ".join(errors))
            self.ready.set()
            self.notify_ready(True)
        elif ftype == FrameType.HALTING:
            pass
        elif stream in self.routes:
            client, csid = self.routes[stream]
            client.send(ftype, csid, payload)
            if ftype == FrameType.EXIT:
                del self.routes[stream]
                client.streams.pop(csid, None)

    def config_payload(self) -> bytes:
        entries = [("h", self.launch["hostname"]), ("n", self.launch["network"]), ("s", self.launch["shell"])]
        entries += [("e", f"{k}={v}") for k, v in self.launch.get("env", {}).items()]
        entries += [("m", "\t".join(m)) for m in self.launch.get("mounts", [])]
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
        except Exception as exc:
            client.send(FrameType.ERROR, 0, f"supervisor error: {exc}".encode())
        finally:
            self.clients.discard(client)
            for csid, gsid in client.streams.items():  # the client went away: hang up its commands
                self.routes.pop(gsid, None)
                self.to_agent(FrameType.SIGNAL, gsid, str(int(signal.SIGHUP)).encode())
            writer.close()

    async def on_client_frame(self, client: Client, ftype: int, stream: int, payload: bytes) -> None:
        if ftype == FrameType.CONTROL:
            request = json.loads(payload or b"{}")
            task = asyncio.ensure_future(self.control(client, stream, request))
            self.control_tasks.add(task)
            task.add_done_callback(self.control_tasks.discard)
        elif ftype == FrameType.EXEC:
            if not self.ready.is_set() or self.state.state != "running" or self.agent_writer is None:
                client.send(FrameType.ERROR, stream, f"workspace is {self.state.state}, not ready for exec".encode())
                client.send(FrameType.EXIT, stream, b"failed_to_start 127 workspace not running")
                return
            gsid = self.next_stream
            self.next_stream += 1
            client.streams[stream] = gsid
            self.routes[gsid] = (client, stream)
            self.to_agent(ftype, gsid, payload)
        elif ftype in (FrameType.STDIN, FrameType.SIGNAL) and stream == 0 and client.console:
            if ftype == FrameType.STDIN and self.serial_writer is not None:
                self.serial_writer.write(payload)
        elif ftype in (FrameType.STDIN, FrameType.SIGNAL) and stream in client.streams:
            self.to_agent(ftype, client.streams[stream], payload)
        elif ftype == FrameType.PING:
            gsid = self.next_stream
            self.next_stream += 1
            self.routes[gsid] = (client, stream)
            if not self.to_agent(ftype, gsid, payload):
                client.send(FrameType.ERROR, stream, b"agent not connected")

    async def control(self, client: Client, stream: int, request: dict[str, Any]) -> None:
        op = request.get("op")
        try:
            if op in ("halt", "stop", "kill"):
                reply = await self.end_vm(op, float(request.get("timeout") or 0) or None)
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

    async def end_vm(self, how: str, timeout: float | None = None) -> dict[str, Any]:
        """halt (graceful, via the agent), stop (ask once, wait 5 s, no escalation) or kill (hard)."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return {"ok": True, "state": self.state.state}
        if how == "kill":
            self.intent = "kill"
            self.proc.kill()
            await self.exited.wait()
            return {"ok": True, "state": self.state.state}
        if self.state.state not in ("running", "starting"):
            return {"ok": False, "error": f"workspace is {self.state.state}; use kill to force it off"}
        self.intent = how
        self.save(state="stopping")
        if how == "halt":
            sent = self.to_agent(FrameType.HALT, 0, b"halt")
            limit = timeout or HALT_TIMEOUT
        else:
            sent = self.to_agent(FrameType.HALT, 0, b"poweroff") or await self.qmp("system_powerdown")
            limit = timeout or STOP_TIMEOUT
        if not sent:
            await self.qmp("system_powerdown")
        try:
            await asyncio.wait_for(self.exited.wait(), limit)
        except asyncio.TimeoutError:
            verb = "halt" if how == "halt" else "stop"
            error = (f"{verb}: the guest did not shut down within {limit:.0f} s; it is still running. "
                     f"Run 'microagent kill {self.ws.name}' to force it off")
            self.save(state="failed", error=error)
            return {"ok": False, "error": error, "state": "failed"}
        return {"ok": True, "state": self.state.state}

    async def qmp(self, command: str) -> bool:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.ws.qmp_socket))
            await reader.readline()
            for cmd in ("qmp_capabilities", command):
                writer.write(json.dumps({"execute": cmd}).encode() + b"\n")
                await writer.drain()
                await reader.readline()
            writer.close()
            return True
        except OSError:
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
