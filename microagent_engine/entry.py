"""The ``microagent`` command's entry point (the console script and ``python -m microagent_engine``): a command
that will start a VM gets the supervisor's standby forked before the CLI's own imports (``engine/spawn.py``), then
:mod:`.cli` runs it."""

from __future__ import annotations

import sys
from typing import NoReturn, Sequence

#: the CLI commands that start a VM, hence a supervisor
VM_STARTING_COMMANDS = frozenset({"run", "start"})
#: the CLI's options before the command that take a value
_VALUED_OPTIONS = frozenset({"--state-dir"})


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of a ``microagent`` argv (None: there is none), as argparse will find it."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--":
            return None
        elif arg.startswith("-"):
            skip = arg in _VALUED_OPTIONS
        else:
            return arg
    return None


def entry() -> NoReturn:
    """``microagent``: :func:`microagent_engine.cli.entry`, after the standby when the command starts a VM."""
    if command_of(sys.argv[1:]) in VM_STARTING_COMMANDS:
        from .engine.spawn import prefork

        prefork()
    from .cli import entry as cli_entry

    cli_entry()
