"""QEMU backend: ``-M microvm`` with virtio-mmio devices, KVM or TCG.

Measured here (DESIGN.md): microvm under TCG boots the Debian cloud kernel to the agent in ~3.3 s; an
uncompressed PVH vmlinux and an uncompressed cpio save ~0.4 s; ``tsc_early_khz`` is required under TCG.
"""

from __future__ import annotations

import os
import subprocess

from ..config import QEMU_ENV
from ..hostinfo import AccelChoice, require_tool, tsc_khz
from ..protocol import AGENT_PORT_NAME, MEDIATION_PORT_NAME
from .base import Backend, VMSpec

FAST_BOOT_ARGS = [
    "console=ttyS0", "reboot=t", "panic=-1", "quiet", "pci=off", "cryptomgr.notests", "mitigations=off",
    "i8042.noaux", "i8042.nokbd", "nowatchdog", "init_on_alloc=0", "audit=0", "lsm=capability",
    "rcupdate.rcu_expedited=1", "8250.nr_uarts=1",
]


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
            args.append(f"tsc_early_khz={tsc_khz()}")
        return args

    def command(self, spec: VMSpec) -> list[str]:
        kvm = spec.accel.accel == "kvm"
        cmd = [
            self.binary(),
            "-M", "microvm,x-option-roms=off,pit=off,pic=off",
            "-accel", "kvm" if kvm else "tcg",
            "-cpu", "host" if kvm else "max",
            "-m", str(spec.memory_mib),
            "-smp", str(spec.cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(spec.kernel),
            "-initrd", str(spec.initramfs),
            "-append", spec.cmdline,
            "-chardev", f"socket,id=ser0,path={spec.serial_socket}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{spec.control_socket},server=on,wait=off",
        ]
        for i, disk in enumerate(spec.disks):
            ro = ",read-only=on" if disk.read_only else ""
            cmd += ["-drive", f"id=disk{i},file={disk.path},format=raw,if=none,cache=writeback,discard=unmap{ro}",
                    "-device", f"virtio-blk-device,drive=disk{i}" + (f",serial={disk.serial}" if disk.serial else "")]
        cmd += [
            "-device", "virtio-serial-device,id=vser0",
            "-chardev", f"socket,id=agent,path={spec.agent_socket}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]
        if spec.mediation_socket is not None:
            cmd += ["-chardev", f"socket,id=mediation,path={spec.mediation_socket}",
                    "-device", f"virtserialport,bus=vser0.0,chardev=mediation,name={MEDIATION_PORT_NAME}"]
        if spec.network == "user":
            cmd += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
        return cmd + spec.extra_args
