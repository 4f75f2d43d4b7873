"""Workspace records as the engine reads them: lookup by name, the truth check against live processes, listing."""

from __future__ import annotations

import builtins
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import validate_name
from ..errors import Busy, InvalidArgument, NotFound
from ..fsutil import file_lock, sweep_stale_temp
from ..records import (
    WorkspaceConfig,
    WorkspaceDir,
    WorkspaceState,
    process_matches,
    process_tree_usage,
    read_egress_report,
)
from ..snapshots.overlay import overlay_of
from ..states import ACTIVE, allowed_actions, require, transition


@dataclass
class WorkspaceInfo:
    """A workspace's config and state, as ``status``/``list`` report them."""

    config: WorkspaceConfig
    state: WorkspaceState
    dir: WorkspaceDir
    vm_alive: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        return self.state.state in ACTIVE

    @property
    def root_disk(self) -> Path:
        """The root disk's file: the ext4 image, or a disposable clone's copy-on-write overlay."""
        overlay = overlay_of(self.dir.path)
        return Path(overlay["overlay"]) if overlay else self.dir.rootfs

    @property
    def actions(self) -> builtins.list[str]:
        """What the engine accepts for this workspace now (see :func:`microagent_engine.states.allowed_actions`)."""
        return allowed_actions(self.state.state, self.vm_alive)

    def published(self) -> builtins.list[dict[str, Any]]:
        """Published ports: live from the supervisor (bound port, ``listening``) while it runs, else the
        configured ones (``listening`` false)."""
        if self.running and self.dir.supervisor_alive() and self.state.publish:
            return self.state.publish
        return [{**p.to_json(), "listening": False, "error": None, "dynamic": False} for p in self.config.publish]

    def to_json(self) -> dict[str, Any]:
        c, s = self.config, self.state
        policy = c.network_policy
        out: dict[str, Any] = {
            "name": c.name, "state": s.state, "actions": self.actions, "live": self.running,
            "backend": s.backend or "qemu",
            "accel": s.accel or None, "accelReason": s.accel_reason or None, "image": c.image,
            "profile": c.profile, "resources": {"memoryMiB": c.memory_mib, "cpuCount": c.cpus, "sizeMiB": c.size_mib},
            "network": policy.mode, "restart": c.restart,
            "networkPolicy": policy.to_json(),
            "networkSummary": policy.describe(),
            "restartCount": s.restart_count, "hostname": c.hostname, "env": c.env,
            "rootfs": str(self.root_disk), "serialLog": str(self.dir.serial_log),
            "createdAt": c.created_at, "startedAt": s.started_at, "stoppedAt": s.stopped_at,
            "updatedAt": s.updated_at, "bootSeconds": s.boot_seconds,
            "bootMode": s.boot_mode or None, "coldReason": s.cold_reason or None, "vmPid": s.vm_pid,
            "supervisorPid": s.supervisor_pid, "kernelRelease": s.kernel_release or None,
            "error": s.error or None, "exitDetail": s.exit_detail or None,
            "setup": c.setup, "setupDone": s.setup_done, "entrypoint": c.entrypoint,
            "entrypointStatus": s.entrypoint or None, "droppedFrames": s.dropped_frames,
            "mediation": c.mediation.to_json() if c.mediation else None, "shell": c.shell,
            "quarantined": s.state == "quarantined", "attachments": [a.to_json() for a in c.attachments],
            "outputs": [o.to_json() for o in c.outputs],
            "volumes": [a.source for a in c.attachments if a.kind == "volume"],
            "confinement": s.confinement or None,
            "oneShot": c.one_shot,
            "publish": self.published(),
            "egress": read_egress_report(self.dir.egress_report) if self.running else None,
            "usage": process_tree_usage(s.vm_pid) if s.vm_pid and self.running else None,
        }
        out.update(s.readiness)
        return out


#: a ``.creating-*`` directory younger than this may not hold its lock yet (made, lock not yet taken)
_LOCK_GRACE_SECONDS = 10.0


