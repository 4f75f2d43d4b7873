"""The engine's typed Python API: workspace lifecycle over records, a supervisor and a backend."""

from __future__ import annotations

import json
import builtins
import functools
import hashlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from .backends import get_backend
from .backends.base import DiskSpec, VMSpec
from .client import ExecResult, OutputCallback, SupervisorConnection
from .config import RESTART_POLICIES, default_state_dir, get_profile, hostname_for, validate_name
from .errors import AlreadyExists, Busy, GuestError, HostError, InvalidArgument, InvalidState, NotFound
from .fsutil import file_lock, write_json_atomic
from .guest.initramfs import build_initramfs
from .guest.kernel import Kernel, resolve_kernel
from .hostinfo import choose_accel
from .images.builtin import BUILTIN_REF, builtin_image, is_builtin
from .protocol import FrameType
from .records import (
    ACTIVE,
    STARTABLE,
    WorkspaceConfig,
    WorkspaceDir,
    WorkspaceState,
    now_iso,
    process_matches,
)
from .storage import debugfs
from .storage.attachments import (
    parse_bundle_flag,
    parse_disk_flag,
    parse_volume_flag,
    validate_attachments,
)
from .storage.bundles import build_bundle
from .storage.ext4 import clone_sized
from .storage.volumes import VolumeRegistry
from .transfer import TransferMixin, parse_outputs

if TYPE_CHECKING:
    from .images.store import ImageInfo, ImageStore

Progress = Callable[[str], None]
NETWORK_MODES = {"user": "user", "isolated": "none", "none": "none"}


