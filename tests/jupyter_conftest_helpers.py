"""Helpers for the Jupyter tests: a real IPython shell with the extension loaded, and real kernels."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def kernel_env(state_dir: Path) -> dict[str, str]:
    """Environment for a spawned kernel: the test state dir and this checkout on the path."""
    return {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def kernel_spec_argv() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def running(engine: Any) -> set[str]:
    """Names of the workspaces whose VMs run now."""
    return {i.name for i in engine.ps()}


def run_names(engine: Any, prefixes: tuple[str, ...] = ("run-", "nb-", "mg-")) -> list[str]:
    """Running workspaces this module's tests could have started: one-shot ``run-*`` and the notebooks'/magics'
    named ones (other modules' workspaces, like the session's ``shared``, are ignored)."""
    return sorted(n for n in running(engine) if n.startswith(prefixes))
