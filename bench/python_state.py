"""A state dir with the cached ``builtin:python`` image and its warm snapshot, for the Python benches."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def add_state_dir(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--state-dir", help="reuse a state dir (its image and warm snapshot); default: a new one")


def prepared(state_dir: str | None, prefix: str) -> tuple[Path, str]:
    """``state_dir`` (a new one under /var/tmp when None) with the Python image and the warm snapshot of a
    ``--network isolated`` Python workspace (built once; its build time printed); (the dir, the snapshot)."""
    from microagent_engine import Engine, WorkspaceSpec
    from microagent_engine.engine import warm_python
    from python_image_cache import python_image_into

    state = Path(state_dir or tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    python_image_into(state)
    t0 = time.monotonic()
    snap, why = warm_python.warm_snapshot(Engine(state, progress=print),
                                          WorkspaceSpec(image="builtin:python", network="isolated"))
    if snap is None:
        raise SystemExit(f"no warm snapshot: {why}")
    print(f"warm snapshot {snap} ready after {time.monotonic() - t0:.1f} s (built once per image and shape)")
    return state, snap
