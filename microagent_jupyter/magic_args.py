"""The argument parsers of the ``%microagent`` subcommands (IPython ``magic_arguments``; ``NAME_args.parser``)."""

from __future__ import annotations

import argparse
import dataclasses

from IPython.core.magic_arguments import argument, magic_arguments

from microagent_engine.spec_args import add_workspace_arguments
from microagent_engine.workspace_spec import WorkspaceSpec


@magic_arguments()
@argument("--name", help="run in this persistent workspace: exec if running, start if stopped, else create "
                         "it (and keep it running)")
@argument("--keep", action="store_true", help="keep the one-shot workspace (halted) after the cell; "
                                               "%%microagent prune removes kept ones")
@argument("--delete", action="store_true", help="with --name: delete that workspace afterwards")
@argument("--cwd", help="working directory in the guest")
@argument("--timeout", type=float, metavar="SECONDS", help="TERM then KILL the command after this")
@argument("--no-raise-error", action="store_true",
          help="do not raise MicroagentCellError when the command fails")
@argument("--out", metavar="VAR", help="store stdout in this variable instead of showing it")
@argument("--err", metavar="VAR", help="store stderr in this variable instead of showing it")
@argument("--result", metavar="VAR", help="store the ExecResult (status, exit code...) in this variable")
@argument("command", nargs=argparse.REMAINDER, metavar="[IMAGE] [COMMAND ...]",
          help="command that reads the cell body on stdin (default /bin/sh)")
def run_args(line: str) -> None:
    """%%microagent run [options] [IMAGE] [COMMAND ...]

    Run the cell body as the stdin of COMMAND (default /bin/sh) in a one-shot microVM workspace, streaming
    its output into the cell. The workspace is deleted when the cell ends (kept, halted, with --keep);
    nothing is left running, also on Ctrl-C. Use `IMAGE -- COMMAND` when the image name could be mistaken for a
    command.
    A non-zero exit raises MicroagentCellError (unless --no-raise-error).

    With --name NAME the cell runs in that persistent workspace instead: exec'd if it runs, started if it is
    stopped, created (from these options) otherwise; it is left running for the next cell. Ctrl-C then
    stops the command but not the workspace.
    """

@magic_arguments()
@argument("name")
@argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
@argument("--cwd")
@argument("--timeout", type=float, metavar="SECONDS")
@argument("--no-raise-error", action="store_true")
@argument("--out", metavar="VAR")
@argument("--err", metavar="VAR")
@argument("--result", metavar="VAR")
@argument("command", nargs="*", metavar="COMMAND ...", help="put '--' before a command with options")
def exec_args(line: str) -> None:
    """%microagent exec NAME [options] [--] COMMAND ...   (cell form: the body is COMMAND's stdin)"""

@magic_arguments()
@argument("name", nargs="?")
@argument("--name", dest="name_opt", metavar="NAME", help="workspace name (same as the positional NAME)")
@argument("--start", action="store_true", help="boot it right away")
@argument("--from-snapshot", metavar="SNAPSHOT", help="a clone of a workspace snapshot; its first start "
                                                      "resumes it with its processes running")
def create_args(line: str) -> None:
    """%microagent create [NAME] [options]"""


#: in a notebook a new workspace has no network unless asked (as sessions and the sandboxed kernel): code a notebook
#: runs is the untrusted kind; the CLI keeps the seeds' default (user)
NOTEBOOK_NETWORK = "isolated"

#: the workspace flags are the CLI's (one argparse group)
add_workspace_arguments(run_args.parser, network_default=NOTEBOOK_NETWORK)
add_workspace_arguments(create_args.parser, network_default=NOTEBOOK_NETWORK)


def notebook_spec(spec: WorkspaceSpec) -> WorkspaceSpec:
    """``spec`` with the notebook's default network when it names none (a snapshot's clone keeps its own)."""
    if spec.network is not None or spec.from_snapshot is not None:
        return spec
    return dataclasses.replace(spec, network=NOTEBOOK_NETWORK)

@magic_arguments()
@argument("name")
@argument("--static", action="store_true", help="a snapshot instead of the live widget")
def status_args(line: str) -> None:
    """%microagent status NAME"""

@magic_arguments()
@argument("name")
@argument("--static", action="store_true", help="print the log so far instead of the live widget")
@argument("--max-lines", type=int, default=2000)
def logs_args(line: str) -> None:
    """%microagent logs NAME"""

@magic_arguments()
@argument("action", choices=["create", "list", "ls", "status", "delete", "rm"])
@argument("name", nargs="?")
@argument("--size-mib", type=int, metavar="MIB")
@argument("--force", action="store_true")
def volume_args(line: str) -> None:
    """%microagent volume create NAME [--size-mib N] | list | status NAME | delete NAME [--force]"""
