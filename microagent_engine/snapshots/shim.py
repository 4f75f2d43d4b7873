"""Build the ro-open LD_PRELOAD shim (ro_open.c) once per source hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import HostError
from ..hostinfo import require_tool


def ro_open_library(cache: Path) -> Path:
    """``<cache>/ro-open-<hash>.so``, compiled on first use (world-readable: the jailed QEMU loads it)."""
    src = resources.files(__package__).joinpath("ro_open.c").read_bytes()
    out = cache / f"ro-open-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if out.exists():
        return out
    gcc = require_tool("gcc")
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".ro-open-") as tmp:
        (Path(tmp) / "ro_open.c").write_bytes(src)
        lib = Path(tmp) / "ro-open.so"
        proc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(lib), str(Path(tmp) / "ro_open.c"),
                               "-ldl"], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise HostError(f"compiling the ro-open shim failed (apt-get install -y gcc libc6-dev):\n"
                            f"{proc.stderr[-2000:]}")
        os.chmod(lib, 0o644)
        os.replace(lib, out)
    return out
