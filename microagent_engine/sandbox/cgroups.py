"""A cgroup v2 per VM (memory.max, cpu.max, pids.max) where the host has a usable, delegated cgroup v2.

Never touches a v1 hierarchy: on a v1 or hybrid host (controllers bound to v1 mounts) groups are reported
unavailable with the reason. Where v2 is usable, VM groups live under ``$MICROAGENT_CGROUP_PARENT`` (a
delegated directory, e.g. from ``systemd-run --user --scope -p Delegate=yes``) or, for root,
``/sys/fs/cgroup/microagent``; the parent gets the controllers enabled in its ``cgroup.subtree_control`` and
never holds processes itself (cgroup v2's no-internal-process rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT_ENV = "MICROAGENT_CGROUP_PARENT"
CONTROLLERS = ("memory", "cpu", "pids")
#: QEMU's own memory beside guest RAM: TCG's translation cache, device state, slirp, thread stacks
TCG_OVERHEAD_MIB = 512
KVM_OVERHEAD_MIB = 192
#: threads: one per vCPU plus the main loop, RCU, I/O and a worker pool of up to 64
PIDS_BASE = 128


@dataclass(frozen=True)
class CgroupSupport:
    available: bool
    reason: str
    parent: Path | None = None


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int  # bytes
    cpu_max: str  # "QUOTA PERIOD"
    pids_max: int

    def to_json(self) -> dict[str, object]:
        return {"memory.max": self.memory_max, "cpu.max": self.cpu_max, "pids.max": self.pids_max}


def limits_for(memory_mib: int, cpus: int, accel: str) -> CgroupLimits:
    """Limits derived from the workspace's profile: guest RAM plus QEMU's overhead, its vCPUs, its threads."""
    overhead = KVM_OVERHEAD_MIB if accel == "kvm" else TCG_OVERHEAD_MIB
    return CgroupLimits((memory_mib + overhead) << 20, f"{cpus * 100000} 100000", PIDS_BASE + cpus)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in this mount namespace."""
    out = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            out.append((left.split()[4], right.split()[0]))
    except (OSError, IndexError):
        pass
    return out


def detect() -> CgroupSupport:
    """Whether VMs can get their own cgroup v2 with memory, cpu and pids limits here, and why not."""
    mounts = _mounts()
    v1 = sorted({mp for mp, fs in mounts if fs == "cgroup"})
    root_type = next((fs for mp, fs in reversed(mounts) if mp == str(CGROUP_ROOT)), "")
    if root_type != "cgroup2":
        if v1:
            unified = next((mp for mp, fs in mounts if fs == "cgroup2"), None)
            ctl = _read(Path(unified) / "cgroup.controllers") if unified else ""
            where = (f"; the unified hierarchy at {unified} has " + (f"only {ctl}" if ctl else "no controllers")
                     if unified else "")
            return CgroupSupport(False, f"this host uses cgroup v1 (hybrid): memory/cpu/pids are v1 hierarchies "
                                        f"under {CGROUP_ROOT}{where}; microagent never creates groups in v1")
        return CgroupSupport(False, f"no cgroup v2 mounted at {CGROUP_ROOT}")
    available = set(_read(CGROUP_ROOT / "cgroup.controllers").split())
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        return CgroupSupport(False, f"cgroup v2 lacks the {', '.join(missing)} controller(s)")
    env = os.environ.get(CGROUP_PARENT_ENV)
    if env:
        parent = Path(env)
    elif os.geteuid() == 0:
        parent = CGROUP_ROOT / "microagent"
    else:
        return CgroupSupport(False, f"not root and no delegated cgroup: set {CGROUP_PARENT_ENV} to a cgroup v2 "
                                    f"directory delegated to you (systemd-run --user --scope -p Delegate=yes)")
    try:
        parent.mkdir(exist_ok=True)
        enabled = set(_read(parent / "cgroup.subtree_control").split())
        if not set(CONTROLLERS) <= enabled:
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
    except OSError as exc:
        return CgroupSupport(False, f"cannot use {parent} for VM groups ({exc.strerror}); set "
                                    f"{CGROUP_PARENT_ENV} to a delegated cgroup v2 directory")
    return CgroupSupport(True, f"cgroup v2 under {parent}", parent)


def create(support: CgroupSupport, name: str, limits: CgroupLimits) -> Path:
    """Create the VM's group under ``support.parent`` with ``limits``; the launcher moves itself into it."""
    assert support.available and support.parent is not None
    path = support.parent / name
    path.mkdir(exist_ok=True)
    (path / "memory.max").write_text(str(limits.memory_max))
    (path / "cpu.max").write_text(limits.cpu_max)
    (path / "pids.max").write_text(str(limits.pids_max))
    if (path / "memory.swap.max").exists():
        (path / "memory.swap.max").write_text("0")
    return path


def remove(path: Path) -> None:
    """Remove a VM's group once its processes are gone (a busy group is left for the next start)."""
    try:
        path.rmdir()
    except OSError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
