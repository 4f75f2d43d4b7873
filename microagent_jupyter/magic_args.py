"""The argument parsers of the ``%microagent`` subcommands (IPython ``magic_arguments``; ``NAME_args.parser``)."""

from __future__ import annotations

import argparse

from IPython.core.magic_arguments import argument, magic_arguments


@magic_arguments()
@argument("-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro|rw]",
          help="attach a named volume (NAME:/path), a tar bundle (x.tar:/path) or an ext4 disk "
               "(x.ext4:/path)")
@argument("--bundle", action="append", default=[], metavar="NAME=/path.tar:/mount[:ro]",
          help="build a one-shot ext4 disk from a tar archive")
@argument("--disk", action="append", default=[], metavar="NAME=/path.ext4:/mount[:rw]",
          help="attach an existing ext4 image")
@argument("--output", action="append", default=[], metavar="NAME=/guest/path", help="declare a result file")
@argument("--image", help="image reference (default: the built-in busybox image; builtin:python for Python "
                          "with numpy, pandas, matplotlib); or give IMAGE first")
@argument("--packages", metavar="'PKG ...'", help="Debian packages to add to builtin:python")
@argument("--profile", help="resource profile: tiny, small (default), medium, large")
@argument("--memory", type=int, metavar="MIB", help="memory in MiB (overrides the profile)")
@argument("--cpus", type=int, help="vCPUs (overrides the profile)")
@argument("--size-mib", type=int, metavar="MIB", help="rootfs size in MiB (overrides the profile)")
@argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="guest environment variable")
@argument("--network", choices=["user", "isolated"], help="user (NAT to the public internet only, default) or "
          "isolated (no NIC)")
@argument("--allow", action="append", default=[], metavar="CIDR|HOST[:PORT]",
          help="narrow egress to these destinations (repeatable)")
@argument("--allow-host-port", action="append", default=[], type=int, metavar="PORT",
          help="let the guest reach this port of the host's 127.0.0.1 at 10.0.2.2:PORT (repeatable)")
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
@argument("--image")
@argument("--packages", metavar="'PKG ...'")
@argument("--profile")
@argument("--memory", type=int, metavar="MIB")
@argument("--cpus", type=int)
@argument("--size-mib", type=int, metavar="MIB")
@argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
@argument("--network", choices=["user", "isolated"])
@argument("--allow", action="append", default=[], metavar="CIDR|HOST[:PORT]")
@argument("--allow-host-port", action="append", default=[], type=int, metavar="PORT")
@argument("--hostname")
@argument("-v", "--volume", action="append", default=[])
@argument("--bundle", action="append", default=[])
@argument("--disk", action="append", default=[])
@argument("--output", action="append", default=[])
@argument("-f", "--file", metavar="SPEC", help="create from a workspace spec (microagent.yaml); flags "
                                              "override its fields. Default: ./microagent.yaml if present")
@argument("--allow-host-files", action="store_true", help="let the spec use host files outside its directory")
@argument("--start", action="store_true", help="boot it right away")
@argument("--from-snapshot", metavar="SNAPSHOT", help="a clone of a workspace snapshot; its first start "
                                                      "resumes it with its processes running")
def create_args(line: str) -> None:
    """%microagent create [NAME] [options]"""

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
