"""The backend interface: what a hypervisor must offer the supervisor."""

from __future__ import annotations

import abc
import os
import socket
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


@dataclass
class FdCommand:
    """A hypervisor argv rewritten to use only inherited file descriptors and jail paths, so a process that
    sees none of the host's files (and may not open them) can run it. Owns the descriptors until closed."""

    argv: list[str]
    pass_fds: list[int]  # inherited by the hypervisor: disks, connected chardevs, listening QMP socket
    binds_ro: list[tuple[str, str]]  # (host path, jail path) the hypervisor opens by name (kernel, initrd)
    chardevs: dict[str, socket.socket]  # chardev id -> the supervisor's end of a connected socket pair
    devices: list[str]  # host device nodes the hypervisor opens by name (/dev/kvm)
    largest_file: int  # bytes: the largest file it writes through (RLIMIT_FSIZE must not be below it)
    listeners: list[tuple[socket.socket, Path]] = field(default_factory=list)
    binds_rw: list[tuple[str, str]] = field(default_factory=list)  # (host path, jail path) opened for writing
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the hypervisor (LD_PRELOAD)
    incoming_fd: int | None = None  # the hypervisor's descriptor number of a saved VM state to restore

    def close_child_ends(self) -> None:
        """Close the descriptors handed to the hypervisor (after it was spawned)."""
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pass_fds = []

    def close(self) -> None:
        """Release everything: child ends, supervisor ends, listening sockets and their paths."""
        self.close_child_ends()
        for sock in self.chardevs.values():
            sock.close()
        for sock, path in self.listeners:
            sock.close()
            path.unlink(missing_ok=True)
        self.listeners = []


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

    def fd_command(self, argv: list[str]) -> FdCommand:
        """Rewrite :meth:`command`'s argv to inherited descriptors (for a jailed hypervisor)."""
        raise NotImplementedError(f"backend {self.name} cannot run confined yet")
