"""Build the ro-open LD_PRELOAD shim (ro_open.c) once per source hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
from importlib import resources
from pathlib import Path

from ..errors import HostError
from ..fsutil import build_once
from ..hostinfo import require_tool


def ro_open_library(cache: Path) -> Path:
    """``<cache>/ro-open-<hash>.so``, compiled once on first use (world-readable: the jailed QEMU loads it)."""
    src = resources.files(__package__).joinpath("ro_open.c").read_bytes()

    def build(target: Path) -> None:
        gcc = require_tool("gcc")
        (target.parent / "ro_open.c").write_bytes(src)
        proc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(target),
                               str(target.parent / "ro_open.c"), "-ldl"], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise HostError(f"compiling the ro-open shim failed (apt-get install -y gcc libc6-dev):\n"
                            f"{proc.stderr[-2000:]}")
        os.chmod(target, 0o644)

    return build_once(cache / f"ro-open-{hashlib.sha256(src).hexdigest()[:16]}.so", build, "the ro-open shim")