class WorkspaceStore:
    """The records under ``<state-dir>/workspaces``; every read corrects a record whose supervisor died."""

    def __init__(self, state_dir: Path) -> None:
        self.workspaces_dir = state_dir / "workspaces"

    def dir(self, name: str) -> WorkspaceDir:
        return WorkspaceDir(self.workspaces_dir / validate_name(name))

    def existing(self, name: str) -> WorkspaceDir:
        ws = self.dir(name)
        if not ws.exists():
            raise NotFound(f"no workspace named {name!r}; see 'microagent list' for the saved ones")
        return ws

    def info(self, ws: WorkspaceDir) -> WorkspaceInfo:
        cfg = ws.load_config()
        st = ws.load_state()
        supervisor = ws.supervisor_alive()
        if st.state in ACTIVE and not supervisor:
            # the supervisor died without recording the end (killed, host crash): the record must not lie
            vm_alive = process_matches(st.vm_pid, st.vm_start_time)
            st.state = transition(st.state, "failed")
            st.error = st.error or ("the workspace supervisor exited unexpectedly" +
                                    ("; the VM process is still running: run kill" if vm_alive else ""))
            if not vm_alive:
                st.vm_pid = st.vm_start_time = st.supervisor_pid = None
            for sig in st.readiness.values():
                sig["ready"] = False
            ws.save_state(st)
        alive = supervisor or process_matches(st.vm_pid, st.vm_start_time)
        return WorkspaceInfo(cfg, st, ws, alive)

    def status(self, name: str) -> WorkspaceInfo:
        return self.info(self.existing(name))

    def list(self) -> builtins.list[WorkspaceInfo]:
        if not self.workspaces_dir.is_dir():
            return []
        out = []
        for path in sorted(self.workspaces_dir.iterdir()):
            ws = WorkspaceDir(path)
            if not path.name.startswith(".") and ws.exists():
                out.append(self.info(ws))
        return out

    @staticmethod
    def vm_alive(info: WorkspaceInfo) -> bool:
        """Is a supervisor or the recorded VM process alive right now (re-checked, not cached)?"""
        return info.dir.supervisor_alive() or process_matches(info.state.vm_pid, info.state.vm_start_time)

    def holder_running(self, name: str) -> bool:
        """Does workspace ``name`` hold its disks right now (running, or in the middle of starting)?"""
        try:
            ws = self.dir(name)
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

    def stopped(self, name: str, op: str) -> WorkspaceInfo:
        """The workspace, which must not be running for ``op`` (named in the error as the user asked for it)."""
        info = self.status(name)
        require("output", info.state.state, name, self.vm_alive(info), what=op)
        return info

    def sweep_leftovers(self, stale_after: float = 3600.0) -> None:
        """Remove what a killed create or delete left behind: a ``.deleting-*`` directory (the delete had
        committed by renaming), a ``.creating-*`` one whose create is gone (its lock is free; a create holds
        it from just after making the directory) or older than ``stale_after`` seconds, and stale temp files."""
        now = time.time()
        for path in self.workspaces_dir.glob(".*-*"):
            try:
                age = now - path.stat().st_mtime
                stale = path.name.startswith(".deleting-") or (
                    path.name.startswith(".creating-") and (age > stale_after or (
                        age > _LOCK_GRACE_SECONDS and self._abandoned(path))))
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.workspaces_dir.iterdir():  # a killed save_state/copy leaves .state.json.XXXX, .x.tmp
            if not path.name.startswith(".") and path.is_dir():
                sweep_stale_temp(path, (".*.tmp", ".*.json.*"), stale_after)

    @staticmethod
    def _abandoned(staging: Path) -> bool:
        """True if the create that made ``staging`` no longer runs: its lock file exists and is not held."""
        lock = WorkspaceDir(staging).ops_lock
        if not lock.exists():
            return False
        try:
            with file_lock(lock, blocking=False):
                return True
        except (Busy, OSError):
            return False
