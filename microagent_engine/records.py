"""On-disk records of a workspace: its config (``workspace.json``) and its live state (``state.json``)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .fsutil import read_json, write_json_atomic
from .model import Attachment, Mediation, Output, Publish
from .network_policy import NetworkPolicy, policy_of

from .states import ACTIVE, READINESS_SIGNALS, STARTABLE, STATES  # noqa: F401 (re-exported)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class WorkspaceConfig:
    """What the user asked for at create time (never changed by running the workspace)."""

    name: str
    image: str
    profile: str
    memory_mib: int
    cpus: int
    size_mib: int
    env: dict[str, str] = field(default_factory=dict)
    hostname: str = ""
    network: str = "user"
    accel: str = "auto"
    kernel: str | None = None
    restart: str = "never"
    shell: str = "/bin/sh"
    setup: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    mediation: Mediation | None = None
    network_policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    attachments: list[Attachment] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    publish: list[Publish] = field(default_factory=list)  # host ports forwarded into the guest (-p)
    image_id: str = ""
    workdir: str = "/"
    created_at: str = field(default_factory=now_iso)
    one_shot: bool = False  # made by run under a generated name (prune removes it once stopped)
    cold: bool = False  # every start boots cold (create --cold), never from a template
    from_snapshot: str | None = None  # the workspace snapshot it was created from (create --from-snapshot)
    spec: dict[str, Any] = field(default_factory=dict)  # the request as given: WorkspaceSpec.to_json()
    #: secrets bound to hosts ({name, hosts, source?}) and the placeholder the guest holds for each: never a value
    secrets: list[dict[str, Any]] = field(default_factory=list)
    placeholders: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mediation"] = self.mediation.to_json() if self.mediation else None
        out["network_policy"] = self.network_policy.to_json()
        out["attachments"] = [a.to_json() for a in self.attachments]
        out["outputs"] = [o.to_json() for o in self.outputs]
        out["publish"] = [p.to_json() for p in self.publish]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WorkspaceConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.mediation = Mediation.from_json(cfg.mediation) if cfg.mediation else None
        cfg.network_policy = policy_of(cfg.network, data.get("network_policy"))
        cfg.attachments = [Attachment.from_json(a) for a in cfg.attachments]  # type: ignore[arg-type]
        cfg.outputs = [Output.from_json(o) for o in cfg.outputs]  # type: ignore[arg-type]
        cfg.publish = [Publish.from_json(p) for p in cfg.publish]  # type: ignore[arg-type]
        return cfg


EGRESS_REPORT = "egress.json"
MAX_EGRESS_REPORT = 1 << 20


def read_egress_report(path: Path) -> dict[str, Any] | None:
    """The supervisor's egress report at ``path`` (None when absent or unreadable)."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(MAX_EGRESS_REPORT))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def signal(ready: bool = False, detail: str = "", error: str = "") -> dict[str, Any]:
    return {"ready": ready, "observedAt": now_iso(), "detail": detail, "error": error}


def initial_readiness() -> dict[str, dict[str, Any]]:
    return {name: signal(False, "not started") for name in READINESS_SIGNALS}


