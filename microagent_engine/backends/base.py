"""The backend interface: what a hypervisor must offer the supervisor."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from ..hostinfo import AccelChoice


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    read_only: bool = False
    serial: str = ""  # the guest finds the disk by this (/sys/block/vdX/serial), not by probe order


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to launch one VM. Sockets are listened on by the supervisor before launch."""

    kernel: Path
    initramfs: Path
    cmdline: str
    memory_mib: int
    cpus: int
    disks: list[DiskSpec]
    agent_socket: Path
    serial_socket: Path
    control_socket: Path  # QMP (or the backend's own control API)
    network: str  # "user" | "none"
    accel: AccelChoice
    mediation_socket: Path | None = None  # a second virtio-serial port for the mediation bridge
    extra_args: list[str] = field(default_factory=list)


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def binary(self) -> str:
        """Path of the hypervisor executable; HostError naming the install step if missing."""

    @abc.abstractmethod
    def command(self, spec: VMSpec) -> list[str]:
        """argv of the hypervisor process."""

    @abc.abstractmethod
    def guest_modules(self) -> list[str]:
        """Kernel modules the guest must load for this machine's devices, in any order."""

    @abc.abstractmethod
    def kernel_args(self, accel: AccelChoice) -> list[str]:
        """Kernel command-line arguments this machine needs."""

    @abc.abstractmethod
    def version(self) -> str:
        """Hypervisor version string (for doctor/status)."""
