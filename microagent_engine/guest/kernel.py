"""The guest kernel: install Debian's cloud kernel on first need, or use one the user names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import KERNEL_ENV
from ..errors import HostError, NotFound
from ..fsutil import build_once, file_lock
from ..hostinfo import require_tool

DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
# magic bytes of the payload compressions a bzImage may carry, with the tool that unpacks each
_COMPRESSIONS = [
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]),
    (b"\xfd7zXZ\x00", ["xz", "-dcq"]),
    (b"\x1f\x8b\x08", ["gzip", "-dcq"]),
]


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel: an uncompressed ELF ``vmlinux`` (PVH entry) and, if modular, its modules tree."""

    path: Path
    release: str
    modules_dir: Path | None

    def module(self, name: str) -> Path | None:
        """Path of module ``name`` (e.g. ``virtio_blk``) under the modules tree, if there is one."""
        if not self.modules_dir:
            return None
        for suffix in (".ko", ".ko.xz", ".ko.zst"):
            hits = (list(self.modules_dir.rglob(name + suffix))
                    + list(self.modules_dir.rglob(name.replace("_", "-") + suffix)))
            if hits:
                return hits[0]
        return None


def kernels_dir(state_dir: Path) -> Path:
    return state_dir / "kernels"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF vmlinux inside a bzImage (or the input itself if it already is ELF)."""
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    for magic, cmd in _COMPRESSIONS:
        off = bzimage.find(magic)
        if off < 0 or not shutil.which(cmd[0]):
            continue
        # decompressors complain about the trailing bytes after the payload; the output is still whole
        out = subprocess.run(cmd, input=bzimage[off:], capture_output=True).stdout
        if out[:4] == b"\x7fELF":
            return out
    raise HostError("could not extract an ELF vmlinux from the kernel image; install lz4, zstd, xz-utils and gzip "
                    "(apt-get install -y lz4 zstd xz-utils gzip) or pass --kernel PATH to an uncompressed vmlinux")


def resolve_kernel(state_dir: Path, override: str | os.PathLike[str] | None = None,
                   progress: Callable[[str], None] | None = None) -> Kernel:
    """The kernel to boot: ``override`` / $MICROAGENT_KERNEL if given, else the default (installed if missing)."""
    chosen = override or os.environ.get(KERNEL_ENV)
    if chosen:
        return _user_kernel(state_dir, Path(chosen).expanduser())
    installed = installed_default_kernel(state_dir)
    return installed or install_default_kernel(state_dir, progress)


def installed_default_kernel(state_dir: Path) -> Kernel | None:
    marker = kernels_dir(state_dir) / "default"
    if not marker.exists():
        return None
    release = marker.read_text().strip()
    root = kernels_dir(state_dir) / release
    if not (root / "vmlinux").exists():
        return None
    return Kernel(root / "vmlinux", release, root / "modules")


def _user_kernel(state_dir: Path, path: Path) -> Kernel:
    if not path.is_file():
        raise NotFound(f"kernel {path} does not exist; pass --kernel PATH to a vmlinux or bzImage file")
    data = path.read_bytes()
    release = _release_of(data) or "unknown"
    if data[:4] != b"\x7fELF":
        cached = kernels_dir(state_dir) / "user" / f"{path.name}-{os.stat(path).st_mtime_ns}.vmlinux"
        path = build_once(cached, lambda target: target.write_bytes(extract_vmlinux(data)), f"kernel {path.name}")
    env_mods = os.environ.get("MICROAGENT_KERNEL_MODULES")
    mods = Path(env_mods) if env_mods else path.parent / "modules"
    return Kernel(path, release, mods if mods.is_dir() else None)


def _release_of(data: bytes) -> str | None:
    m = re.search(rb"Linux version (\S+)", data)
    return m.group(1).decode() if m else None


def install_default_kernel(state_dir: Path, progress: Callable[[str], None] | None = None) -> Kernel:
    """Fetch Debian's cloud kernel with ``apt-get download`` and unpack it (no root install) under the state dir."""
    say = progress or (lambda _msg: None)
    kdir = kernels_dir(state_dir)
    with file_lock(kdir / ".lock", what="kernel install"):
        done = installed_default_kernel(state_dir)
        if done:
            return done
        require_tool("apt-get")
        require_tool("dpkg")
        deps = subprocess.run(["apt-cache", "depends", DEFAULT_KERNEL_PACKAGE], capture_output=True, text=True)
        m = re.search(r"Depends:\s+(linux-image-\d\S*)", deps.stdout)
        if not m:
            raise HostError(f"apt does not know {DEFAULT_KERNEL_PACKAGE}; run 'apt-get update' (Debian host), "
                            "or pass --kernel PATH (or set MICROAGENT_KERNEL)")
        package = m.group(1)
        release = package.removeprefix("linux-image-")
        say(f"Installing guest kernel {release} (apt-get download {package})")
        with tempfile.TemporaryDirectory(dir=kdir, prefix=".install-") as tmp:
            dl = subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package],
                                cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if dl.returncode != 0 or not debs:
                raise HostError(f"apt-get download {package} failed: {dl.stderr.strip()[-300:]}; "
                                "run 'apt-get update' or pass --kernel PATH")
            unpacked = Path(tmp) / "x"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True)
            vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"))
            staged = Path(tmp) / release
            staged.mkdir()
            (staged / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
            shutil.copy2(vmlinuz, staged / "vmlinuz")
            mods = unpacked / "lib" / "modules" / release
            if mods.is_dir():
                os.rename(mods, staged / "modules")
            final = kdir / release
            if final.exists():
                shutil.rmtree(final)
            os.rename(staged, final)
        tmp_marker = kdir / ".default.tmp"
        tmp_marker.write_text(release + "\n")
        os.replace(tmp_marker, kdir / "default")
        say(f"Guest kernel {release} installed in {final}")
        return Kernel(final / "vmlinux", release, final / "modules")
