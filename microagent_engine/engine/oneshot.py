"""``run``: create + start + exec + halt of one command, leaving no VM running and no record of a failed boot."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..client import DEFAULT_MAX_OUTPUT, ExecResult, OutputCallback
from ..errors import GuestError, InvalidArgument, MicroagentError, NotFound
from ..workspace_spec import WorkspaceSpec
from .bootlog import boot_log_tail
from .provision import Provisioner
from .store import WorkspaceInfo


class _Engine(Protocol):
    """What ``run`` uses of the Engine (the facade calls this module, never the other way round)."""

    _provision: Provisioner

    def progress(self, message: str) -> None: ...
    def start(self, name: str) -> WorkspaceInfo: ...
    def exec(self, name: str, argv: list[str], **kwargs: Any) -> ExecResult: ...
    def status(self, name: str) -> WorkspaceInfo: ...
    def halt(self, name: str) -> WorkspaceInfo: ...
    def kill(self, name: str) -> WorkspaceInfo: ...
    def delete(self, name: str) -> None: ...


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
    info = engine._provision.create(name, spec, one_shot=one_shot)
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
    try:
        result = engine.exec(name, argv, cwd=options.cwd, timeout=options.timeout, stdin=options.stdin,
                             on_stdout=options.on_stdout, on_stderr=options.on_stderr, capture=options.capture,
                             max_output=options.max_output)
        finish(engine, name)
    except BaseException:
        finish(engine, name, force=True)
        if options.delete:
            delete_quietly(engine, name)
        raise
    if options.delete:
        engine.delete(name)
    else:
        info = engine.status(name)
    return info, result


def delete_quietly(engine: _Engine, name: str) -> None:
    try:
        engine.delete(name)
    except MicroagentError:
        pass


def finish(engine: _Engine, name: str, force: bool = False) -> None:
    """Halt (``force``: kill) the workspace's VM if it still runs."""
    try:
        info = engine.status(name)
        if not info.dir.supervisor_alive():
            return
        if force:
            engine.kill(name)
        else:
            try:
                engine.halt(name)
            except GuestError:
                engine.kill(name)
    except NotFound:
        pass
