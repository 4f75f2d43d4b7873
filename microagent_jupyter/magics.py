"""IPython magics: ``%%microagent run`` runs a cell inside a microVM; ``%microagent ...`` manages workspaces.

Load with ``%load_ext microagent_jupyter``. The state directory is ``$MICROAGENT_STATE_DIR`` (read at every
call), else ``~/.microagent``; ``%microagent --state-dir DIR ...`` overrides it for one call.
"""

from __future__ import annotations

import argparse
import codecs
import re
import shlex
import subprocess
import sys
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.text import dedent

from microagent_engine import Engine, ExecResult
from microagent_engine.errors import InvalidState, MicroagentError, NotFound
from microagent_engine.images.builtin import BUILTIN_NAMES as BUILTIN_IMAGES
from microagent_engine.protocol import ExitKind
from microagent_engine.states import STARTABLE

from . import display as D
from ._engine import create_kwargs, env_pairs, get_engine, network_kwarg, storage_kwargs
from .progress import CellProgress
from .session_owner import remove_workspace

LIFECYCLE = ("start", "pause", "resume", "halt", "stop", "kill")


class MicroagentCellError(subprocess.CalledProcessError):
    """A cell's command ended badly: non-zero exit, signal, timeout, or it could not start.

    ``returncode``/``exit_code`` is the command's exit code (as the CLI returns it); ``result`` the full
    :class:`~microagent_engine.ExecResult`; ``workspace`` where it ran.
    """

    def __init__(self, result: ExecResult, argv: list[str], workspace: str):
        super().__init__(result.exit_code, argv, result.stdout, result.stderr)
        self.result, self.workspace = result, workspace

    @property
    def exit_code(self) -> int:
        return self.returncode

    def __str__(self) -> str:
        cmd = " ".join(self.cmd)
        where = f"in workspace {self.workspace!r}"
        status = self.result.status
        if status == ExitKind.TIMED_OUT:
            return f"{cmd!r} {where} timed out (exit code {self.returncode})"
        if status == ExitKind.SIGNALED:
            return f"{cmd!r} {where} was killed by signal {self.result.code} (exit code {self.returncode})"
        if status == ExitKind.FAILED_TO_START:
            return f"{cmd!r} {where} could not start: {self.result.message} (exit code {self.returncode})"
        return f"{cmd!r} {where} exited with code {self.returncode}"


class MicroagentInterrupted(KeyboardInterrupt):
    """Ctrl-C / kernel interrupt during a guest command: the command was stopped (INT, TERM, then KILL).
    Shown as one ``KeyboardInterrupt: ...`` line instead of a traceback through the engine."""


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


def split_line(line: str) -> list[str]:
    """Split a magic line like a shell would (quotes, backslash escapes). IPython has already expanded
    ``$var`` and ``{expr}`` in it."""
    try:
        return shlex.split(line, posix=True)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise UsageError(f"cannot split the line into words: {exc}; close the quote or escape it") from None


def _max_size_option(words: list[str]) -> tuple[list[str], str | None]:
    """``words`` without ``--max-size SIZE`` / ``--max-size=SIZE``, and SIZE (None when not given)."""
    rest: list[str] = []
    size = None
    it = iter(words)
    for word in it:
        if word == "--max-size":
            size = next(it, None)
            if size is None:
                raise UsageError("--max-size needs a size, e.g. --max-size 20G")
        elif word.startswith("--max-size="):
            size = word.split("=", 1)[1]
        else:
            rest.append(word)
    return rest, size


def _parse(magic: Any, argv: list[str]) -> argparse.Namespace:
    """Parse already-split words with a magic_arguments parser (its errors are UsageErrors)."""
    return magic.parser.parse_args(argv)


