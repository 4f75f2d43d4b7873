"""``%%microagent run`` and ``%%microagent exec``: a cell's body as a guest command's stdin, its output streamed
into the cell."""

from __future__ import annotations

import argparse
import dataclasses
import codecs
import re
import sys
from typing import Callable

from IPython.core.error import UsageError

from microagent_engine import Engine, ExecResult, RunOptions, WorkspaceSpec
from microagent_engine.errors import MicroagentError, NotFound
from microagent_engine.images.builtin import BUILTIN_NAMES as BUILTIN_IMAGES
from microagent_engine.states import allows, require

from microagent_engine.spec_args import spec_from_args

from ._engine import env_pairs
from .magic_args import exec_args, notebook_spec, run_args
from .magic_call import Call
from .magic_errors import MicroagentCellError, MicroagentInterrupted
from .progress import CellProgress
from .session_owner import remove_workspace
from microagent_engine.engine.cleanup import delete_quietly, kill_quietly


class _Sink:
    """Streams guest output into the cell as it arrives (or into a variable), decoding UTF-8 incrementally."""

    def __init__(self, stream: str, to_variable: bool, before_first: Callable[[], None] | None = None):
        self.stream, self.to_variable, self.before_first = stream, to_variable, before_first
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[str] = []

    def __call__(self, data: bytes) -> None:
        if self.before_first is not None:  # the command's first output: the preparation display collapses
            self.before_first()
            self.before_first = None
        text = self.decoder.decode(data)
        self._emit(text)

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self.to_variable:
            self.parts.append(text)
            return
        out = getattr(sys, self.stream)  # looked up each time: in a kernel this is the cell's OutStream
        out.write(text)
        out.flush()

    def finish(self) -> str:
        self._emit(self.decoder.decode(b"", final=True))
        return "".join(self.parts)


def _looks_like_image(token: str) -> bool:
    if token in BUILTIN_IMAGES:
        return True
    if token.startswith(("/", ".", "~", "-")) or "=" in token:
        return False
    return any(c in token for c in "/:@")


def _split_image_command(tokens: list[str], image: str | None) -> tuple[str | None, list[str]]:
    tokens = list(tokens)
    if tokens and tokens[0] == "--":
        return image, tokens[1:]
    if len(tokens) >= 2 and tokens[1] == "--":  # IMAGE -- COMMAND ...
        if image:
            raise UsageError(f"two images given ({image!r} and {tokens[0]!r}); give one")
        return tokens[0], tokens[2:]
    if image is None and tokens and _looks_like_image(tokens[0]):
        image = tokens.pop(0)
    return image, tokens


