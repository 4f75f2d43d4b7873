"""QEMU backend: ``-M microvm`` with virtio-mmio devices, KVM or TCG.

Measured on a 2-core TCG host: microvm under TCG boots the Debian cloud kernel to the agent in ~3.3 s; an
uncompressed PVH vmlinux and an uncompressed cpio save ~0.4 s; ``tsc_early_khz`` is required under TCG.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from ..config import QEMU_ENV
from ..hostinfo import AccelChoice, require_tool, tsc_khz
from ..protocol import AGENT_PORT_NAME, MEDIATION_PORT_NAME, NetworkMode
from .base import Backend, FdCommand, VMSpec

#: QEMU's own seccomp filter (measured here: Seccomp 2). It must not be combined with -runas: privileges are
#: dropped before exec by the jail instead (with -runas, elevateprivileges=deny killed QEMU by SIGSYS).
SANDBOX_ARGS = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
JAIL_KERNEL = "/vm/kernel"
JAIL_INITRD = "/vm/initrd"
JAIL_MEMORY = "/vm/memory"  # a template's guest RAM file (memory-backend-file needs a path, not a descriptor)
JAIL_RO_OPEN = "/vm/ro-open.so"  # makes QEMU open JAIL_MEMORY read-only for a copy-on-write clone
RO_OPEN_NAME = "ro-open.so"  # the shim's file name, beside the template's RAM file
#: a drive option the guest never sees (not part of a snapshot's or template's machine shape)
DROP_CACHE_OFF = "file.drop-cache=off"
#: the id of the file-backed RAM object of templates and clones
MEMORY_ID = "ram0"

FAST_BOOT_ARGS = [
    "console=ttyS0", "reboot=t", "panic=-1", "quiet", "pci=off", "cryptomgr.notests", "mitigations=off",
    "i8042.noaux", "i8042.nokbd", "nowatchdog", "init_on_alloc=0", "audit=0", "lsm=capability",
    "rcupdate.rcu_expedited=1", "8250.nr_uarts=1",
]


def tcg_tb_size(memory_mib: int) -> int:
    """TCG's translation cache (MiB) for a guest of ``memory_mib``. QEMU 7.2 reserves 1 GiB and its PSS grows with
    the code the guest runs. Measured here (tiny clone, a few execs; QEMU PSS): default 79 MiB, 64 → 79, 32 → 78,
    16 → 68, 8 → 58: 32 MiB holds a tiny guest's working set and bounds what a busy one can grow to. A Python
    guest's does not fit (CPython, numpy, pandas, matplotlib, IPython): the full cache is flushed and code
    translated again. In a cold ``small`` guest (the default profile), importing pandas, pyplot and IPython took
    25.8/19.3 s at 32 MiB and 19.7/16.6 s at 128; a matplotlib figure 1.45–1.56 s at 32 and 0.57–1.03 s at 64–256;
    the process held ~100 MiB more afterwards (RSS 362 → 462 MiB). Larger guests get 128 MiB."""
    return 32 if memory_mib <= 256 else 128


class QemuBackend(Backend):
    name = "qemu"

    def binary(self) -> str:
        return os.environ.get(QEMU_ENV) or require_tool("qemu-system-x86_64")

    def version(self) -> str:
        out = subprocess.run([self.binary(), "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else "unknown"

    def guest_modules(self) -> list[str]:
        return ["virtio_mmio", "virtio_blk", "virtio_console", "virtio_net"]

    def kernel_args(self, accel: AccelChoice) -> list[str]:
        args = list(FAST_BOOT_ARGS)
        if accel.accel == "tcg":
            # the TSC as clocksource (the kernel distrusts TCG's and would run on jiffies, where an idle tick never
            # stops), with low-resolution timers: high-resolution ones reprogram the emulated LAPIC for every
            # timer, which made a Jupyter round trip ~10 % slower (README, "The sandboxed kernel")
            args += [f"tsc_early_khz={tsc_khz()}", "tsc=reliable", "highres=off"]
        return args

    def command(self, spec: VMSpec) -> list[str]:
        kvm = spec.accel.accel == "kvm"
        cmd = [
            self.binary(),
            "-M", "microvm,x-option-roms=off,pit=off,pic=off",
            "-accel", "kvm" if kvm else f"tcg,tb-size={tcg_tb_size(spec.memory_mib)}",
            "-cpu", "host" if kvm else "max",
            "-m", str(spec.memory_mib),
            "-smp", str(spec.cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(spec.kernel),
            "-initrd", str(spec.initramfs),
            "-append", spec.cmdline,
            "-chardev", f"socket,id=ser0,path={spec.serial_socket}",
            "-serial", "chardev:ser0",
            "-chardev", f"socket,id=qmp,path={spec.control_socket},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        for i, disk in enumerate(spec.disks):
            ro = ",read-only=on" if disk.read_only else ""
            # file.locking=off: QEMU's image locks would guard an image against a second QEMU, which the engine
            # already rules out (each VM gets descriptors its supervisor opened; the workspace lock and the volume
            # registry's single attach). With an fd set holding a read-write and a read-only descriptor (two open
            # file descriptions) QEMU's own locks conflict with each other when it re-activates the disk after a
            # migration (the 'cont' after a workspace snapshot: "Failed to get shared write lock").
            # file.drop-cache=off: a restored VM (template clone, snapshot) would otherwise drop the image's page
            # cache when it activates the disk, as if another host had written it; each image here is private to
            # its VM, and dropping a just-copied image first writes all of it back (0.6 s for the Python image).
            cmd += ["-drive", f"id=disk{i},file={disk.path},format=raw,if=none,cache=writeback,discard=unmap,"
                              f"file.locking=off,{DROP_CACHE_OFF}{ro}",
                    "-device", f"virtio-blk-device,drive=disk{i}" + (f",serial={disk.serial}" if disk.serial else "")]
        cmd += [
            "-device", "virtio-serial-device,id=vser0",
            "-chardev", f"socket,id=agent,path={spec.agent_socket}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]
        if spec.mediation_socket is not None:
            cmd += ["-chardev", f"socket,id=mediation,path={spec.mediation_socket}",
                    "-device", f"virtserialport,bus=vser0.0,chardev=mediation,name={MEDIATION_PORT_NAME}"]
        if spec.network == NetworkMode.USER:
            cmd += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
        return cmd

    @staticmethod
    def held_argv(argv: list[str]) -> list[str]:
        """``argv`` with the vCPUs held at start (``-S``) until QMP ``cont``: nothing of the guest runs before."""
        return argv if "-S" in argv else [*argv, "-S"]

    @staticmethod
    def memory_file_argv(argv: list[str], memory_mib: int, mem_path: Path, share: bool,
                         incoming: Path | None = None) -> list[str]:
        """``argv`` with guest RAM in ``mem_path``: ``share=True`` for a template (its RAM is written to the file),
        ``False`` for a clone (the file mapped copy-on-write, ``incoming`` the device state it restores)."""
        out = list(argv)
        i = out.index("-M")
        out[i + 1] += f",memory-backend={MEMORY_ID}"
        out[i + 2:i + 2] = ["-object", f"memory-backend-file,id={MEMORY_ID},size={memory_mib}M,mem-path={mem_path},"
                                       f"share={'on' if share else 'off'}"]
        return QemuBackend.incoming_argv(out, incoming) if incoming is not None else out

    @staticmethod
    def overlay_argv(argv: list[str], root: str, overlay: str, base: str) -> list[str]:
        """``argv`` with the drive of ``root`` replaced by a qcow2 ``overlay`` whose backing file is ``base``
        (read-only); neither drops the page cache at a restore (the base is every clone's): the guest sees the
        same disk (snapshots/overlay.py)."""
        out = list(argv)
        for i, value in enumerate(out):
            if i and out[i - 1] == "-drive" and f"file={root}" in value.split(","):
                keep = [o for o in value.split(",") if not o.startswith(("file=", "format=", "file."))]
                out[i] = ",".join([*keep, "driver=qcow2", "file.driver=file", f"file.filename={overlay}",
                                   "file.locking=off", DROP_CACHE_OFF, "backing.driver=raw",
                                   "backing.file.driver=file", f"backing.file.filename={base}",
                                   "backing.read-only=on", "backing.file.locking=off",
                                   "backing.file.drop-cache=off"])
        return out

    @staticmethod
    def ram_backend_argv(argv: list[str], memory_mib: int) -> list[str]:
        """``argv`` with anonymous guest RAM under the id templates and clones use (MEMORY_ID): a VM restored from
        a snapshot of a template clone needs the RAM block its migration stream names."""
        out = list(argv)
        i = out.index("-M")
        out[i + 1] += f",memory-backend={MEMORY_ID}"
        out[i + 2:i + 2] = ["-object", f"memory-backend-ram,id={MEMORY_ID},size={memory_mib}M"]
        return out

    @staticmethod
    def incoming_argv(argv: list[str], state: Path) -> list[str]:
        """``argv`` restoring the migration stream in file ``state`` (:meth:`fd_command` passes it as a
        descriptor and the supervisor restores it through QMP)."""
        return [*argv, "-incoming", f"exec:cat {state}"]

    def fd_command(self, argv: list[str]) -> FdCommand:
        """Rewrite :meth:`command`'s argv: drives become ``-add-fd`` sets of pre-opened files, chardev sockets
        become connected socket pairs (the supervisor keeps one end), the QMP chardev a listening socket the
        supervisor bound; kernel and initrd are named by their jail paths; QEMU's seccomp sandbox is added."""
        out = FdCommand(argv=[argv[0]], pass_fds=[], binds_ro=[], chardevs={}, devices=[], largest_file=0)
        try:
            i = 1
            while i < len(argv):
                opt = argv[i]
                val = argv[i + 1] if i + 1 < len(argv) else ""
                if opt == "-kernel":
                    out.binds_ro.append((val, JAIL_KERNEL))
                    out.argv += [opt, JAIL_KERNEL]
                elif opt == "-initrd":
                    out.binds_ro.append((val, JAIL_INITRD))
                    out.argv += [opt, JAIL_INITRD]
                elif opt == "-drive":
                    out.argv += ["-drive", self._drive_by_fd(val, out)]
                elif opt == "-chardev" and val.startswith("socket,"):
                    out.argv += ["-chardev", self._chardev_by_fd(val, out)]
                elif opt == "-object" and val.startswith("memory-backend-file,"):
                    out.argv += [opt, self._memory_by_bind(val, out)]
                elif opt == "-incoming" and val.startswith("exec:cat "):
                    # QEMU's seccomp denies spawning `cat`: hand over the state file and restore it through QMP
                    fd = os.open(val[len("exec:cat "):], os.O_RDONLY | os.O_CLOEXEC)
                    out.pass_fds.append(fd)
                    out.incoming_fd = fd
                    out.argv += [opt, "defer"]
                elif opt == "-accel" and val == "kvm":
                    out.devices.append("/dev/kvm")
                    out.argv += [opt, val]
                else:
                    out.argv.append(opt)
                    i += 1
                    continue
                i += 2
        except BaseException:
            out.close()
            raise
        out.argv += SANDBOX_ARGS
        return out

    @staticmethod
    def _drive_by_fd(value: str, out: FdCommand) -> str:
        """Each file of a drive (``file=``; an overlay's ``file.filename=`` and ``backing.file.filename=``) as an
        fd set of descriptors the supervisor opened: read-only ones only for a read-only drive or a backing file."""
        opts = value.split(",")
        read_only = "read-only=on" in opts
        rewritten = []
        for opt in opts:
            key, _, path = opt.partition("=")
            if key not in ("file", "file.filename", "backing.file.filename"):
                rewritten.append(opt)
                continue
            fdset = len({a.rsplit("set=", 1)[1] for a in out.argv if a.startswith("fd=") and ",set=" in a}) + 1
            # QEMU picks the descriptor whose access mode matches each open it does: both for a writable file
            modes = [os.O_RDONLY] if read_only or key.startswith("backing.") else [os.O_RDWR, os.O_RDONLY]
            for mode in modes:
                fd = os.open(path, mode | os.O_CLOEXEC)
                out.pass_fds.append(fd)
                out.argv += ["-add-fd", f"fd={fd},set={fdset}"]
            size = os.fstat(out.pass_fds[-1]).st_size
            # an overlay grows up to its backing file's size plus qcow2 metadata (L2 tables, refcount blocks)
            grows = size + size // 32 + (8 << 20) if key.startswith("backing.") else size
            out.largest_file = max(out.largest_file, grows)
            rewritten.append(f"{key}=/dev/fdset/{fdset}")
        return ",".join(rewritten)

    @staticmethod
    def _memory_by_bind(value: str, out: FdCommand) -> str:
        """A template's RAM file is bound writable into the jail; a clone's read-only, and the ro-open shim makes
        QEMU 7.2 (which opens the file O_RDWR even for share=off) open it read-only: a clone can then never
        write into, or punch holes in (a balloon discard would), the file other clones map."""
        opts = value.split(",")
        path = next(o[9:] for o in opts if o.startswith("mem-path="))
        if "share=on" in opts:
            out.binds_rw.append((path, JAIL_MEMORY))
        else:
            out.binds_ro.append((path, JAIL_MEMORY))
            out.binds_ro.append((str(Path(path).with_name(RO_OPEN_NAME)), JAIL_RO_OPEN))
            out.env["LD_PRELOAD"] = JAIL_RO_OPEN
            out.env["MICROAGENT_RO_OPEN"] = JAIL_MEMORY
        return ",".join(f"mem-path={JAIL_MEMORY}" if o.startswith("mem-path=") else o for o in opts)

    @staticmethod
    def _chardev_by_fd(value: str, out: FdCommand) -> str:
        opts = value.split(",")
        cid = next(o[3:] for o in opts if o.startswith("id="))
        path = next(o[5:] for o in opts if o.startswith("path="))
        if "server=on" in opts:  # QEMU listens (QMP): the supervisor binds the path and hands over the socket
            Path(path).unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            out.listeners.append((listener, Path(path)))
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(8)
            fd = os.dup(listener.fileno())
        else:  # QEMU would connect: give it one end of a connected pair instead
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            out.chardevs[cid] = ours
            fd = theirs.detach()
        out.pass_fds.append(fd)
        return ",".join(f"fd={fd}" if o.startswith("path=") else o for o in opts)
