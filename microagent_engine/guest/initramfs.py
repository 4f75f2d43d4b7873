"""Build (and cache by content hash) the guest agent binary and the initramfs that boots into it."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from ..errors import HostError
from ..fsutil import build_once
from ..hostinfo import is_static_elf, require_tool
from ..protocol import C_HEADER_NAME, MODULES_ORDER, render_c_header
from .kernel import Kernel

AGENT_SOURCE = "agent.c"


def cache_dir(state_dir: Path) -> Path:
    return state_dir / "cache"


def agent_source() -> bytes:
    return resources.files(__package__).joinpath(AGENT_SOURCE).read_bytes()


def protocol_headers() -> dict[str, bytes]:
    """The generated C header of the wire protocol (``#include "protocol.h"``), by file name."""
    return {C_HEADER_NAME: render_c_header().encode()}


def compile_static(state_dir: Path, source: bytes, name: str, headers: Mapping[str, bytes] | None = None) -> Path:
    """Compile C ``source`` (with ``headers`` written beside it) into a static binary, once per content hash.

    The binary is ``<state_dir>/cache/<name>-<hash>``, the hash covering the source and every header's name
    and text, built once (concurrent first uses wait for it); a failed build raises HostError with gcc's messages.
    """
    files = {f"{name}.c": source, **(headers or {})}
    h = hashlib.sha256()
    for fname in sorted(files):
        h.update(f"{fname}\0{len(files[fname])}\0".encode())
        h.update(files[fname])

    def build(target: Path) -> None:
        gcc = require_tool("gcc")
        for fname, body in files.items():
            (target.parent / fname).write_bytes(body)
        proc = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(target), str(target.parent / f"{name}.c")],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise HostError(f"compiling {name} failed (need a static libc: apt-get install -y gcc "
                            f"libc6-dev):\n{proc.stderr[-2000:]}")

    return build_once(cache_dir(state_dir) / f"{name}-{h.hexdigest()[:16]}", build, f"the {name} binary")


def build_agent(state_dir: Path) -> Path:
    """Compile the static guest agent once per content hash (agent.c and protocol.h); return the binary's path."""
    return compile_static(state_dir, agent_source(), "agent", protocol_headers())


def busybox_path() -> Path:
    """A statically linked busybox (Debian's busybox-static)."""
    for cand in (os.environ.get("MICROAGENT_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and Path(cand).exists() and is_static_elf(cand):
            return Path(cand)
    raise HostError("no statically linked busybox found; install it: apt-get install -y busybox-static")


def module_order(kernel: Kernel, wanted: list[str]) -> list[Path]:
    """``wanted`` modules plus their dependencies (read from each .ko's modinfo), dependencies first."""
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        path = kernel.module(name)
        if path is None:
            return  # built into the kernel, or not available: the guest reports what it lacks
        m = re.search(rb"depends=([^\x00]*)\x00", path.read_bytes())
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


class _Cpio:
    """Minimal writer of the 'newc' cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(nm), 0))
        self.ino += 1
        self.data += hdr.encode() + nm
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.data += b"\0" * (-len(self.data) % 512)
        return bytes(self.data)


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def build_initramfs(state_dir: Path, kernel: Kernel, modules: list[str]) -> Path:
    """The initramfs for ``kernel``: agent as /init, busybox (rescue tools), the modules in load order."""
    agent = build_agent(state_dir)  # its file name carries its source hash
    busybox = busybox_path()
    # cheap cache key (this runs on every start): identities and stats, not contents
    h = hashlib.sha256(repr([str(agent), _stat_key(busybox), _stat_key(kernel.path), str(kernel.modules_dir),
                             sorted(modules)]).encode())

    def build(target: Path) -> None:
        mods = module_order(kernel, modules)
        cpio = _Cpio()
        for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        cpio.file("init", agent.read_bytes(), 0o755)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        names = []
        for mod in mods:
            cpio.file(f"modules/{mod.name}", mod.read_bytes())
            names.append(f"modules/{mod.name}")
        cpio.file(MODULES_ORDER, ("\n".join(names) + "\n").encode())
        target.write_bytes(cpio.finish())

    return build_once(cache_dir(state_dir) / f"initramfs-{h.hexdigest()[:16]}.cpio", build, "the guest initramfs")
