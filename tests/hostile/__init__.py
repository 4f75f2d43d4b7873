"""A hostile guest program for sandbox-boundary tests (see hostile.c for its modes and the frames it writes).

``build_hostile`` compiles it like the guest agent: statically, cached by source hash under the state dir.
``install_hostile`` copies it into a running workspace. Tests import it as ``from hostile import ...`` (pytest
puts ``tests/`` on the path, as for the other helper modules there).
"""

from __future__ import annotations

from pathlib import Path

from microagent_engine import Engine
from microagent_engine.guest.initramfs import compile_static, protocol_headers

SOURCE = Path(__file__).resolve().parent / "hostile.c"
#: where install_hostile puts the program in the guest
GUEST_PATH = "/tmp/hostile"


def build_hostile(state_dir: Path) -> Path:
    """The static hostile binary for ``state_dir`` (compiled once per source hash)."""
    return compile_static(state_dir, SOURCE.read_bytes(), "hostile", protocol_headers())


def install_hostile(engine: Engine, workspace: str, guest_path: str = GUEST_PATH) -> str:
    """Copy the hostile binary into the running ``workspace`` as an executable at ``guest_path``; return it."""
    binary = build_hostile(engine.state_dir).read_bytes()
    r = engine.exec(workspace, ["sh", "-c", 'cat > "$1" && chmod 755 "$1"', "sh", guest_path], stdin=binary)
    if r.exit_code != 0:
        raise AssertionError(f"copying the hostile program into {workspace} failed: {r.stderr!r}")
    return guest_path