def unbuffered_python(argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """``env`` plus ``PYTHONUNBUFFERED=1`` when the command is a Python interpreter and the user did not set it:
    a cell's prints then stream as they happen instead of arriving all at once at the end (a pipe, not a tty,
    makes Python block-buffer its stdout)."""
    prog = argv[0].rsplit("/", 1)[-1] if argv else ""
    if re.fullmatch(r"python[0-9.]*", prog) and "PYTHONUNBUFFERED" not in env:
        return {**env, "PYTHONUNBUFFERED": "1"}
    return env


def _stream(args: argparse.Namespace, before_first: Callable[[], None] | None = None) -> tuple[_Sink, _Sink]:
    for var in (args.out, args.err, args.result):
        if var is not None and not var.isidentifier():
            raise UsageError(f"{var!r} is not a valid variable name")
    return (_Sink("stdout", args.out is not None, before_first),
            _Sink("stderr", args.err is not None, before_first))


def _finish(call: Call, args: argparse.Namespace, out: _Sink, err: _Sink, result: ExecResult | None,
            argv: list[str], workspace: str) -> None:
    stdout, stderr = out.finish(), err.finish()
    if args.out:
        call.shell.user_ns[args.out] = stdout
    if args.err:
        call.shell.user_ns[args.err] = stderr
    if result is None:
        return
    call.on_result(result)
    if args.result:
        call.shell.user_ns[args.result] = result
    if not result.ok and not args.no_raise_error:
        raise MicroagentCellError(result, argv, workspace)


def run(call: Call) -> None:
    """``%%microagent run``: see :func:`~microagent_jupyter.magic_args.run_args`."""
    engine, args, cell = call.engine, run_args.parser.parse_args(call.argv), call.cell
    image, command = _split_image_command(args.command, args.image)
    argv = command or ["/bin/sh"]
    stdin = cell.encode() if cell is not None else None
    args.image = image
    spec = notebook_spec(spec_from_args(args, find_spec=False)[0])
    progress = CellProgress(call.in_kernel)
    engine.progress = progress
    out, err = _stream(args, progress.done)
    result: ExecResult | None = None
    try:
        if args.name:
            result = _run_named(engine, args, argv, stdin, spec, out, err, progress)
            workspace = args.name
        else:
            spec = dataclasses.replace(spec, env=unbuffered_python(argv, dict(spec.env or {})))
            info, result = engine.run(argv, spec, RunOptions(delete=not args.keep, cwd=args.cwd, timeout=args.timeout,
                                                             stdin=stdin, on_stdout=out, on_stderr=err))
            workspace = info.name
    except KeyboardInterrupt:
        out.finish(), err.finish()
        where = f"workspace {args.name!r} is still running" if args.name and _alive(engine, args.name) \
            else "no VM is left running"
        raise MicroagentInterrupted(f"the guest command was stopped and {where}") from None
    finally:
        progress.done()
        if result is None:
            out.finish(), err.finish()
    _finish(call, args, out, err, result, argv, workspace)


def _run_named(engine: Engine, args: argparse.Namespace, argv: list[str], stdin: bytes | None,
               spec: WorkspaceSpec, out: _Sink, err: _Sink, progress: CellProgress) -> ExecResult:
    name = args.name
    env = unbuffered_python(argv, dict(spec.env or {}))
    try:
        state = engine.status(name).state.state
        created = False
    except NotFound:
        engine.create(name, spec)  # the workspace keeps the user's env; exec adds the rest
        state, created = "prepared", True
        env = {k: v for k, v in env.items() if k not in (spec.env or {})}
    try:
        if allows("start", state):
            progress(f"Booting {name}")
            engine.start(name)
        else:
            require("exec", state, name)
    except BaseException:
        if created or allows("start", state):  # never leave a half-booted VM behind
            kill_quietly(engine, name)
        if created:  # nor a record this cell made but could not start
            delete_quietly(engine, name)
        raise
    progress.done()
    try:
        result = engine.exec(name, argv, env=env or None, cwd=args.cwd, timeout=args.timeout, stdin=stdin,
                             on_stdout=out, on_stderr=err, capture=True)
    except BaseException:
        if args.delete:
            remove_workspace(engine, name)
        raise
    if args.delete:
        try:
            engine.halt(name)
        except MicroagentError:
            kill_quietly(engine, name)
        engine.delete(name)
    return result


def exec_(call: Call) -> None:
    """``%%microagent exec``: see :func:`~microagent_jupyter.magic_args.exec_args`."""
    engine, args, cell = call.engine, exec_args.parser.parse_args(call.argv), call.cell
    argv = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not argv:
        if cell is None:
            raise UsageError("usage: %microagent exec NAME [options] -- COMMAND ...")
        argv = ["/bin/sh"]
    out, err = _stream(args)
    result = None
    try:
        env = unbuffered_python(argv, env_pairs(args.env))
        result = engine.exec(args.name, argv, env=env or None, cwd=args.cwd, timeout=args.timeout,
                             stdin=cell.encode() if cell is not None else None,
                             on_stdout=out, on_stderr=err, capture=True)
    except KeyboardInterrupt:
        raise MicroagentInterrupted(f"the guest command was stopped; workspace {args.name!r} keeps "
                                    f"running") from None
    finally:
        if result is None:
            out.finish(), err.finish()
    _finish(call, args, out, err, result, argv, args.name)


def _alive(engine: Engine, name: str) -> bool:
    try:
        return engine.status(name).running
    except MicroagentError:
        return False