@dataclass
class WorkspaceState:
    """Where the workspace is in its lifecycle. Written by the engine when idle, by the supervisor when live."""

    state: str = "prepared"
    updated_at: str = field(default_factory=now_iso)
    accel: str = ""
    accel_reason: str = ""
    backend: str = "qemu"
    supervisor_pid: int | None = None
    vm_pid: int | None = None
    vm_start_time: int | None = None
    started_at: str | None = None
    stopped_at: str | None = None
    boot_seconds: float | None = None
    boot_mode: str = ""  # "warm" (a template clone) or "cold"
    cold_reason: str = ""  # why the last boot was cold
    error: str = ""
    exit_detail: str = ""
    kernel_release: str = ""
    restart_count: int = 0
    setup_done: bool = False
    entrypoint: str = ""
    confinement: dict[str, Any] = field(default_factory=dict)  # what jailed the VM (sandbox.jail.plan)
    publish: list[dict[str, Any]] = field(default_factory=list)  # live published ports (supervisor.publish)
    dropped_frames: int = 0  # guest frames the supervisor dropped this boot (streams it did not open, ...)
    readiness: dict[str, dict[str, Any]] = field(default_factory=initial_readiness)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WorkspaceState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class WorkspaceDir:
    """The files of one workspace under ``<state-dir>/workspaces/<name>/``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    name = property(lambda self: self.path.name)
    config_file = property(lambda self: self.path / "workspace.json")
    state_file = property(lambda self: self.path / "state.json")
    rootfs = property(lambda self: self.path / "rootfs.ext4")
    serial_log = property(lambda self: self.path / "serial.log")
    vm_log = property(lambda self: self.path / "vm.log")
    supervisor_log = property(lambda self: self.path / "supervisor.log")
    ops_lock = property(lambda self: self.path / ".lock")
    supervisor_lock = property(lambda self: self.path / ".supervisor.lock")

    @property
    def run_dir(self) -> Path:
        """Where the sockets live: inside the workspace unless the path would exceed the unix socket limit."""
        inside = self.path / "run"
        if len(str(inside / "control.sock")) < 100:
            return inside
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return Path("/tmp") / f"microagent-{os.getuid()}" / digest

    agent_socket = property(lambda self: self.run_dir / "agent.sock")
    serial_socket = property(lambda self: self.run_dir / "serial.sock")
    qmp_socket = property(lambda self: self.run_dir / "qmp.sock")
    control_socket = property(lambda self: self.run_dir / "control.sock")
    #: the guest's DNS and egress counters and recent refusals, kept current by the supervisor while it runs
    egress_report = property(lambda self: self.run_dir / EGRESS_REPORT)
    mediation_socket = property(lambda self: self.run_dir / "mediation.sock")
    #: a sleeping workspace's saved RAM and device state (``microagent sleep``; supervisor/sleeping.py)
    sleep_state = property(lambda self: self.run_dir / "sleep-state")

    def exists(self) -> bool:
        return self.config_file.exists()

    def load_config(self) -> WorkspaceConfig:
        return WorkspaceConfig.from_json(read_json(self.config_file))

    def save_config(self, cfg: WorkspaceConfig) -> None:
        write_json_atomic(self.config_file, cfg.to_json())

    def load_state(self) -> WorkspaceState:
        try:
            return WorkspaceState.from_json(read_json(self.state_file))
        except FileNotFoundError:
            return WorkspaceState()

    def save_state(self, st: WorkspaceState) -> None:
        st.updated_at = now_iso()
        write_json_atomic(self.state_file, st.to_json())

    def supervisor_alive(self) -> bool:
        """True while a supervisor holds this workspace's supervisor lock (robust against pid reuse)."""
        if not self.supervisor_lock.exists():
            return False
        fd = os.open(self.supervisor_lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 onwards), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    fields = _stat_fields(pid)
    if not fields or fields[0] == "Z":
        return None
    return int(fields[19])


def process_tree_usage(pid: int, max_processes: int = 64) -> dict[str, float] | None:
    """CPU seconds (user + system) and resident memory (MiB) of ``pid`` and its descendants (the jail and the
    VM process in it), or None if ``pid`` is gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    seen, todo = [], [pid]
    cpu, rss_kib = 0.0, 0
    while todo and len(seen) < max_processes:
        p = todo.pop()
        fields = _stat_fields(p)
        if fields is None:
            if p == pid:
                return None
            continue
        seen.append(p)
        cpu += (int(fields[11]) + int(fields[12])) / ticks
        rss_kib += int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return {"cpuSeconds": round(cpu, 2), "rssMiB": round(rss_kib / 1024, 1), "processes": len(seen)}


def process_matches(pid: int | None, start_time: int | None) -> bool:
    """Is the recorded process still the same live process (not a reused pid)?"""
    return bool(pid) and start_time is not None and process_start_time(pid) == start_time  # type: ignore[arg-type]