def parse_mediation(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """The mediation contract from a spec mapping or the CLI's ``PORT=HOST:PORT`` (enabled, required, failClosed)."""
    if value is None:
        return None
    if isinstance(value, str):
        port, sep, target = value.partition("=")
        if not sep:
            raise InvalidArgument(f"--mediation {value!r}: use GUEST_PORT=HOST:PORT, e.g. 2048=127.0.0.1:9900")
        value = {"enabled": True, "required": True, "failClosed": True, "port": port, "target": target}
    if not value.get("enabled", True):
        return None
    try:
        guest_port = int(value["port"])
        host, _, tport = str(value["target"]).rpartition(":")
        if not (0 < guest_port < 65536 and host and 0 < int(tport) < 65536):
            raise ValueError
    except (KeyError, ValueError):
        raise InvalidArgument(f"mediation needs a guest port (1-65535) and a target HOST:PORT, got {value!r}") from None
    return {"enabled": True, "required": bool(value.get("required", False)), "port": guest_port,
            "target": f"{host}:{int(tport)}", "failClosed": bool(value.get("failClosed", False))}


@dataclass
class WorkspaceInfo:
    """A workspace's config and state, as ``status``/``list`` report them."""

    config: WorkspaceConfig
    state: WorkspaceState
    dir: WorkspaceDir

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        return self.state.state in ACTIVE

    def to_json(self) -> dict[str, Any]:
        c, s = self.config, self.state
        out: dict[str, Any] = {
            "name": c.name, "state": s.state, "backend": s.backend or "qemu", "accel": s.accel or None,
            "accelReason": s.accel_reason or None, "image": c.image, "profile": c.profile,
            "resources": {"memoryMiB": c.memory_mib, "cpuCount": c.cpus, "sizeMiB": c.size_mib},
            "network": "isolated" if c.network == "none" else c.network, "restart": c.restart,
            "restartCount": s.restart_count, "hostname": c.hostname, "env": c.env,
            "rootfs": str(self.dir.rootfs), "serialLog": str(self.dir.serial_log),
            "createdAt": c.created_at, "startedAt": s.started_at, "stoppedAt": s.stopped_at,
            "updatedAt": s.updated_at, "bootSeconds": s.boot_seconds, "vmPid": s.vm_pid,
            "supervisorPid": s.supervisor_pid, "kernelRelease": s.kernel_release or None,
            "error": s.error or None, "exitDetail": s.exit_detail or None,
            "setup": c.setup, "setupDone": s.setup_done, "entrypoint": c.entrypoint,
            "entrypointStatus": s.entrypoint or None, "mediation": c.mediation, "shell": c.shell,
            "quarantined": s.state == "quarantined", "attachments": c.attachments, "outputs": c.outputs,
            "volumes": [a["source"] for a in c.attachments if a["kind"] == "volume"],
            "confinement": s.confinement or None,
        }
        out.update(s.readiness)
        return out


class Engine(TransferMixin):
    """Entry point of the Python API. All state lives under ``state_dir`` (default ``~/.microagent``)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> None:
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        self.progress: Progress = progress or (lambda _msg: None)
        self.backend = get_backend("qemu")
        self.volumes = VolumeRegistry(self.state_dir, self._holder_running)

    @functools.cached_property
    def images(self) -> "ImageStore":
        """The OCI image cache (imported on first use: the registry client is not needed by most commands)."""
        from .images.store import ImageStore

        return ImageStore(self.state_dir, progress=self.progress)

    def _holder_running(self, name: str) -> bool:
        """Does workspace ``name`` hold its disks right now (running, or in the middle of starting)?"""
        try:
            ws = self._dir(name)
        except InvalidArgument:
            return False
        if not ws.exists():
            return False
        if ws.supervisor_alive():
            return True
        try:
            with file_lock(ws.ops_lock, blocking=False):
                return False
        except Busy:
            return True  # a start (or delete) holds the workspace's lock: treat its volumes as held

    # ---- records -------------------------------------------------------------------------------
    @property
    def workspaces_dir(self) -> Path:
        return self.state_dir / "workspaces"

    def _dir(self, name: str) -> WorkspaceDir:
        return WorkspaceDir(self.workspaces_dir / validate_name(name))

    def _existing(self, name: str) -> WorkspaceDir:
        ws = self._dir(name)
        if not ws.exists():
            raise NotFound(f"no workspace named {name!r}; see 'microagent list' for the saved ones")
        return ws

    def _info(self, ws: WorkspaceDir) -> WorkspaceInfo:
        cfg = ws.load_config()
        st = ws.load_state()
        if st.state in ACTIVE and not ws.supervisor_alive():
            # the supervisor died without recording the end (killed, host crash): the record must not lie
            vm_alive = process_matches(st.vm_pid, st.vm_start_time)
            st.state = "failed"
            st.error = st.error or ("the workspace supervisor exited unexpectedly" +
                                    ("; the VM process is still running: run kill" if vm_alive else ""))
            if not vm_alive:
                st.vm_pid = st.vm_start_time = st.supervisor_pid = None
            for sig in st.readiness.values():
                sig["ready"] = False
            ws.save_state(st)
        return WorkspaceInfo(cfg, st, ws)

    def _vm_alive(self, info: WorkspaceInfo) -> bool:
        return info.dir.supervisor_alive() or process_matches(info.state.vm_pid, info.state.vm_start_time)

    # ---- queries -------------------------------------------------------------------------------
    def status(self, name: str) -> WorkspaceInfo:
        return self._info(self._existing(name))

    def list(self) -> builtins.list[WorkspaceInfo]:
        if not self.workspaces_dir.is_dir():
            return []
        out = []
        for path in sorted(self.workspaces_dir.iterdir()):
            ws = WorkspaceDir(path)
            if not path.name.startswith(".") and ws.exists():
                out.append(self._info(ws))
        return out

    def ps(self) -> builtins.list[WorkspaceInfo]:
        return [info for info in self.list() if info.running or self._vm_alive(info)]

    # ---- create / delete -----------------------------------------------------------------------
    def create(
        self,
        name: str | None = None,
        *,
        image: str | None = None,
        profile: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        size_mib: int | None = None,
        env: dict[str, str] | None = None,
        hostname: str | None = None,
        network: str = "user",
        accel: str | None = None,
        kernel: str | None = None,
        restart: str = "never",
        shell: str | None = None,
        setup: builtins.list[str] | None = None,
        entrypoint: str | None = None,
        mediation: dict[str, Any] | str | None = None,
        volumes: builtins.list[str] | None = None,
        disks: builtins.list[str] | None = None,
        bundles: builtins.list[str] | None = None,
        outputs: builtins.list[str] | None = None,
        files: builtins.list[dict[str, Any]] | None = None,
    ) -> WorkspaceInfo:
        """Record a new workspace and build its rootfs (state ``prepared``). Nothing is left on failure.

        ``volumes`` are ``-v SRC:DST[:ro|rw]`` strings (named volume, .tar bundle or .ext4 disk), ``disks`` and
        ``bundles`` ``NAME=PATH:MOUNT[:ro|rw]``, ``outputs`` ``NAME=/guest/path``, ``files`` dicts with
        ``src`` (host), ``dst`` (guest) and optional ``mode``; all are validated before anything is written."""
        name = validate_name(f"ws-{secrets.token_hex(4)}" if name is None else name)
        prof = get_profile(profile)
        for label, value in (("--memory", memory_mib), ("--cpus", cpus), ("--size-mib", size_mib)):
            if value is not None and value <= 0:
                raise InvalidArgument(f"{label} must be a positive number, got {value}")
        if network not in NETWORK_MODES:
            raise InvalidArgument(f"unknown network mode {network!r}; use 'user' or 'isolated'")
        if restart not in RESTART_POLICIES:
            raise InvalidArgument(f"unknown restart policy {restart!r}; use one of {', '.join(RESTART_POLICIES)}")
        if accel:
            choose_accel(accel)  # validates the value (and KVM availability) up front
        if hostname is not None:
            hostname_ok = hostname and len(hostname) <= 63 and hostname == hostname_for(hostname)
            if not hostname_ok:
                raise InvalidArgument(f"invalid hostname {hostname!r}: use lowercase letters, digits and '-'")
        env = dict(env or {})
        for key in env:
            if not key or "=" in key or "\0" in key:
                raise InvalidArgument(f"invalid environment variable name {key!r}")
        ws = self._dir(name)
        if ws.path.exists():
            raise AlreadyExists(f"workspace {name!r} already exists; pick another name or delete it first "
                                f"('microagent delete {name} --yes')")
        cfg = WorkspaceConfig(
            name=name, image=BUILTIN_REF if is_builtin(image) else str(image), profile=prof.name,
            memory_mib=memory_mib or prof.memory_mib, cpus=cpus or prof.cpus, size_mib=size_mib or prof.disk_mib,
            env=env, hostname=hostname or hostname_for(name), network=NETWORK_MODES[network],
            accel=accel or "auto", kernel=str(Path(kernel).resolve()) if kernel else None, restart=restart,
            shell=shell or "/bin/sh", setup=list(setup or []), entrypoint=entrypoint or None,
            mediation=parse_mediation(mediation))
        if not cfg.shell.startswith("/"):
            raise InvalidArgument(f"shell must be an absolute guest path, got {cfg.shell!r}")
        attachments = validate_attachments(
            [parse_volume_flag(v) for v in volumes or []] + [parse_disk_flag(d) for d in disks or []]
            + [parse_bundle_flag(b) for b in bundles or []])
        cfg.attachments = [a.to_json() for a in attachments]
        cfg.outputs = parse_outputs(outputs or [])
        file_list = [self._check_file(f) for f in files or []]
        for att in attachments:
            if att.kind == "volume":
                try:
                    self.volumes.get(att.source)
                except NotFound:
                    raise NotFound(f"no volume named {att.source!r}; create it first: microagent volume create "
                                   f"{att.source}") from None
        self.resolve_kernel(cfg)  # installs the default kernel on first need, as the seeds' create does
        if is_builtin(image):
            base = builtin_image(self.state_dir)
        else:
            img = self.images.ensure(str(image))
            base = img.path
            cfg.image_id = img.id
            cfg.env = {**img.env, **cfg.env}  # the image's Env, overridden by the user's
            cfg.workdir = img.config.get("WorkingDir") or "/"
            cfg.size_mib = max(cfg.size_mib, img.size_mib)
        self.workspaces_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_leftovers()
        staging = WorkspaceDir(self.workspaces_dir / f".creating-{name}-{secrets.token_hex(4)}")
        staging.path.mkdir()
        try:
            self.progress(f"Building rootfs ({cfg.size_mib} MiB) from {cfg.image}")
            clone_sized(base, staging.rootfs, cfg.size_mib)
            for src, dst, mode in file_list:
                debugfs.copy_in(staging.rootfs, src, dst, mode=mode)
            if shell and not debugfs.exists(staging.rootfs, shell):
                raise InvalidArgument(f"shell {shell} does not exist in image {cfg.image}; pick a shell the "
                                      f"image has (e.g. /bin/sh or /bin/bash)")
            staging.save_config(cfg)
            staging.save_state(WorkspaceState(state="prepared"))
            try:
                os.rename(staging.path, ws.path)
            except OSError:
                raise AlreadyExists(f"workspace {name!r} already exists; pick another name") from None
        finally:
            if staging.path.exists():
                shutil.rmtree(staging.path, ignore_errors=True)
        return self._info(ws)

    def _sweep_leftovers(self, stale_after: float = 3600.0) -> None:
        """Remove what a killed create or delete left behind: a ``.deleting-*`` directory (the delete had
        committed by renaming) and a ``.creating-*`` one older than ``stale_after`` seconds."""
        now = time.time()
        for path in self.workspaces_dir.glob(".*-*"):
            try:
                stale = path.name.startswith(".deleting-") or (
                    path.name.startswith(".creating-") and now - path.stat().st_mtime > stale_after)
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _check_file(entry: dict[str, Any]) -> tuple[Path, str, int | None]:
        src = Path(str(entry.get("src", ""))).expanduser()
        if not src.is_file():
            raise NotFound(f"file {src} does not exist (or is not a regular file); fix files[].src")
        dst = debugfs.normalize_guest_path(str(entry.get("dst", "")))
        mode = entry.get("mode")
        if isinstance(mode, str):
            mode = int(mode, 8)
        if mode is not None and not 0 <= mode <= 0o7777:
            raise InvalidArgument(f"file mode {oct(mode)} for {dst} is not a valid permission mode")
        return src, dst, mode

    def delete(self, name: str) -> None:
        """Remove the workspace record and its disks. Refuses while its VM runs."""
        ws = self._existing(name)
        with file_lock(ws.ops_lock, blocking=False, what=f"workspace {name!r}"):
            info = self._info(ws)
            if self._vm_alive(info):
                raise InvalidState(f"workspace {name!r} is {info.state.state} and its VM is still running; "
                                   f"halt, stop or kill it first")
            trash = self.workspaces_dir / f".deleting-{name}-{secrets.token_hex(4)}"
            run_dir = ws.run_dir
            os.rename(ws.path, trash)
            self.volumes.release(name)  # the data stays for the next attach
        shutil.rmtree(trash, ignore_errors=True)
        if run_dir.exists() and not str(run_dir).startswith(str(trash)):
            shutil.rmtree(run_dir, ignore_errors=True)

    # ---- start ---------------------------------------------------------------------------------
    def resolve_kernel(self, cfg: WorkspaceConfig) -> Kernel:
        return resolve_kernel(self.state_dir, cfg.kernel, self.progress)

    def start(self, name: str, *, boot_timeout: float | None = None) -> WorkspaceInfo:
        """Boot the workspace's VM and return once its agent is ready (state ``running``)."""
        ws = self._existing(name)
        with file_lock(ws.ops_lock, blocking=False, what=f"workspace {name!r}"):
            info = self._info(ws)
            if info.running:
                raise InvalidState(f"workspace {name!r} is already {info.state.state}")
            if self._vm_alive(info):
                raise InvalidState(f"workspace {name!r} is {info.state.state} but its VM is still running; "
                                   f"run 'microagent kill {name}' first")
            if info.state.state not in STARTABLE:
                raise InvalidState(f"workspace {name!r} is {info.state.state}; halt, stop or kill it before start")
            return self._launch(info, boot_timeout)

    def _launch(self, info: WorkspaceInfo, boot_timeout: float | None) -> WorkspaceInfo:
        cfg, ws = info.config, info.dir
        self.backend.binary()  # fail first, and clearly, when the hypervisor is missing
        accel = choose_accel(None if cfg.accel == "auto" else cfg.accel)
        kernel = self.resolve_kernel(cfg)
        initramfs = build_initramfs(self.state_dir, kernel, self.backend.guest_modules())
        cmdline = " ".join(self.backend.kernel_args(accel) + ["microagent.root=/dev/vda"])
        disks, mounts = self._attach_disks(info)
        spec = VMSpec(kernel=kernel.path, initramfs=initramfs, cmdline=cmdline, memory_mib=cfg.memory_mib,
                      cpus=cfg.cpus, disks=[DiskSpec(ws.rootfs), *disks], agent_socket=ws.agent_socket,
                      serial_socket=ws.serial_socket, control_socket=ws.qmp_socket, network=cfg.network,
                      accel=accel, mediation_socket=ws.mediation_socket if cfg.mediation else None)
        timeout = boot_timeout or (30.0 if accel.accel == "kvm" else 90.0)
        launch = {"argv": self.backend.command(spec), "hostname": cfg.hostname, "network": cfg.network,
                  "shell": cfg.shell, "env": cfg.env, "accel": accel.accel, "boot_timeout": timeout, "mounts": mounts,
                  "setup": cfg.setup, "entrypoint": cfg.entrypoint, "restart": cfg.restart,
                  "mediation": cfg.mediation}
        ws.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(ws.run_dir / "launch.json", launch)
        st = ws.load_state()
        st.accel, st.accel_reason, st.backend, st.error = accel.accel, accel.reason, self.backend.name, ""
        ws.save_state(st)
        rfd, wfd = os.pipe()
        try:
            self._spawn_supervisor(ws, wfd)
            os.close(wfd)
            wfd = -1
            reply = self._read_ready(rfd, timeout + 30)
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        if not reply.get("ok"):
            self._wait_supervisor_exit(ws)
            self.volumes.release(cfg.name)
            error = reply.get("error") or "the supervisor exited without a word; see supervisor.log"
            raise GuestError(f"workspace {cfg.name!r} failed to start: {error}\n"
                             f"(see 'microagent logs {cfg.name}' and {ws.vm_log})")
        return self._info(ws)

    def _attach_disks(self, info: WorkspaceInfo) -> tuple[builtins.list[DiskSpec], builtins.list[builtins.list[str]]]:
        """Claim named volumes (single-attach), check raw disks, build bundles; the guest mounts each by the
        disk's serial. On any failure the volumes claimed so far are released."""
        disks: builtins.list[DiskSpec] = []
        mounts: builtins.list[builtins.list[str]] = []
        name = info.config.name
        try:
            for i, att in enumerate(self._attachments(info.config), 1):
                if att.kind == "volume":
                    path = self.volumes.attach(att.source, name).path
                elif att.kind == "disk":
                    path = Path(att.source)
                    if not path.is_file():
                        raise NotFound(f"disk {att.name}: {path} no longer exists; restore it or recreate the "
                                       f"workspace without it")
                else:
                    self.progress(f"Building bundle {att.name} from {att.source}")
                    out_dir = info.dir.path / "bundles"
                    out_dir.mkdir(exist_ok=True)
                    path = build_bundle(Path(att.source), out_dir / f"{att.name}.ext4", out_dir)
                serial = f"ma{i}"
                disks.append(DiskSpec(path, att.read_only, serial))
                mounts.append([f"serial:{serial}", att.mountpoint, "ext4", att.mode])
        except BaseException:
            self.volumes.release(name)
            raise
        return disks, mounts

    @staticmethod
    def _spawn_supervisor(ws: WorkspaceDir, ready_fd: int) -> None:
        """Start the detached supervisor. A single-threaded caller (the CLI) forks, saving an interpreter
        start-up (~0.1 s); a threaded one (a Jupyter kernel) runs a fresh interpreter, as fork is unsafe there."""
        argv = [str(ws.path), "--ready-fd", str(ready_fd)]
        if threading.active_count() == 1 and not os.environ.get("MICROAGENT_SUPERVISOR_EXEC"):
            pid = os.fork()
            if pid == 0:  # child: become the supervisor's parent, detached from our stdio
                code = 1
                try:
                    os.setsid()
                    null = os.open(os.devnull, os.O_RDWR)
                    log_fd = os.open(ws.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(null, 0)
                    os.dup2(log_fd, 1)
                    os.dup2(log_fd, 2)
                    os.closerange(3, ready_fd)
                    os.closerange(ready_fd + 1, 65536)
                    sys.stdout = open(1, "w", buffering=1, closefd=False)
                    sys.stderr = open(2, "w", buffering=1, closefd=False)
                    from . import supervisor

                    code = supervisor.main(argv)
                finally:
                    os._exit(code)
            os.waitpid(pid, 0)
            return
        with open(ws.supervisor_log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "microagent_engine.supervisor", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(ready_fd,), start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                    str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))})
        proc.wait()

    @staticmethod
    def _read_ready(fd: int, timeout: float) -> dict[str, Any]:
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return {"ok": False, "error": f"no word from the supervisor within {timeout:.0f} s"}
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        try:
            return json.loads(buf.splitlines()[0]) if buf else {"ok": False, "error": ""}
        except ValueError:
            return {"ok": False, "error": f"garbled reply from the supervisor: {buf[:200]!r}"}

    # ---- running workspaces --------------------------------------------------------------------
    def _running(self, name: str) -> WorkspaceInfo:
        info = self.status(name)
        if info.state.state not in ("running", "quarantined"):
            hint = f"start it first: microagent start {name}" if info.state.state in STARTABLE else "wait or kill it"
            raise InvalidState(f"workspace {name!r} is {info.state.state}, not running; {hint}")
        return info

    def connection(self, name: str) -> SupervisorConnection:
        """A fresh connection to the running workspace's supervisor."""
        return SupervisorConnection(self._running(name).dir.control_socket)

    def exec(
        self,
        name: str,
        argv: builtins.list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | IO[bytes] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture: bool = True,
    ) -> ExecResult:
        """Run ``argv`` in the running workspace; output streams to the callbacks as the guest produces it."""
        if not argv:
            raise InvalidArgument("exec needs a command: microagent exec NAME -- COMMAND [ARGS...]")
        if cwd is not None and not cwd.startswith("/"):
            raise InvalidArgument(f"--cwd must be an absolute guest path, got {cwd!r}")
        if timeout is not None and timeout <= 0:
            raise InvalidArgument(f"--timeout must be positive, got {timeout}")
        info = self._running(name)
        with SupervisorConnection(info.dir.control_socket) as conn:
            return conn.exec(argv, env=env, cwd=cwd or info.config.workdir, timeout=timeout, stdin=stdin,
                             on_stdout=on_stdout, on_stderr=on_stderr, capture=capture)

    def ping(self, name: str) -> float:
        with self.connection(name) as conn:
            return conn.ping()

    def _end(self, name: str, op: str, timeout: float | None = None) -> WorkspaceInfo:
        info = self.status(name)
        if not info.dir.supervisor_alive():
            raise InvalidState(f"workspace {name!r} is {info.state.state}, not running")
        with SupervisorConnection(info.dir.control_socket) as conn:
            reply = conn.control(op, timeout=None, **({"timeout": timeout} if timeout else {}))
        if not reply.get("ok"):
            raise GuestError(reply.get("error", f"{op} failed"))
        self._wait_supervisor_exit(info.dir)
        return self.status(name)

    @staticmethod
    def _wait_supervisor_exit(ws: WorkspaceDir, limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while ws.supervisor_alive() and time.monotonic() < deadline:
            time.sleep(0.005)

    def halt(self, name: str, timeout: float | None = None) -> WorkspaceInfo:
        """Clean, disk-preserving shutdown through the guest agent."""
        return self._end(name, "halt", timeout)

    def stop(self, name: str) -> WorkspaceInfo:
        """Ask the guest to power off; after 5 s without exit the workspace is marked failed (no kill)."""
        return self._end(name, "stop")

    def quarantine(self, name: str) -> WorkspaceInfo:
        """Sever networking and mediation of a running workspace; keeps disk and logs. Start is refused until
        halt, stop or kill."""
        info = self.status(name)
        if info.state.state != "running" or not info.dir.supervisor_alive():
            raise InvalidState(f"workspace {name!r} is {info.state.state}; only a running workspace can be "
                               f"quarantined")
        with SupervisorConnection(info.dir.control_socket) as conn:
            reply = conn.control("quarantine", timeout=30)
        if not reply.get("ok"):
            raise GuestError(reply.get("error", "quarantine failed"))
        return self.status(name)

    def kill(self, name: str) -> WorkspaceInfo:
        """Terminate the VM at once."""
        info = self.status(name)
        if info.dir.supervisor_alive():
            with SupervisorConnection(info.dir.control_socket) as conn:
                conn.control("kill")
            self._wait_supervisor_exit(info.dir)
            return self.status(name)
        if process_matches(info.state.vm_pid, info.state.vm_start_time):
            os.kill(info.state.vm_pid, signal.SIGKILL)  # type: ignore[arg-type]
        elif info.state.state not in ACTIVE and info.state.state != "failed":
            raise InvalidState(f"workspace {name!r} is {info.state.state}, not running")
        st = info.dir.load_state()
        st.state, st.vm_pid, st.vm_start_time, st.supervisor_pid = "stopped", None, None, None
        st.stopped_at = now_iso()
        info.dir.save_state(st)
        return self.status(name)

    # ---- one-shot ------------------------------------------------------------------------------
    def run(
        self,
        argv: builtins.list[str],
        *,
        name: str | None = None,
        delete: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | IO[bytes] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture: bool = True,
        **create_args: Any,
    ) -> tuple[WorkspaceInfo, ExecResult]:
        """create + start + exec, then halt (and delete with ``delete=True``). Never leaves a VM running."""
        if not argv:
            raise InvalidArgument("run needs a command, e.g. microagent run -- uname -r")
        name = name or f"run-{time.time_ns()}"
        info = self.create(name, env=env, **create_args)
        try:
            self.start(name)
            result = self.exec(name, argv, cwd=cwd, timeout=timeout, stdin=stdin, on_stdout=on_stdout,
                               on_stderr=on_stderr, capture=capture)
            self._finish_run(name)
        except BaseException:
            self._finish_run(name, force=True)
            if delete:
                self.delete(name)
            raise
        if delete:
            self.delete(name)
        else:
            info = self.status(name)
        return info, result

    def _finish_run(self, name: str, force: bool = False) -> None:
        try:
            info = self.status(name)
            if not info.dir.supervisor_alive():
                return
            if force:
                self.kill(name)
            else:
                try:
                    self.halt(name)
                except GuestError:
                    self.kill(name)
        except NotFound:
            pass

    # ---- images --------------------------------------------------------------------------------
    def pull(self, ref: str) -> "ImageInfo":
        """Fetch ``ref`` (re-resolving its tag) and build its rootfs image."""
        return self.images.ensure(ref, refresh=True)

    def commit(self, name: str, ref: str) -> "ImageInfo":
        """Write a stopped workspace's rootfs as an OCI image (under ``<state-dir>/committed/``) that
        ``create --image REF`` boots. The filesystem is checked first (``e2fsck -fn``)."""
        from .images import reference
        from .images.commit import rootfs_to_tar, write_layout
        from .storage.ext4 import fsck

        key = str(reference.parse(ref))
        info = self._stopped(name)
        if info.state.state not in ("halted", "stopped", "prepared", "failed"):
            raise InvalidState(f"workspace {name!r} is {info.state.state}; halt or stop it before commit")
        with file_lock(info.dir.ops_lock, blocking=False, what=f"workspace {name!r}"):
            try:
                fsck(info.dir.rootfs, fix=False)
            except HostError as exc:
                raise InvalidState(f"the rootfs of {name!r} is not clean, so it is not committed: {exc}. Start "
                                   f"and halt the workspace (a clean shutdown), then commit again") from None
            committed = self.state_dir / "committed"
            committed.mkdir(parents=True, exist_ok=True)
            layout = committed / hashlib.sha256(key.encode()).hexdigest()[:16]
            with tempfile.TemporaryDirectory(dir=committed, prefix=".commit-") as tmp:
                self.progress(f"Reading the rootfs of {name}")
                layer = Path(tmp) / "layer.tar"
                rootfs_to_tar(info.dir.rootfs, layer, Path(tmp) / "work")
                config = {"Env": [f"{k}={v}" for k, v in info.config.env.items()],
                          "WorkingDir": info.config.workdir, "Cmd": [info.config.shell]}
                staged = Path(tmp) / "layout"
                write_layout(staged, layer, config, "latest")
                if layout.exists():
                    shutil.rmtree(layout)
                os.rename(staged, layout)
        img = self.images.ensure(f"oci:{layout}:latest")
        return self.images.tag(key, img.id)

    def prune_images(self) -> builtins.list["ImageInfo"]:
        """Remove cached images (and their blobs) that no workspace was created from."""
        in_use = {i.config.image_id or i.config.image for i in self.list()}
        return self.images.prune(in_use)

    # ---- console -------------------------------------------------------------------------------
    def logs(self, name: str, *, follow: bool = False, poll: float = 0.1,
             stop: threading.Event | None = None) -> Iterator[bytes]:
        """The serial console log; with ``follow`` keep yielding new bytes while the workspace runs (or until
        ``stop`` is set, checked every ``poll`` seconds even while the console is silent)."""
        ws = self._existing(name)
        try:
            fh = open(ws.serial_log, "rb")
        except FileNotFoundError:
            if not follow:
                return
            fh = None
        try:
            while True:
                if fh is None and ws.serial_log.exists():
                    fh = open(ws.serial_log, "rb")
                chunk = fh.read(65536) if fh else b""
                if chunk:
                    yield chunk
                    continue
                if not follow or (stop is not None and stop.is_set()) or \
                        not (ws.supervisor_alive() or self._info(ws).running):
                    if fh and (rest := fh.read()):
                        yield rest
                    return
                if stop is not None:
                    stop.wait(poll)
                else:
                    time.sleep(poll)
        finally:
            if fh:
                fh.close()

    def console(self, name: str) -> SupervisorConnection:
        """A connection switched to the serial console: STDOUT frames out, STDIN frames in (stream 0)."""
        conn = self.connection(name)
        reply = conn.control("console", timeout=10)
        if not reply.get("ok"):
            conn.close()
            raise GuestError(reply.get("error", "console unavailable"))
        return conn

    def console_send(self, name: str, line: str, timeout: float = 30.0) -> str:
        """Type ``line`` into the serial console shell and return what it printed."""
        if not self._running(name).state.readiness.get("shellReady", {}).get("ready"):
            raise InvalidState(f"workspace {name!r} has no console shell ({self.status(name).config.shell} "
                               f"missing in the guest)")
        tag = secrets.token_hex(4)
        begin, end = f"MA-BEGIN-{tag}", f"MA-END-{tag}"
        # the quotes split the markers so the echoed command line never matches them
        script = f"echo \"MA-BEGIN\"\"-{tag}\"; {line}; echo \"MA-END\"\"-{tag}\"\n"
        buf = b""
        with self.console(name) as conn:
            conn.send(FrameType.STDIN, 0, b"\n" + script.encode())
            deadline = time.monotonic() + timeout
            for frame in conn.frames(timeout):
                if frame.type == FrameType.STDOUT:
                    buf += frame.payload
                    text = buf.decode(errors="replace")
                    if end in text and begin in text:
                        body = text.split(begin, 1)[1].split(end, 1)[0]
                        return body.replace("\r\n", "\n").strip("\n")
                if time.monotonic() > deadline:
                    break
        raise GuestError(f"no answer from the console shell within {timeout:.0f} s")
