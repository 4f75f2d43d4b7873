"""Starting and ending a workspace's VM: attach disks, write the launch spec, spawn the supervisor and wait for
its word; halt, stop, kill and quarantine through the supervisor's control socket."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from pathlib import Path
from typing import Any

from ..backends.base import DiskSpec, VMSpec
from ..client import SupervisorConnection
from ..config import BOOT_TIMEOUTS
from ..errors import GuestError, InvalidArgument, NotFound, PortUnavailable
from ..fsutil import file_lock, write_json_atomic
from ..guest.initramfs import build_initramfs
from ..host_ports import check_publish_free
from ..hostinfo import choose_accel
from ..model import PUBLISH_DEFAULT_HOST_IP, LaunchSpec, Publish
from ..protocol import DEFAULT_ROOT_DEVICE, MOUNT_SERIAL_PREFIX, BootArg, MountMode
from ..records import WorkspaceConfig, WorkspaceDir, now_iso, process_matches
from ..secret import Secret
from ..snapshots import workspace as snapshots
from ..snapshots.live import RAM_FILE, RAM_FILE_KEY, RESTORE_KEY
from ..snapshots.overlay import OVERLAY_KEY, overlay_of
from ..snapshots.templates import COLD_KEY
from ..states import require, transition
from ..timeline import mark
from ..storage.bundles import build_bundle
from .context import EngineContext
from .spawn import spawn_supervisor
from .store import WorkspaceInfo

#: how long ``halt``/``stop``/``kill`` wait for the supervisor to record the end and exit
SUPERVISOR_EXIT_WAIT = 10.0


class Lifecycle:
    """``start``, ``halt``, ``stop``, ``kill``, ``quarantine``."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    # ---- start ---------------------------------------------------------------------------------
    def start(self, name: str, *, boot_timeout: float | None = None, cold: bool = False,
              ram_file: bool = False) -> WorkspaceInfo:
        ws = self.ctx.store.existing(name)
        with file_lock(ws.ops_lock, blocking=False, what=f"workspace {name!r}"):
            info = self.ctx.store.info(ws)
            require("start", info.state.state, name, info.vm_alive)
            return self._launch(info, boot_timeout, cold, ram_file)

    def _launch(self, info: WorkspaceInfo, boot_timeout: float | None, cold: bool = False,
                ram_file: bool = False) -> WorkspaceInfo:
        ctx = self.ctx
        cfg, ws = info.config, info.dir
        values = secret_values(cfg)  # read now, on the host: a missing one fails before anything starts
        ctx.backend.binary()  # fail first, and clearly, when the hypervisor is missing
        check_publish_free(cfg.publish)  # a taken host port fails before anything is started
        accel = choose_accel(None if cfg.accel == "auto" else cfg.accel)
        kernel = ctx.resolve_kernel(cfg.kernel)
        initramfs = build_initramfs(ctx.state_dir, kernel, ctx.backend.guest_modules())
        cmdline = " ".join(ctx.backend.kernel_args(accel) + [BootArg.ROOT + DEFAULT_ROOT_DEVICE])
        disks, mounts = self._attach_disks(info)
        spec = VMSpec(kernel=kernel.path, initramfs=initramfs, cmdline=cmdline, memory_mib=cfg.memory_mib,
                      cpus=cfg.cpus, disks=[DiskSpec(ws.rootfs), *disks], agent_socket=ws.agent_socket,
                      serial_socket=ws.serial_socket, control_socket=ws.qmp_socket, network=cfg.network,
                      accel=accel, mediation_socket=ws.mediation_socket if cfg.mediation else None)
        timeout = boot_timeout or BOOT_TIMEOUTS[accel.accel]
        argv = ctx.backend.command(spec)
        if cold or ram_file:  # asked for: boot the disk without a snapshot's (or its own sleep's) processes
            snapshots.restore_done(ws)
        extra: dict[str, Any] = snapshots.pending_restore(ws, argv) or ({COLD_KEY: True} if cold or cfg.cold
                                                                         or ram_file else {})
        if ram_file:
            extra[RAM_FILE_KEY] = str(ws.path / RAM_FILE)
        overlay = overlay_of(ws.path)
        if overlay:  # the root disk in the argv (and its shape) stays the logical one; the supervisor swaps it
            extra[OVERLAY_KEY] = {**overlay, "root": str(ws.rootfs)}
        launch = LaunchSpec(argv=argv, hostname=cfg.hostname, network=cfg.network,
                            shell=cfg.shell, env=cfg.env, accel=accel.accel, boot_timeout=timeout, mounts=mounts,
                            setup=cfg.setup, entrypoint=cfg.entrypoint, restart=cfg.restart,
                            mediation=cfg.mediation, network_policy=cfg.network_policy, publish=cfg.publish,
                            extra=extra, secrets=[{**s, "placeholder": cfg.placeholders[s["name"]]}
                                                  for s in cfg.secrets])
        ws.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # a sleep's saved memory outlives only a supervisor that was killed while its workspace slept: it is
        # useless without that supervisor's streams (this start boots the disk)
        ws.sleep_state.unlink(missing_ok=True)
        write_json_atomic(ws.run_dir / "launch.json", launch.to_json())
        st = ws.load_state()
        st.accel, st.accel_reason, st.backend, st.error = accel.accel, accel.reason, ctx.backend.name, ""
        ws.save_state(st)
        rfd, wfd = os.pipe()
        secrets_fd = _secrets_pipe(values) if values else None
        try:
            spawn_supervisor(ws, wfd, secrets_fd)
            os.close(wfd)
            wfd = -1
            reply = _read_ready(rfd, timeout + 30)
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
            if secrets_fd is not None:
                os.close(secrets_fd)
        if not reply.get("ok"):
            wait_supervisor_exit(ws)
            if RESTORE_KEY in extra and ws.load_state().boot_mode == "snapshot":
                snapshots.restore_done(ws)  # it resumed, then failed: its disk has moved on from the snapshot
            ctx.volumes.release(cfg.name)
            error = reply.get("error") or "the supervisor exited without a word; see supervisor.log"
            raise GuestError(f"workspace {cfg.name!r} failed to start: {error}\n"
                             f"(see 'microagent logs {cfg.name}' and {ws.vm_log})")
        if RESTORE_KEY in extra:
            snapshots.restore_done(ws)
        return ctx.store.info(ws)

    def _attach_disks(self, info: WorkspaceInfo) -> tuple[list[DiskSpec], list[list[str]]]:
        """Claim named volumes (single-attach), check raw disks, build bundles; the guest mounts each by the
        disk's serial. On any failure the volumes claimed so far are released."""
        disks: list[DiskSpec] = []
        mounts: list[list[str]] = []
        name = info.config.name
        try:
            for i, att in enumerate(info.config.attachments, 1):
                if att.kind == "volume":
                    path = self.ctx.volumes.attach(att.source, name).path
                elif att.kind == "disk":
                    path = Path(att.source)
                    if not path.is_file():
                        raise NotFound(f"disk {att.name}: {path} no longer exists; restore it or recreate the "
                                       f"workspace without it")
                else:
                    self.ctx.progress(f"Building bundle {att.name} from {att.source}")
                    out_dir = info.dir.path / "bundles"
                    out_dir.mkdir(exist_ok=True)
                    path = build_bundle(Path(att.source), out_dir / f"{att.name}.ext4", out_dir)
                serial = f"ma{i}"
                disks.append(DiskSpec(path, att.read_only, serial))
                mounts.append([MOUNT_SERIAL_PREFIX + serial, att.mountpoint, "ext4",
                               MountMode.RO if att.read_only else MountMode.RW])
        except BaseException:
            self.ctx.volumes.release(name)
            raise
        return disks, mounts

    # ---- end -----------------------------------------------------------------------------------
    def _end(self, name: str, op: str, timeout: float | None = None) -> WorkspaceInfo:
        info = self.ctx.store.status(name)
        require(op, info.state.state, name, info.vm_alive)
        with SupervisorConnection(info.dir.control_socket) as conn:
            reply = conn.control(op, {"timeout": timeout} if timeout else {})
        if not reply.get("ok"):
            raise GuestError(reply.get("error", f"{op} failed"))
        wait_supervisor_exit(info.dir)
        return self.ctx.store.status(name)

    def halt(self, name: str, timeout: float | None = None) -> WorkspaceInfo:
        return self._end(name, "halt", timeout)

    def stop(self, name: str) -> WorkspaceInfo:
        return self._end(name, "stop")

    def quarantine(self, name: str) -> WorkspaceInfo:
        info = self.ctx.store.status(name)
        require("quarantine", info.state.state, name)
        with SupervisorConnection(info.dir.control_socket) as conn:
            reply = conn.control("quarantine", reply_timeout=30)
        if not reply.get("ok"):
            raise GuestError(reply.get("error", "quarantine failed"))
        return self.ctx.store.status(name)

    def pause(self, name: str, resume: bool = False) -> WorkspaceInfo:
        """Stop (or, ``resume``, continue) the VM's vCPUs; memory, processes and open commands stay."""
        op = "resume" if resume else "pause"
        info = self.ctx.store.status(name)
        require(op, info.state.state, name)
        with SupervisorConnection(info.dir.control_socket) as conn:
            # resuming a sleeping one restores its memory into a new VM: a boot's deadline
            asleep = info.state.state == "sleeping"
            reply = conn.control(op, reply_timeout=BOOT_TIMEOUTS.get(info.state.accel, BOOT_TIMEOUTS["tcg"])
                                 if asleep else 30)
        if not reply.get("ok"):
            raise GuestError(reply.get("error", f"{op} failed"))
        return self.ctx.store.status(name)

    def snapshot(self, name: str, snapshot: str, internal: bool = False) -> dict[str, Any]:
        """Save a running (or paused) workspace as ``snapshot``: memory, device state and a copy of its root
        disk, the VM stopped briefly; it keeps running (one started with ``ram_file`` ends). The snapshot's meta."""
        info = self.ctx.store.status(name)
        require("snapshot", info.state.state, name)
        meta = snapshots.take(self.ctx.state_dir, info.dir, snapshot, internal)
        if meta["memory"] == "file":
            wait_supervisor_exit(info.dir)  # its VM ended with the snapshot, which now owns its RAM
        return meta

    def sleep(self, name: str) -> WorkspaceInfo:
        """Save a running (or paused) workspace's memory to a file and end its VM, keeping its supervisor and every
        stream (state ``sleeping``); traffic for the guest or ``resume`` wakes it (supervisor/sleeping.py)."""
        info = self.ctx.store.status(name)
        require("sleep", info.state.state, name)
        with SupervisorConnection(info.dir.control_socket) as conn:
            reply = conn.control("sleep", reply_timeout=snapshots.SNAPSHOT_REPLY_TIMEOUT)
        if not reply.get("ok"):
            raise GuestError(reply.get("error", "sleep failed"))
        return self.ctx.store.status(name)

    # ---- published ports (while running) ------------------------------------------------------
    def publish(self, name: str, guest_port: int, host_port: int = 0,
                host_ip: str = PUBLISH_DEFAULT_HOST_IP) -> tuple[str, int]:
        """Forward ``host_ip:host_port`` to the guest's ``127.0.0.1:guest_port`` until unpublished or the
        workspace ends; host_port 0 picks a free port. Returns the bound (host_ip, host_port)."""
        item = Publish(host_port, guest_port, host_ip)  # validates
        reply = self._publish_control(name, "publish", item.to_json())
        return str(reply["hostIp"]), int(reply["hostPort"])

    def publish_socket(self, name: str, guest_port: int) -> str:
        """Forward a unix socket only this user can open to the guest's ``127.0.0.1:guest_port``; its path."""
        item = Publish(0, guest_port)  # validates
        return str(self._publish_control(name, "publish", {"socket": True, "guestPort": item.guest_port})["hostPath"])

    def unpublish_socket(self, name: str, path: str) -> None:
        """Stop forwarding the unix socket ``path`` (its open connections are closed)."""
        self._publish_control(name, "unpublish", {"hostPath": str(path)})

    def unpublish(self, name: str, host_port: int, host_ip: str = PUBLISH_DEFAULT_HOST_IP) -> None:
        """Stop forwarding ``host_ip:host_port`` (its open connections are closed)."""
        item = Publish(host_port, 1, host_ip)
        self._publish_control(name, "unpublish", {"hostIp": item.host_ip, "hostPort": item.host_port})

    def _publish_control(self, name: str, op: str, params: dict[str, Any]) -> dict[str, Any]:
        info = self.ctx.store.status(name)
        require("publish", info.state.state, name)
        with SupervisorConnection(info.dir.control_socket) as conn:
            reply = conn.control(op, params)
        if not reply.get("ok"):
            raise PortUnavailable(reply.get("error", f"{op} failed")) if reply.get("portTaken") else \
                GuestError(reply.get("error", f"{op} failed"))
        return reply

    def kill(self, name: str) -> WorkspaceInfo:
        info = self.ctx.store.status(name)
        if info.dir.supervisor_alive():
            with SupervisorConnection(info.dir.control_socket) as conn:
                conn.control("kill")
            mark("kill: answered")
            wait_supervisor_exit(info.dir)
            mark("kill: supervisor gone")
            return self.ctx.store.status(name)
        if process_matches(info.state.vm_pid, info.state.vm_start_time):
            os.kill(info.state.vm_pid, signal.SIGKILL)  # type: ignore[arg-type]
        else:
            require("kill", info.state.state, name)
        st = info.dir.load_state()
        st.state, st.vm_pid, st.vm_start_time, st.supervisor_pid = transition(st.state, "stopped"), None, None, None
        st.stopped_at = now_iso()
        info.dir.save_state(st)
        return self.ctx.store.status(name)


def wait_supervisor_exit(ws: WorkspaceDir, limit: float = SUPERVISOR_EXIT_WAIT) -> None:
    deadline = time.monotonic() + limit
    while ws.supervisor_alive() and time.monotonic() < deadline:
        time.sleep(0.005)


def secret_values(cfg: WorkspaceConfig) -> dict[str, str]:
    """placeholder -> value of the workspace's secrets, read from the host now."""
    return {cfg.placeholders[s["name"]]: Secret.from_json(s).read_value() for s in cfg.secrets}


def _secrets_pipe(values: dict[str, str]) -> int:
    """The read end of a pipe that holds ``values`` as JSON (whole: it fits the pipe's buffer)."""
    data = json.dumps(values).encode()
    rfd, wfd = os.pipe()
    try:
        if len(data) > 60 * 1024:
            raise InvalidArgument("the secrets' values add up to more than 60 KiB; give fewer or smaller ones")
        os.write(wfd, data)
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return rfd


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
