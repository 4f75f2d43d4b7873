"""``run``: create + start + exec + halt of one command, leaving no VM running and no record of a failed boot."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..client import DEFAULT_MAX_OUTPUT, ExecResult, OutputCallback
from ..config import hostname_for
from ..errors import GuestError, InvalidArgument, NotFound
from ..timeline import mark
from ..workspace_spec import WorkspaceSpec
from . import warm_python
from .bootlog import boot_log_tail
from .cleanup import delete_quietly, finish
from .provision import Provisioner
from .store import WorkspaceInfo


class _Engine(warm_python.EngineLike, Protocol):
    """What ``run`` uses of the Engine (the facade calls this module, never the other way round)."""

    _provision: Provisioner


@dataclass(frozen=True)
class RunOptions:
    """How ``Engine.run`` runs its command (what the workspace is comes from the :class:`WorkspaceSpec`)."""

    name: str | None = None  # None: ``run-<ns>``, marked one-shot so ``prune`` removes it once stopped
    delete: bool = False  # delete the workspace afterwards
    cwd: str | None = None
    timeout: float | None = None
    stdin: bytes | IO[bytes] | None = None
    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None
    capture: bool = True
    max_output: int = DEFAULT_MAX_OUTPUT


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RunOptions))


def split_run_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of ``run`` split into (RunOptions fields, WorkspaceSpec fields)."""
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    return options, {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}


def run(engine: _Engine, argv: list[str], spec: WorkspaceSpec, options: RunOptions) -> tuple[WorkspaceInfo,
                                                                                             ExecResult]:
    """See ``Engine.run``."""
    if not argv:
        raise InvalidArgument("run needs a command, e.g. microagent run -- uname -r")
    one_shot = options.name is None
    name = options.name or f"run-{time.time_ns()}"
    info = _warm_start(engine, name, argv, spec, one_shot, overlay_root=options.delete)
    if info is not None:
        argv = warm_python.run_argv(argv)
    else:
        info = _cold_start(engine, name, spec, one_shot)
    mark("run: started")
    try:
        result = engine.exec(name, argv, cwd=options.cwd, timeout=options.timeout, stdin=options.stdin,
                             on_stdout=options.on_stdout, on_stderr=options.on_stderr, capture=options.capture,
                             max_output=options.max_output)
        mark("run: command done")
        # a disk about to be deleted needs no clean shutdown; an attached volume or disk outlives the run: it does
        finish(engine, name, force=options.delete and not spec.attachments)
        mark("run: VM ended")
    except BaseException:
        finish(engine, name, force=True)
        if options.delete:
            delete_quietly(engine, name)
        raise
    if options.delete:
        engine.delete(name)
        mark("run: deleted")
    else:
        info = engine.status(name)
    return info, result


def _warm_start(engine: _Engine, name: str, argv: list[str], spec: WorkspaceSpec, one_shot: bool,
                overlay_root: bool = False) -> WorkspaceInfo | None:
    """Start ``name`` as a clone of the warm Python snapshot when ``argv`` is a Python run that fits one (the
    snapshot is built on first need); its info, or None for a cold start. ``overlay_root``: the run deletes it
    afterwards, so its root disk is an overlay over the snapshot's (snapshots/overlay.py), not a copy."""
    if not one_shot and _exists(engine, name):
        return None  # the cold path reports the name taken, before touching anything
    snap, why = warm_python.for_run(engine, argv, spec)
    if snap is None:
        if why:
            engine.progress(f"Not starting from the warm Python snapshot: {why}")
        return None
    made: list[WorkspaceInfo] = []

    def create() -> None:
        clone = WorkspaceSpec(from_snapshot=snap, env=spec.env, hostname=hostname_for(name))
        made.append(engine._provision.create(name, clone, one_shot=one_shot, overlay_root=overlay_root))
    why = warm_python.resume(engine, name, snap, create, engine.progress)
    if why:
        engine.progress(f"Booting cold: {why}")
        return None
    return made[0]


def _exists(engine: _Engine, name: str) -> bool:
    try:
        engine.status(name)
        return True
    except NotFound:
        return False


def _cold_start(engine: _Engine, name: str, spec: WorkspaceSpec, one_shot: bool) -> WorkspaceInfo:
    info = engine._provision.create(name, spec, one_shot=one_shot)
    mark("run: created")
    try:
        engine.progress(f"Booting {name}")
        engine.start(name)
    except BaseException as exc:
        finish(engine, name, force=True)
        boot_log = boot_log_tail(info)
        delete_quietly(engine, name)  # a run that never ran leaves nothing behind
        if isinstance(exc, GuestError) and boot_log:
            reason = str(exc).split("\n", 1)[0].removesuffix("Last console lines:").rstrip()
            raise GuestError(f"{reason}\nLast lines of the boot log:\n{boot_log}") from None
        raise
    return info
