"""Template snapshots: one per machine shape, restored by clones with their own disks.

A *shape* is everything about a VM that a restored guest has already seen: the hypervisor binary, kernel,
initramfs (hence the agent), kernel command line, memory, cpus, accelerator and the device layout (how many disks,
read-only or not, which chardevs, the NIC). It is the VM's argv with what differs per workspace taken out (disk
files, disk serials, socket paths, TCG's translation cache size) plus the identity (size, mtime) of every file it
names. Disks may differ between the template and its clones because the template is stopped at the agent's HELLO,
before the guest bound its disk driver to any disk (guest/agent.c binds the disks at the first CONFIG, in the bus's
order; the NIC, the same in every VM of a shape, is bound and configured at boot).

Files: ``<state-dir>/templates/<key>/{meta.json,state}`` (the device state, ~60 KB) and the guest RAM in
``/dev/shm/microagent-<state-dir hash>/<key>/memory`` (tmpfs; beside ``state`` where there is no /dev/shm), with
the ro-open shim beside it. ``meta.json`` is written last: a template without it is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.qemu import DROP_CACHE_OFF
from ..fsutil import private_dir, read_json, write_json_atomic
from ..records import now_iso

TEMPLATES_DIR = "templates"
#: the launch's ``extra`` key that forces a cold boot (``--cold``): no template is made or used
COLD_KEY = "cold"
SHM = Path("/dev/shm")


def _file_id(path: str) -> list[Any]:
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def shape_of(argv: list[str]) -> list[Any]:
    """The shape of the VM ``argv`` launches (see the module's docstring), as a JSON-able list."""
    shape: list[Any] = [_file_id(argv[0])]
    i = 1
    while i < len(argv):
        opt, val = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        if opt in ("-kernel", "-initrd"):
            shape += [opt, _file_id(val)]
        elif opt == "-drive":  # what the guest sees of it: not the file, nor how the host caches it
            shape += [opt, ",".join("file=DISK" if o.startswith("file=") else o for o in val.split(",")
                                    if o != DROP_CACHE_OFF)]
        elif opt == "-device" and val.startswith("virtio-blk-device"):
            shape += [opt, ",".join(o for o in val.split(",") if not o.startswith("serial="))]
        elif opt == "-chardev":
            shape += [opt, ",".join("path=SOCK" if o.startswith("path=") else o for o in val.split(","))]
        elif opt == "-accel":  # TCG's translation cache size is the host's JIT, nothing the guest has seen
            shape += [opt, ",".join(o for o in val.split(",") if not o.startswith("tb-size="))]
        elif opt.startswith("-"):
            shape += [opt, val] if not val.startswith("-") else [opt]
            i += 2 if not val.startswith("-") else 1
            continue
        else:
            shape.append(opt)
            i += 1
            continue
        i += 2
    return shape


def memory_of(argv: list[str]) -> int:
    """The guest memory (MiB) of ``argv``'s ``-m``."""
    return int(argv[argv.index("-m") + 1])


def vm_uid(supervisor_pid: int) -> int | None:
    """The uid the jail runs this supervisor's VM as (None: the caller's own, when not root)."""
    from ..sandbox.jail import JAIL_UID_BASE  # (the supervisor's side: the engine imports this module without it)

    return JAIL_UID_BASE + supervisor_pid if os.geteuid() == 0 else None


def new_ram_file(path: Path, memory_mib: int) -> None:
    """Create ``path`` (sparse, ``memory_mib`` MiB, 0600) as the RAM file a VM of this supervisor maps shared and
    writes into (owned by the jail's uid for it); an earlier file there is replaced."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory_mib << 20)
        uid = vm_uid(os.getpid())
        if uid is not None:
            os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def seal_ram_file(path: Path) -> None:
    """A RAM file whose VM is gone becomes read-only input for clones (other uids map it copy-on-write)."""
    os.chown(path, os.geteuid(), os.getegid())
    os.chmod(path, 0o644)


@dataclass(frozen=True)
class Template:
    key: str
    dir: Path  # <state-dir>/templates/<key>
    memory: Path  # the guest RAM file (tmpfs)
    shape: list[Any]
    memory_mib: int

    meta_file = property(lambda self: self.dir / "meta.json")
    state_file = property(lambda self: self.dir / "state")
    lock_file = property(lambda self: self.dir.parent / f"{self.key}.lock")

    def problem(self) -> str | None:
        """None if this template can be cloned; ``""`` if it does not exist yet; else what is wrong with it."""
        if not self.meta_file.exists():
            return ""
        try:
            meta = read_json(self.meta_file)
        except (OSError, ValueError) as exc:
            return f"its meta.json is unreadable ({exc})"
        if meta.get("shape") != self.shape:
            return "it was built for a different machine shape (kernel, initramfs, memory, cpus or devices)"
        if meta.get("memoryMiB") != self.memory_mib:
            return f"it was built for {meta.get('memoryMiB')} MiB of memory, this VM has {self.memory_mib} MiB"
        if not self.memory.exists():
            return f"its memory file {self.memory} is gone (tmpfs is emptied at reboot)"
        size = self.memory.stat().st_size
        if size != self.memory_mib << 20:
            return f"its memory file holds {size} bytes, {self.memory_mib << 20} expected"
        if not self.state_file.exists():
            return "its device state file is missing"
        return None

    def discard(self) -> None:
        """Remove this template's files (a broken one; the next start builds a new one)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.memory.parent, ignore_errors=True)

    def prepare_build(self) -> None:
        """Fresh directories for a build (any earlier, unfinished one removed); RAM files on tmpfs whose state
        dir is gone are swept (the tmpfs directory names its state dir in ``state-dir``)."""
        self.discard()
        private_dir(self.dir)
        private_dir(self.memory.parent)
        if self.memory.parent.parent.parent == SHM:
            (self.memory.parent.parent / "state-dir").write_text(str(self.dir.parent.parent.resolve()))
            sweep_orphans()

    def finish_build(self, seconds: float, state_bytes: int) -> None:
        write_json_atomic(self.meta_file, {"key": self.key, "shape": self.shape, "memoryMiB": self.memory_mib,
                                           "memoryFile": str(self.memory), "createdAt": now_iso(),
                                           "buildSeconds": round(seconds, 3), "stateBytes": state_bytes})


def template_for(state_dir: Path, argv: list[str]) -> Template:
    """The template (existing or not) for the shape of ``argv``."""
    shape = shape_of(argv)
    key = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:20]
    root = state_dir / TEMPLATES_DIR
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
        memory = SHM / f"microagent-{os.geteuid()}-{tag}" / key / "memory"
    else:
        memory = root / key / "ram" / "memory"
    return Template(key, root / key, memory, shape, memory_of(argv))


def list_templates(state_dir: Path) -> list[dict[str, Any]]:
    """meta.json of every finished template."""
    out = []
    for meta in sorted((state_dir / TEMPLATES_DIR).glob("*/meta.json")):
        try:
            out.append(read_json(meta))
        except (OSError, ValueError):
            continue
    return out


def sweep_orphans() -> list[Path]:
    """Remove this user's template RAM directories on tmpfs whose state dir no longer exists; what was removed."""
    removed = []
    for d in SHM.glob(f"microagent-{os.geteuid()}-*"):
        try:
            owner = Path((d / "state-dir").read_text().strip())
        except OSError:
            owner = None
        young = time.time() - d.stat().st_mtime < 60 if d.exists() else False  # a build that just began
        if not young and (owner is None or not (owner / TEMPLATES_DIR).is_dir()):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
