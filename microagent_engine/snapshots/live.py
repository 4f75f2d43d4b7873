"""Workspace snapshots, the supervisor's side: save the running VM (RAM, device state and a copy of its root disk)
with its vCPUs stopped briefly, and the argv that restores a clone of it.

Save (QEMU 7.2): QMP ``stop``; migrate everything, RAM included (``x-ignore-shared`` off: a template clone's RAM
is a private mapping, which is migrated like anonymous RAM), to a file passed with ``getfd``; copy the root disk
(reflink where the filesystem can, else sparse) while QEMU holds it flushed and inactive after the migration;
``cont`` (QEMU re-activates the disks). A clone restores the stream into anonymous RAM (``-incoming defer`` +
``migrate-incoming fd:N``); its agent then gets CONFIG with the host's clock and a fresh RNG seed, as a template
clone does (guest/agent.c applies both at every CONFIG).

The same stop-and-save puts a workspace to sleep (supervisor/sleeping.py): RAM and device state, no disk copy,
and QEMU ends instead of continuing.

A VM started with its RAM in a shared file (:data:`RAM_FILE_KEY`, ``Engine.start(ram_file=True)``: the warm
Python snapshot's build) is saved differently: only its device state goes into the stream (``x-ignore-shared``),
the RAM file becomes the snapshot's ``memory`` and the VM is killed (it must never write into that file again).
Its clones map ``memory`` copy-on-write as template clones do (no RAM is copied: the restore is ~0.05 s and the
unchanged pages are shared between clones in the page cache).

Limits: a command the host was running in the workspace at snapshot time keeps running in the clone, but its output
has no reader there (the clone's supervisor drops its frames and counts them as ``droppedFrames``); published
ports and network connections are not carried over.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.qemu import RO_OPEN_NAME, QemuBackend
from ..errors import HostError
from ..backends.qmp import QmpError, QmpSession, ignore_shared_caps
from ..states import allows, refusal
from .shim import ro_open_library
from .templates import memory_of, seal_ram_file, shape_of

if TYPE_CHECKING:
    from ..supervisor.roles import LiveVM

#: files of a snapshot directory (``<state-dir>/snapshots/<name>/``)
STATE_FILE = "state"
ROOTFS_FILE = "rootfs.ext4"
MEMORY_FILE = "memory"  # the RAM of a snapshot taken of a VM whose RAM was a file
RAM_FILE = "ram"  # in the workspace's directory: that file while its VM runs
#: the launch's ``extra`` key of a boot whose RAM is the shared file it names (a cold boot; see the docstring)
RAM_FILE_KEY = "ramFile"
#: the launch's ``extra`` key of a workspace's first start after ``create --from-snapshot``:
#: ``{"state": <stream file>, "memory": "ram"|"default"|"file", "snapshot": <name>, "ramFile": <its memory>}``
RESTORE_KEY = "restoreSnapshot"
#: QEMU 7.2 rate-limits migrations to 32 MiB/s by default; a snapshot of a stopped VM wants the disk's speed
MIGRATION_PARAMS = {"max-bandwidth": 1 << 40, "downtime-limit": 2000}


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
    if restore.get("memory") == "file":
        return QemuBackend.memory_file_argv(argv, memory_of(argv), Path(restore["ramFile"]), share=False,
                                            incoming=Path(restore["state"]))
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


def stop_and_save(sup: LiveVM, state_file: Path, *, ignore_shared: bool, disk: Path | None,
                   cont: str) -> tuple[float, float]:
    """Stop the VM (unless paused), migrate it into ``state_file`` (device state, and RAM unless ``ignore_shared``:
    RAM that is a shared file stays there), copy its root disk to ``disk``; then continue it as ``cont`` says:
    ``always`` or ``on-error`` (it is ended next on success). Runs in a thread; (seconds stopped, of them memory)."""
    was_paused = sup.state.state == "paused"
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    done = False
    try:
        with QmpSession(sup.ws.qmp_socket, timeout=300) as qmp:
            t0 = time.monotonic()
            if not was_paused:
                qmp.command("stop")
            try:
                qmp.command("migrate-set-capabilities", ignore_shared_caps(ignore_shared))
                qmp.command("migrate-set-parameters", MIGRATION_PARAMS)
                qmp.command("getfd", {"fdname": "state"}, fds=[fd])
                qmp.command("migrate", {"uri": "fd:state"})
                qmp.wait_migration(timeout=300)
                t_mem = time.monotonic()
                if disk is not None:
                    copy_disk(sup.ws.rootfs, disk)
                done = True
            finally:
                if not was_paused and (cont == "always" or (cont == "on-error" and not done)):
                    qmp.command("cont")
            stopped = time.monotonic() - t0
        os.fsync(fd)
    finally:
        os.close(fd)
    return stopped, t_mem - t0


async def save(sup: LiveVM, target: Path) -> dict[str, Any]:
    """Save the supervisor's running (or paused) VM into the directory ``target``; the reply to the control op."""
    state = sup.state.state
    if not allows("snapshot", state):
        return {"ok": False, "error": refusal("snapshot", state, sup.ws.name)}
    if sup.snapshotting:
        return {"ok": False, "error": "a snapshot of this workspace is being taken; wait for it"}
    if not target.is_dir():
        return {"ok": False, "error": f"snapshot directory {target} does not exist"}
    ram_file = Path(sup.ram_file) if sup.ram_file else None  # the RAM stays in its file, the VM ends
    sup.snapshotting = True

    def run() -> dict[str, Any]:
        stopped, memory_seconds = stop_and_save(sup, target / STATE_FILE, ignore_shared=ram_file is not None,
                                                 disk=target / ROOTFS_FILE, cont="on-error" if ram_file else "always")
        return {"ok": True, "stoppedSeconds": round(stopped, 3), "memorySeconds": round(memory_seconds, 3),
                "stateBytes": (target / STATE_FILE).stat().st_size, "shape": snapshot_shape(sup.launch.argv),
                "memory": "file" if ram_file else memory_form(sup.state.boot_mode), "setupDone": sup.state.setup_done,
                "memoryMiB": memory_of(sup.launch.argv)}
    try:
        import asyncio  # (the supervisor's side: the engine imports this module without it)

        reply = await asyncio.to_thread(run)
        if ram_file is not None:
            await sup.end_vm("kill")  # before the file is shared: this VM never writes into it again
            seal_ram_file(ram_file)
            link_or_copy(ram_file, target / MEMORY_FILE)
            link_or_copy(ro_open_library(sup.ws.path.parent.parent / "cache"), target / RO_OPEN_NAME)
    except (OSError, QmpError, HostError) as exc:
        return {"ok": False, "error": f"saving the snapshot failed: {exc}"}
    finally:
        sup.snapshotting = False
        sup.pings.clear()  # the guest could not answer pings while stopped
    ended = ", its RAM kept in the snapshot's memory file, the VM ended" if ram_file else ""
    sup.serial_note(f"snapshot saved (VM stopped {reply['stoppedSeconds']} s{ended})")
    return reply


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across filesystems), keeping its mode."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        copy_disk(src, dst)
        os.chmod(dst, os.stat(src).st_mode & 0o777)
