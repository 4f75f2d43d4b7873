"""Facts about the host: tools on PATH, CPU virtualization, accelerator choice."""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import ACCEL_CHOICES, ACCEL_ENV
from .errors import HostError, InvalidArgument

#: tool -> the Debian install step that provides it
INSTALL_HINTS: dict[str, str] = {
    "qemu-system-x86_64": "apt-get install -y --no-install-recommends qemu-system-x86",
    "mkfs.ext4": "apt-get install -y e2fsprogs",
    "debugfs": "apt-get install -y e2fsprogs",
    "dumpe2fs": "apt-get install -y e2fsprogs",
    "e2fsck": "apt-get install -y e2fsprogs",
    "resize2fs": "apt-get install -y e2fsprogs",
    "busybox": "apt-get install -y busybox-static",
    "gcc": "apt-get install -y gcc libc6-dev",
    "lz4": "apt-get install -y lz4",
    "apt-get": "use a Debian/Ubuntu host, or pass --kernel PATH (or set MICROAGENT_KERNEL) to a vmlinux",
    "dpkg": "apt-get install -y dpkg",
    "slirp4netns": "apt-get install -y --no-install-recommends slirp4netns",
    "nft": "apt-get install -y --no-install-recommends nftables",
    "mmdebstrap": "apt-get install -y --no-install-recommends mmdebstrap (builds the built-in Python image)",
}


def require_tool(name: str) -> str:
    """Path of ``name`` on PATH (also /sbin dirs), or HostError naming the install step."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # e2fsprogs live in sbin
    if not path:
        hint = INSTALL_HINTS.get(name, f"install {name}")
        raise HostError(f"{name} not found on this host; install it: {hint}")
    return path


def is_static_elf(path: str | Path) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP segment (no dynamic loader needed)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def tsc_khz() -> int:
    """Host TSC frequency in kHz (guests need ``tsc_early_khz`` under TCG or they hang calibrating)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def kvm_usable() -> tuple[bool, str]:
    """Whether KVM can boot a stock kernel here, and why (not)."""
    flags = cpu_flags()
    if Path("/sys/module/kvm_pvm").exists():
        return False, "/dev/kvm is kvm_pvm (cannot boot stock kernels)"
    if not ({"vmx", "svm"} & flags):
        return False, "CPU has no hardware virtualization (no vmx/svm flag)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened ({exc.strerror})"
    return True, "CPU has hardware virtualization and /dev/kvm opens"


def choose_accel(preference: str | None = None) -> AccelChoice:
    """Pick KVM where it works, else TCG; ``preference`` (or $MICROAGENT_ACCEL) may force one."""
    pref = (preference or os.environ.get(ACCEL_ENV) or "auto").lower()
    if pref not in ACCEL_CHOICES:
        raise InvalidArgument(f"unknown accelerator {pref!r}; use auto, kvm or tcg")
    ok, why = kvm_usable()
    if pref == "tcg":
        return AccelChoice("tcg", "requested")
    if pref == "kvm":
        if not ok:
            raise HostError(f"KVM was requested but {why}; use --accel tcg (software emulation)")
        return AccelChoice("kvm", "requested")
    return AccelChoice("kvm", why) if ok else AccelChoice("tcg", f"software emulation: {why}")


