"""Warm Python sessions: ``%%microagent python`` sessions and sandboxed kernels start from the engine's warm Python
snapshot (:mod:`microagent_engine.engine.warm_python`: a zygote with ipykernel, numpy, pandas and matplotlib
imported and a kernel already bound, which becomes the session's kernel with its own connection file), or boot cold
when none fits.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable
from typing import Any

from microagent_engine import Engine
from microagent_engine.engine import warm_python as engine_warm
from microagent_engine.errors import MicroagentError
from microagent_engine.images.builtin import PYTHON_REF, builtin_base
from microagent_engine.workspace_spec import WorkspaceSpec

from .session_owner import record_owner

warm_enabled = engine_warm.enabled

SESSION_DEFAULTS = WorkspaceSpec(image=PYTHON_REF, network="isolated")

Progress = Callable[[str], None]


def session_spec(spec: WorkspaceSpec | None = None) -> WorkspaceSpec:
    """A Python session's workspace: ``spec`` over the sessions' defaults (the Python image, no network)."""
    return SESSION_DEFAULTS.merged(spec)


def split_env(spec: WorkspaceSpec) -> tuple[WorkspaceSpec, dict[str, str]]:
    """``spec`` without its environment, and that environment: a session's kernel gets it as its launch's (the
    workspace and its warm snapshot are the same for every environment)."""
    return dataclasses.replace(spec, env=None), dict(spec.env or {})


def warm_snapshot(engine: Engine, spec: WorkspaceSpec, progress: Progress | None = None
                  ) -> tuple[str | None, str]:
    """The warm snapshot for a session created with ``spec`` (built now if missing, its build workspace owned by
    this process), or None and why not."""
    return engine_warm.warm_snapshot(engine, session_spec(spec), progress,
                                     adopt=lambda ws: record_owner(engine, ws, kind="build"))


def find_warm(engine: Engine, spec: WorkspaceSpec) -> str | None:
    """The warm snapshot a session created with ``spec`` would resume, when it is already built."""
    return engine_warm.find(engine, session_spec(spec))


def start_session_workspace(engine: Engine, name: str, spec: WorkspaceSpec, env: dict[str, str] | None,
                            *, owned: bool, progress: Progress | None = None, warm: bool = True,
                            owner: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """Create and start the session workspace ``name``: a clone of the warm snapshot when one fits (built on first
    need), else a cold create + boot. ``owned``: record this process as its owner (swept when it dies), described
    by ``owner`` (:func:`~.session_owner.record_owner`'s keywords). Returns the snapshot used (None: cold) and why
    it booted cold."""
    say = progress or (lambda _m: None)
    spec = session_spec(spec)
    snap, reason = warm_snapshot(engine, spec, progress) if warm else (None, "warm start disabled")
    if snap is not None:
        def create() -> None:
            # an owned workspace is deleted with its owner: a copy-on-write root, no disk copy
            engine_warm.create_warm(engine, name, snap, env, disposable=owned)
            if owned:
                record_owner(engine, name, **(owner or {}))
        reason = engine_warm.resume(engine, name, snap, create, say)
        if not reason:
            return snap, ""
    say(f"Cold start of {name}: {reason}")
    engine.create(name, spec.merged(WorkspaceSpec(env=env or None)))
    if owned:
        record_owner(engine, name, **(owner or {}))
    say(f"Booting {name}")
    engine.start(name)
    return None, reason


def prepare(engine: Engine, progress: Progress | None = None) -> str:
    """``microagent prepare python``: build the built-in Python image and the one warm snapshot the magic and the
    sandboxed kernel start from (each once; a second call finds them); what was prepared, in a line."""
    say = progress or (lambda _m: None)
    spec = session_spec()
    say(f"Preparing {PYTHON_REF}: the image (built once per package set)")
    base = builtin_base(PYTHON_REF, engine.state_dir, (), say)
    snap, why = warm_snapshot(engine, spec, say)
    if snap is None:
        raise MicroagentError(f"the warm Python snapshot could not be prepared: {why}")
    return f"{PYTHON_REF} is ready: image {base.path.name}, warm snapshot {snap} (first sessions start from it)"
