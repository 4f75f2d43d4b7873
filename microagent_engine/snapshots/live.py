"""Workspace snapshots, the supervisor's side: save the running VM (RAM, device state and a copy of its root disk)
with its vCPUs stopped briefly, and the argv that restores a clone of it.

Save (QEMU 7.2): QMP ``stop``; migrate everything, RAM included (``x-ignore-shared`` off: a template clone's RAM
is a private mapping, which is migrated like anonymous RAM), to a file passed with ``getfd``; copy the root disk
(reflink where the filesystem can, else sparse) while QEMU holds it flushed and inactive after the migration;
``cont`` (QEMU re-activates the disks). A clone restores the stream into anonymous RAM (``-incoming defer`` +
``migrate-incoming fd:N``); its agent then gets CONFIG with the host's clock and a fresh RNG seed, as a template
clone does (guest/agent.c applies both at every CONFIG).

Limits: a command the host was running in the workspace at snapshot time keeps running in the clone, but its output
has no reader there (the clone's supervisor drops its frames and counts them as ``droppedFrames``); published
ports and network connections are not carried over.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.qemu import QemuBackend
from ..errors import HostError
from ..backends.qmp import QmpError, QmpSession
from ..states import allows, refusal
from .templates import memory_of, shape_of

if TYPE_CHECKING:
    from ..supervisor.roles import LiveVM

#: files of a snapshot directory (``<state-dir>/snapshots/<name>/``)
STATE_FILE = "state"
ROOTFS_FILE = "rootfs.ext4"
#: the launch's ``extra`` key of a workspace's first start after ``create --from-snapshot``:
#: ``{"state": <stream file>, "memory": "ram"|"default", "snapshot": <name>}``
RESTORE_KEY = "restoreSnapshot"
#: QEMU 7.2 rate-limits migrations to 32 MiB/s by default; a snapshot of a stopped VM wants the disk's speed
MIGRATION_PARAMS = {"max-bandwidth": 1 << 40, "downtime-limit": 2000}
NO_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": False}]}


def snapshot_shape(argv: list[str]) -> list[Any]:
    """What a snapshot's clone must share with the snapshotted VM: the template shape without the kernel's and
    initramfs's file identities (the restored RAM holds the kernel and agent that were running)."""
    shape = shape_of(argv)
    out: list[Any] = [shape[0][0]]
    skip = False
    for item in shape[1:]:
        if skip:
            out.append("FILE")
            skip = False
            continue
        out.append(item)
        skip = item in ("-kernel", "-initrd")
    return out


def memory_form(boot_mode: str) -> str:
    """How the snapshotted VM's RAM was created: ``ram`` (a template clone or a snapshot clone: a memory
    backend object named MEMORY_ID) or ``default`` (a cold boot: the machine's own RAM)."""
    return "ram" if boot_mode in ("warm", "snapshot") else "default"


def restore_argv(argv: list[str], restore: dict[str, Any]) -> list[str]:
    """The argv of a clone restoring ``restore`` (see RESTORE_KEY) over the workspace's ``argv``."""
    if restore.get("memory") == "ram":
        argv = QemuBackend.ram_backend_argv(argv, memory_of(argv))
    return QemuBackend.incoming_argv(argv, Path(restore["state"]))


def copy_disk(src: Path, dst: Path) -> None:
    """A private copy of a disk image: reflink where the filesystem can, else sparse."""
    proc = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise HostError(f"copying {src} failed: {proc.stderr.strip()[-300:]}")
    os.chmod(dst, 0o600)


async def save(sup: LiveVM, target: Path) -> dict[str, Any]:
    """Save the supervisor's running (or paused) VM into the directory ``target``; the reply to the control op."""
    state = sup.state.state
    if not allows("snapshot", state):
        return {"ok": False, "error": refusal("snapshot", state, sup.ws.name)}
    if sup.snapshotting:
        return {"ok": False, "error": "a snapshot of this workspace is being taken; wait for it"}
    if not target.is_dir():
        return {"ok": False, "error": f"snapshot directory {target} does not exist"}
    was_paused = state == "paused"
    sup.snapshotting = True

    def run() -> dict[str, Any]:
        fd = os.open(target / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with QmpSession(sup.ws.qmp_socket, timeout=300) as qmp:
                t0 = time.monotonic()
                if not was_paused:
                    qmp.command("stop")
                try:
                    qmp.command("migrate-set-capabilities", NO_IGNORE_SHARED)
                    qmp.command("migrate-set-parameters", MIGRATION_PARAMS)
                    qmp.command("getfd", {"fdname": "snapshot"}, fds=[fd])
                    qmp.command("migrate", {"uri": "fd:snapshot"})
                    qmp.wait_migration(timeout=300)
                    t_mem = time.monotonic()
                    copy_disk(sup.ws.rootfs, target / ROOTFS_FILE)
                finally:
                    if not was_paused:
                        qmp.command("cont")
                stopped = time.monotonic() - t0
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"ok": True, "stoppedSeconds": round(stopped, 3), "memorySeconds": round(t_mem - t0, 3),
                "stateBytes": (target / STATE_FILE).stat().st_size, "shape": snapshot_shape(sup.launch.argv),
                "memory": memory_form(sup.state.boot_mode), "setupDone": sup.state.setup_done,
                "memoryMiB": memory_of(sup.launch.argv)}
    try:
        reply = await asyncio.to_thread(run)
    except (OSError, QmpError, HostError) as exc:
        return {"ok": False, "error": f"saving the snapshot failed: {exc}"}
    finally:
        sup.snapshotting = False
        sup.pings.clear()  # the guest could not answer pings while stopped
    sup.serial_note(f"snapshot saved (VM stopped {reply['stoppedSeconds']} s)")
    return reply