def _short_traceback(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
    if issubclass(etype, KeyboardInterrupt):
        etype = KeyboardInterrupt  # what the user did, and what a kernel's error reply should name
    stb = [f"\x1b[0;31m{etype.__name__}\x1b[0m: {D.notebook_wording(str(value))}"]
    shell._showtraceback(etype, value, stb)
    return stb


@magics_class
class MicroagentMagics(Magics):
    """``%microagent`` / ``%%microagent``: microVM workspaces from a notebook."""

    def __init__(self, shell: Any = None, state_dir: str | None = None):
        super().__init__(shell)
        self.state_dir = state_dir
        self.last_result: ExecResult | None = None

    def engine(self, state_dir: str | None = None) -> Engine:
        return get_engine(state_dir or self.state_dir)

    @property
    def in_kernel(self) -> bool:
        """True under a Jupyter kernel (widgets can render); False in a terminal IPython."""
        return getattr(self.shell, "kernel", None) is not None

    # ---- argument parsers (IPython magic_arguments) --------------------------------------------
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
    def _run_args(self, line: str) -> None:
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
    def _exec_args(self, line: str) -> None:
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
    def _create_args(self, line: str) -> None:
        """%microagent create [NAME] [options]"""

    @magic_arguments()
    @argument("name")
    @argument("--static", action="store_true", help="a snapshot instead of the live widget")
    def _status_args(self, line: str) -> None:
        """%microagent status NAME"""

    @magic_arguments()
    @argument("name")
    @argument("--static", action="store_true", help="print the log so far instead of the live widget")
    @argument("--max-lines", type=int, default=2000)
    def _logs_args(self, line: str) -> None:
        """%microagent logs NAME"""

    @magic_arguments()
    @argument("action", choices=["create", "list", "ls", "status", "delete", "rm"])
    @argument("name", nargs="?")
    @argument("--size-mib", type=int, metavar="MIB")
    @argument("--force", action="store_true")
    def _volume_args(self, line: str) -> None:
        """%microagent volume create NAME [--size-mib N] | list | status NAME | delete NAME [--force]"""

    # ---- dispatch ------------------------------------------------------------------------------
    @line_cell_magic
    def microagent(self, line: str = "", cell: str | None = None) -> Any:
        """microVM workspaces from a notebook.

        %%microagent run [options] [IMAGE] [COMMAND ...]   run the cell in a one-shot workspace
        %%microagent exec NAME [options] COMMAND ...       run the cell in a running workspace
        %%microagent python [options]                      run the cell in a persistent sandboxed IPython kernel
        %microagent session restart|stop [NAME] | list     manage those Python sessions
        %microagent ps | list                              running / saved workspaces
        %microagent status NAME                            live status widget (start/halt/kill buttons)
        %microagent logs NAME                              live serial console widget
        %microagent create [NAME] [options] | start | halt | stop | kill | delete NAME
        %microagent cp SRC DST                             copy a file in/out of a stopped workspace
        %microagent outputs NAME | output NAME OUTPUT [DEST]   declared result files of a stopped workspace
        %microagent volume create NAME [--size-mib N] | list | status NAME | delete NAME [--force]
        %microagent prune                                  remove stopped one-shot workspaces (run --keep)

        Every subcommand takes --help. `--state-dir DIR` before the subcommand overrides $MICROAGENT_STATE_DIR.
        """
        state_dir = None
        words = split_line(line)
        if words[:1] == ["--state-dir"] and len(words) > 1:
            state_dir, words = words[1], words[2:]
        elif words[:1] and words[0].startswith("--state-dir="):
            state_dir, words = words[0].split("=", 1)[1], words[1:]
        if not words or words[0] in ("-h", "--help", "help"):
            return D.Text(dedent(self.microagent.__doc__ or "").strip())
        sub, rest = words[0], words[1:]
        if rest[:1] in (["-h"], ["--help"]):
            return D.Text(self._help(sub))
        engine = self.engine(state_dir)
        if sub == "run":
            return self._run(engine, _parse(self._run_args, rest), cell)
        if sub == "exec":
            return self._exec(engine, _parse(self._exec_args, rest), cell)
        if sub == "python":  # persistent sandboxed IPython session (microagent_jupyter.python_session)
            from .python_session import python_magic
            return python_magic(self.shell, engine, rest, cell, CellProgress(self.in_kernel))
        if sub == "session" and not (cell or "").strip():
            from .python_session import session_magic
            return D.Text(session_magic(engine, rest))
        if cell is not None and cell.strip():
            raise UsageError(f"%%microagent {sub} takes no cell body; use %microagent {sub} ... (one %)")
        if sub in ("ps", "list", "ls"):
            if rest:
                raise UsageError(f"%microagent {sub} takes no arguments")
            infos = engine.ps() if sub == "ps" else engine.list()
            return D.workspaces_table(infos)
        if sub == "status":
            args = _parse(self._status_args, rest)
            info = engine.status(args.name)
            if args.static or not self.in_kernel:
                return D.workspace_record(info)
            from .widgets import WorkspaceStatusWidget
            return WorkspaceStatusWidget(engine, args.name)
        if sub == "logs":
            args = _parse(self._logs_args, rest)
            engine.status(args.name)
            if args.static or not self.in_kernel:
                text = b"".join(engine.logs(args.name)).decode(errors="replace").replace("\r\n", "\n")
                return D.Text("\n".join(text.splitlines()[-args.max_lines:]))
            from .widgets import SerialLogWidget
            return SerialLogWidget(engine, args.name, max_lines=args.max_lines)
        if sub == "create":
            return self._create(engine, _parse(self._create_args, rest))
        if sub in LIFECYCLE:
            name = self._one_name(sub, rest)
            info = getattr(engine, sub)(name)
            return D.Message(f"Workspace {name}: {info.state.state}", info.to_json(), info.state.state)
        if sub in ("snapshot", "snapshots"):
            return self._snapshot(engine, sub, rest)
        if sub in ("delete", "rm"):
            name = self._one_name(sub, rest)
            engine.delete(name)
            return D.Message(f"Deleted workspace {name}", {"name": name, "deleted": True})
        if sub == "cp":
            parts, max_size = _max_size_option(rest)
            if len(parts) != 2:
                raise UsageError("usage: %microagent cp [--max-size SIZE] SRC DST   (one side is WORKSPACE:/path or "
                                 "WORKSPACE:DISK:/path)")
            result = engine.cp(parts[0], parts[1], max_size)
            return D.Message(f"Copied {parts[0]} → {parts[1]}", {"copied": str(result)} if result is not None else None)
        if sub == "outputs":
            name = self._one_name(sub, rest)
            rows = engine.outputs(name)
            return D.Table(["NAME", "PATH", "EXISTS"], [[o["name"], o["path"], o.get("exists")] for o in rows],
                           data=rows, empty="(no declared outputs)")
        if sub == "output":
            parts, max_size = _max_size_option(rest)
            if len(parts) not in (2, 3):
                raise UsageError("usage: %microagent output [--max-size SIZE] NAME OUTPUT [HOST_DEST]")
            got = engine.output_get(parts[0], parts[1], parts[2] if len(parts) == 3 else None, max_size)
            if isinstance(got, bytes):
                return D.output_bytes(got, _output_basename(engine, parts[0], parts[1]))
            return D.Message(f"Output {parts[1]} of {parts[0]} copied to {got}", {"path": str(got)})
        if sub == "prune":
            if rest:
                raise UsageError("%microagent prune takes no arguments")
            gone = engine.prune()
            return D.Message(f"Removed {len(gone)} stopped one-shot workspace(s)", {"removed": gone})
        if sub in ("volume", "volumes"):
            return self._volume(engine, _parse(self._volume_args, rest))
        raise UsageError(f"unknown subcommand {sub!r}; see %microagent? for the list")

    def _help(self, sub: str) -> str:
        parsers = {"run": self._run_args, "exec": self._exec_args, "create": self._create_args,
                   "status": self._status_args, "logs": self._logs_args, "volume": self._volume_args,
                   "volumes": self._volume_args}
        if sub in ("python", "session"):
            from . import python_session
            parsers[sub] = getattr(python_session, f"{sub}_args")
        if sub in parsers:
            parser = parsers[sub].parser
            parser.prog = f"%microagent {sub}"
            parser.formatter_class = argparse.RawDescriptionHelpFormatter  # "usage: ...", not IPython's "::"
            return parser.format_help().strip()
        usage = {"cp": "SRC DST", "outputs": "NAME", "output": "NAME OUTPUT [HOST_DEST]", "ps": "", "list": "",
                 "prune": ""}
        if sub in (*LIFECYCLE, "delete", "rm"):
            return f"usage: %microagent {sub} NAME"
        if sub in usage:
            return f"usage: %microagent {sub} {usage[sub]}".rstrip()
        raise UsageError(f"unknown subcommand {sub!r}; see %microagent --help")

    @staticmethod
    def _snapshot(engine: Engine, sub: str, rest: list[str]) -> Any:
        """%microagent snapshot WS NAME | snapshot list | snapshot rm NAME | snapshots"""
        if sub == "snapshots" or rest in (["list"], ["ls"]):
            rows = engine.snapshots()
            return D.Table(["NAME", "WORKSPACE", "CREATED", "STATE MiB"],
                           [[m["name"], m["workspace"], m["createdAt"], m["stateBytes"] >> 20] for m in rows],
                           data=rows, empty="(no snapshots)")
        if len(rest) == 2 and rest[0] in ("rm", "delete"):
            engine.remove_snapshot(rest[1])
            return D.Message(f"Removed snapshot {rest[1]}", {"name": rest[1], "removed": True})
        if len(rest) == 2 and not any(r.startswith("-") for r in rest):
            meta = engine.snapshot(rest[0], rest[1])
            return D.Message(f"Snapshot {meta['name']} of {meta['workspace']} taken (VM stopped "
                             f"{meta['stoppedSeconds']} s); resume it with %microagent create NEW --from-snapshot "
                             f"{meta['name']} --start", meta)
        raise UsageError("usage: %microagent snapshot WORKSPACE NAME | snapshot list | snapshot rm NAME")

    @staticmethod
    def _one_name(sub: str, parts: list[str]) -> str:
        if len(parts) != 1 or parts[0].startswith("-"):
            raise UsageError(f"usage: %microagent {sub} NAME")
        return parts[0]

    # ---- subcommands ---------------------------------------------------------------------------
    def _create(self, engine: Engine, args: argparse.Namespace) -> Any:
        if args.name and args.name_opt and args.name != args.name_opt:
            raise UsageError(f"two names given ({args.name!r} and --name {args.name_opt!r}); give one")
        args.name = args.name or args.name_opt
        if args.from_snapshot:
            info = engine.create(args.name, from_snapshot=args.from_snapshot, hostname=args.hostname,
                                 env=env_pairs(args.env) or None)
            return D.workspace_record(engine.start(info.name) if args.start else info)
        overrides = dict(image=args.image, profile=args.profile, memory_mib=args.memory, cpus=args.cpus,
                         size_mib=args.size_mib, hostname=args.hostname, network=network_kwarg(args),
                         **storage_kwargs(args), env=env_pairs(args.env) or None, name=args.name,
                         packages=[args.packages] if args.packages else None)
        spec_kwargs = self._spec_kwargs(args.file, args.allow_host_files)
        if spec_kwargs is not None:
            from microagent_engine.spec import merge

            overrides = merge(spec_kwargs, overrides)
        name, env = overrides.pop("name", None), overrides.pop("env", None)
        kwargs = create_kwargs(**overrides)
        info = engine.create(name, env=env, **kwargs)
        if args.start:
            info = engine.start(info.name)
        return D.workspace_record(info)

    @staticmethod
    def _spec_kwargs(path: str | None, allow_host_files: bool = False) -> dict[str, Any] | None:
        from pathlib import Path

        from microagent_engine import spec

        found = Path(path).expanduser() if path else spec.find_default_spec(Path.cwd())
        if found is None:
            return None
        if not found.is_file():
            raise NotFound(f"no spec file at {found}")
        return spec.load_spec(found, allow_host_files=allow_host_files).to_create_kwargs()

    def _volume(self, engine: Engine, args: argparse.Namespace) -> Any:
        volumes = engine.volumes
        action = {"ls": "list", "rm": "delete"}.get(args.action, args.action)
        if action != "list" and not args.name:
            raise UsageError(f"usage: %microagent volume {action} NAME")
        if action == "list":
            return D.volumes_table(list(volumes.list()))
        if action == "create":
            vol = volumes.create(args.name, **({"size_mib": args.size_mib} if args.size_mib else {}))
            return D.volume_record(vol)
        if action == "status":
            return D.volume_record(volumes.get(args.name))
        volumes.delete(args.name, force=args.force)
        return D.Message(f"Deleted volume {args.name}", {"name": args.name, "deleted": True})

    def _stream(self, args: argparse.Namespace,
                before_first: Callable[[], None] | None = None) -> tuple[_Sink, _Sink]:
        for var in (args.out, args.err, args.result):
            if var is not None and not var.isidentifier():
                raise UsageError(f"{var!r} is not a valid variable name")
        return (_Sink("stdout", args.out is not None, before_first),
                _Sink("stderr", args.err is not None, before_first))

    def _finish(self, args: argparse.Namespace, out: _Sink, err: _Sink, result: ExecResult | None,
                argv: list[str], workspace: str) -> None:
        stdout, stderr = out.finish(), err.finish()
        if args.out:
            self.shell.user_ns[args.out] = stdout
        if args.err:
            self.shell.user_ns[args.err] = stderr
        if result is None:
            return
        self.last_result = result
        if args.result:
            self.shell.user_ns[args.result] = result
        if not result.ok and not args.no_raise_error:
            raise MicroagentCellError(result, argv, workspace)

    def _run(self, engine: Engine, args: argparse.Namespace, cell: str | None) -> None:
        image, command = _split_image_command(args.command, args.image)
        argv = command or ["/bin/sh"]
        stdin = cell.encode() if cell is not None else None
        env = unbuffered_python(argv, env_pairs(args.env))
        ckw = create_kwargs(image=image, profile=args.profile, memory_mib=args.memory, cpus=args.cpus,
                            size_mib=args.size_mib, network=network_kwarg(args), **storage_kwargs(args),
                            packages=[args.packages] if args.packages else None)
        progress = CellProgress(self.in_kernel)
        engine.progress = progress
        out, err = self._stream(args, progress.done)
        result: ExecResult | None = None
        try:
            if args.name:
                result = self._run_named(engine, args, argv, stdin, env, ckw, out, err, progress)
                workspace = args.name
            else:
                info, result = engine.run(argv, delete=not args.keep, env=env, cwd=args.cwd, timeout=args.timeout,
                                          stdin=stdin, on_stdout=out, on_stderr=err, capture=True, **ckw)
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
        self._finish(args, out, err, result, argv, workspace)

    def _run_named(self, engine: Engine, args: argparse.Namespace, argv: list[str], stdin: bytes | None,
                   env: dict[str, str], ckw: dict[str, Any], out: _Sink, err: _Sink,
                   progress: CellProgress) -> ExecResult:
        name = args.name
        try:
            state = engine.status(name).state.state
            created = False
        except NotFound:
            user_env = env_pairs(args.env)
            engine.create(name, env=user_env, **ckw)  # the workspace keeps the user's env; exec adds the rest
            state, created = "prepared", True
            env = {k: v for k, v in env.items() if k not in user_env}
        try:
            if state in STARTABLE:
                progress(f"Booting {name}")
                engine.start(name)
            elif state != "running":
                raise InvalidState(f"workspace {name!r} is {state}; wait for it, or halt/kill it first")
        except BaseException:
            if created or state in STARTABLE:  # never leave a half-booted VM behind
                _kill_quietly(engine, name)
            if created:  # nor a record this cell made but could not start
                _delete_quietly(engine, name)
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
                _kill_quietly(engine, name)
            engine.delete(name)
        return result

    def _exec(self, engine: Engine, args: argparse.Namespace, cell: str | None) -> None:
        argv = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
        if not argv:
            if cell is None:
                raise UsageError("usage: %microagent exec NAME [options] -- COMMAND ...")
            argv = ["/bin/sh"]
        out, err = self._stream(args)
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
        self._finish(args, out, err, result, argv, args.name)


def _output_basename(engine: Engine, workspace: str, output: str) -> str:
    decl = next((o for o in engine.status(workspace).config.outputs if o.name == output), None)
    return decl.path.rstrip("/").rsplit("/", 1)[-1] if decl else output


def _alive(engine: Engine, name: str) -> bool:
    try:
        return engine.status(name).running
    except MicroagentError:
        return False


def _kill_quietly(engine: Engine, name: str) -> None:
    try:
        if engine.status(name).dir.supervisor_alive() or engine.status(name).running:
            engine.kill(name)
    except MicroagentError:
        pass


def _delete_quietly(engine: Engine, name: str) -> None:
    try:
        engine.delete(name)
    except MicroagentError:
        pass


_installed_handler: list[bool] = []


def _bodiless_cell_as_line(lines: list[str]) -> list[str]:
    """IPython refuses a cell magic with an empty body; ``%%microagent run --help`` alone in a cell is a line
    magic call, so rewrite it as one (an input transformer, run before IPython's magic parsing)."""
    body = [ln for ln in lines[1:] if ln.strip()]
    if lines and not body and lines[0].lstrip().startswith("%%microagent"):
        return [lines[0].lstrip()[1:]] + lines[1:]
    return lines


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(MicroagentMagics)
    if _bodiless_cell_as_line not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(_bodiless_cell_as_line)
    from .completion import install_completer
    install_completer(ipython)
    # engine errors are messages for the user, not bugs: show them without a traceback into the engine,
    # unless the user already installed their own custom exception handler
    if not ipython.custom_exceptions:
        ipython.set_custom_exc((MicroagentError, MicroagentCellError, MicroagentInterrupted), _short_traceback)
        _installed_handler.append(True)


def unload_ipython_extension(ipython: Any) -> None:
    if _bodiless_cell_as_line in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(_bodiless_cell_as_line)
    from .completion import uninstall_completer
    uninstall_completer(ipython)
    if _installed_handler:
        ipython.set_custom_exc((), None)
        _installed_handler.clear()
