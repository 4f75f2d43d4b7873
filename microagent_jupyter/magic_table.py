"""The ``%microagent`` subcommands, once: name, aliases, handler, usage, summary, whether a cell body is taken,
the argument parser and what completion offers for their positional words. The magic dispatches from this table;
help and tab completion read it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from IPython.core.error import UsageError

from . import display as D
from . import magic_args as A
from . import magic_handlers as H
from . import magic_run as R
from .magic_call import Call

#: What completion offers for a positional word (see :mod:`microagent_jupyter.completion`): workspace names,
#: image references, ``WORKSPACE:`` for a copy, the parser's choices (volume and session actions) then names,
#: snapshot verbs then workspace names, or host paths (IPython's file completion).
COMPLETION_SOURCES = ("none", "workspace", "image", "cp", "output", "volume", "session", "snapshot")


@dataclass(frozen=True)
class Subcommand:
    name: str
    handler: Callable[[Call], Any]
    usage: str
    summary: str
    aliases: tuple[str, ...] = ()
    cell: bool = False  # takes a cell body: ``%%microagent NAME`` (else a body is refused)
    parser: Callable[[], argparse.ArgumentParser] | None = None
    completes: str = "none"  # one of COMPLETION_SOURCES

    @property
    def form(self) -> str:
        return "%%microagent" if self.cell else "%microagent"


def _python_parser() -> argparse.ArgumentParser:
    from .python_session import python_args
    return python_args.parser


def _session_parser() -> argparse.ArgumentParser:
    from .python_session import session_args
    return session_args.parser


def _lifecycle(name: str, summary: str) -> Subcommand:
    return Subcommand(name, H.lifecycle, "NAME", summary, completes="workspace")


COMMANDS: tuple[Subcommand, ...] = (
    Subcommand("run", R.run, "[options] [IMAGE] [COMMAND ...]", "run the cell in a one-shot workspace",
               cell=True, parser=lambda: A.run_args.parser, completes="image"),
    Subcommand("exec", R.exec_, "NAME [options] COMMAND ...", "run the cell in a running workspace",
               cell=True, parser=lambda: A.exec_args.parser, completes="workspace"),
    Subcommand("python", H.python, "[options]", "run the cell in a persistent sandboxed IPython kernel",
               cell=True, parser=_python_parser),
    Subcommand("session", H.session, "restart|stop [NAME] | list", "manage those Python sessions",
               parser=_session_parser, completes="session"),
    Subcommand("ps", H.ps, "", "running workspaces"),
    Subcommand("list", H.ps, "", "saved workspaces", aliases=("ls",)),
    Subcommand("status", H.status, "NAME [--static]", "live status widget (start/halt/kill buttons)",
               parser=lambda: A.status_args.parser, completes="workspace"),
    Subcommand("logs", H.logs, "NAME [--static]", "live serial console widget",
               parser=lambda: A.logs_args.parser, completes="workspace"),
    Subcommand("create", H.create, "[NAME] [options]", "create a workspace (from flags, a spec or a snapshot)",
               parser=lambda: A.create_args.parser),
    _lifecycle("start", "boot a workspace"),
    _lifecycle("pause", "freeze a running workspace's VM"),
    _lifecycle("resume", "continue a paused workspace, or wake a sleeping one"),
    _lifecycle("sleep", "save a workspace's memory to a file and end its VM; its next exec or resume wakes it"),
    _lifecycle("halt", "shut a workspace down cleanly"),
    _lifecycle("stop", "ask the guest to power off"),
    _lifecycle("kill", "stop a workspace's VM at once"),
    Subcommand("delete", H.delete, "NAME", "remove a stopped workspace", aliases=("rm",), completes="workspace"),
    Subcommand("egress", H.egress, "NAME", "what a workspace's DNS and egress proxy refused, and its policy",
               completes="workspace"),
    Subcommand("allow", H.allow, "NAME ENTRY ...", "widen a workspace's allow-list (at once when it runs)",
               completes="workspace"),
    Subcommand("snapshot", H.snapshot, "WORKSPACE NAME | list | rm NAME",
               "snapshot a running workspace; list or remove snapshots", aliases=("snapshots",),
               completes="snapshot"),
    Subcommand("cp", H.cp, "[--max-size SIZE] SRC DST",
               "copy a file in/out of a workspace (WORKSPACE:/path; running: through its agent)",
               completes="cp"),
    Subcommand("outputs", H.outputs, "NAME", "declared result files of a stopped workspace",
               completes="workspace"),
    Subcommand("output", H.output, "[--max-size SIZE] NAME OUTPUT [HOST_DEST]", "fetch one declared result file",
               completes="output"),
    Subcommand("volume", H.volume, "create NAME [--size-mib N] | list | status NAME | delete NAME [--force]",
               "named volumes", aliases=("volumes",), parser=lambda: A.volume_args.parser, completes="volume"),
    Subcommand("prune", H.prune, "", "remove stopped one-shot workspaces (run --keep)"),
    Subcommand("help", lambda call: D.Text(help_text()), "", "this list; SUBCOMMAND --help shows its options"),
)

_BY_NAME: dict[str, Subcommand] = {n: c for c in COMMANDS for n in (c.name, *c.aliases)}


def names() -> list[str]:
    """Every subcommand's name (aliases not repeated)."""
    return [c.name for c in COMMANDS]


def lookup(sub: str) -> Subcommand:
    """The subcommand typed as ``sub`` (a name or an alias); a UsageError listing them all otherwise."""
    try:
        return _BY_NAME[sub]
    except KeyError:
        raise UsageError(f"unknown subcommand {sub!r}; the subcommands are: {', '.join(names())} "
                         f"(%microagent help says what each does)") from None


def help_text() -> str:
    """The overview ``%microagent help`` shows."""
    rows = [(f"{c.form} {c.name} {c.usage}".rstrip(), c.summary) for c in COMMANDS]
    width = max(len(r[0]) for r in rows if len(r[0]) <= 52)
    lines = [f"{u:<{width}}   {s}" if len(u) <= width else f"{u}\n{'':<{width}}   {s}" for u, s in rows]
    return ("microVM workspaces from a notebook.\n\n" + "\n".join(lines) + "\n\nEvery subcommand takes --help. "
            "`--state-dir DIR` before the subcommand overrides $MICROAGENT_STATE_DIR.")


def usage_of(sub: str) -> str:
    """``%microagent SUB --help``: the parser's help where it has one, else its usage line."""
    entry = lookup(sub)
    if entry.parser is None:
        return f"usage: %microagent {sub} {entry.usage}".rstrip()
    parser = entry.parser()
    parser.prog = f"%microagent {sub}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # "usage: ...", not IPython's "::"
    return parser.format_help().strip()
