"""The ``microagent`` command line: a thin layer over :class:`microagent_engine.Engine`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, NoReturn, Sequence

from . import __version__

from .client import DEFAULT_MAX_OUTPUT
from .config import COMMIT_MAX_SIZE_HELP, MAX_SIZE_HELP, PROFILES, parse_env_pairs
from .errors import InvalidArgument, MicroagentError
from .protocol import ExitKind, FrameType
from .storage.volumes import DEFAULT_SIZE_MIB, render_created, render_deleted, render_list, render_status
from .engine import Engine, RunOptions, WorkspaceInfo
from .spec_args import add_workspace_arguments, spec_from_args, workspace_name
from .network_policy import ALLOW_SYNTAX
from .timeline import mark
from .render import egress_text, fields_text, status_fields, summary_fields, text_table

Handler = Callable[[Engine, argparse.Namespace], int]
#: the entry-point group front-ends register what ``microagent prepare`` builds under
PREPARE_ENTRY_POINTS = "microagent.prepare"


_table = text_table


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _describe(info: WorkspaceInfo) -> str:
    return fields_text(summary_fields(info))


def _status_text(info: WorkspaceInfo) -> str:
    return fields_text(status_fields(info))


def _list_text(infos: list[WorkspaceInfo]) -> str:
    rows = [[i.name, i.state.state, i.state.backend or "qemu", i.config.profile,
             i.config.network_policy.mode, i.config.restart] for i in infos]
    return _table(rows, ["NAME", "STATE", "BACKEND", "PROFILE", "NETWORK", "RESTART"])


# ---- handlers ------------------------------------------------------------------------------------


def _name(args: argparse.Namespace, spec_name: str | None = None) -> str | None:
    return workspace_name(getattr(args, "name", None), args.name_opt, spec_name)


def cmd_create(engine: Engine, args: argparse.Namespace) -> int:
    spec, spec_name = spec_from_args(args)
    info = engine.create(_name(args, spec_name), spec)
    tail = f"\n(start it to resume snapshot {args.from_snapshot})" if args.from_snapshot else ""
    _emit(args, info.to_json(), _describe(info) + tail)
    return 0


def cmd_snapshot(engine: Engine, args: argparse.Namespace) -> int:
    from .snapshots.workspace import render_snapshots

    words = args.words
    if args.cmd == "snapshots" or words in (["list"], ["ls"]):
        metas = engine.snapshots()
        _emit(args, metas, render_snapshots(metas))
    elif len(words) == 2 and words[0] in ("rm", "delete"):
        engine.remove_snapshot(words[1])
        _emit(args, {"name": words[1], "removed": True}, f"Removed snapshot {words[1]}")
    elif len(words) == 2:
        meta = engine.snapshot(words[0], words[1])
        _emit(args, meta, f"Snapshot {meta['name']} of {meta['workspace']} taken (VM stopped "
                          f"{meta['stoppedSeconds']} s; {meta['stateBytes'] >> 20} MiB state); resume it with "
                          f"'microagent create NEW --from-snapshot {meta['name']}' and start")
    else:
        raise InvalidArgument("usage: microagent snapshot WORKSPACE NAME | snapshot list | snapshot rm NAME")
    return 0


def cmd_start(engine: Engine, args: argparse.Namespace) -> int:
    info = engine.start(args.name, cold=args.cold)
    mode = info.state.boot_mode + (f": {info.state.cold_reason}" if info.state.cold_reason else "")
    _emit(args, info.to_json(), f"Workspace {info.name} running (accel {info.state.accel}, "
                                f"boot {info.state.boot_seconds} s, {mode})")
    return 0


def _stdin_source(args: argparse.Namespace) -> Any:
    if getattr(args, "interactive", False) or not sys.stdin.isatty():
        return sys.stdin.buffer
    return None


def _writer(stream: Any) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()
    return write


def cmd_exec(engine: Engine, args: argparse.Namespace) -> int:
    streaming = not args.json
    result = engine.exec(
        args.name, args.command, env=parse_env_pairs(args.env), cwd=args.cwd, timeout=args.timeout,
        stdin=_stdin_source(args), capture=args.json, max_output=args.max_output,
        on_stdout=_writer(sys.stdout.buffer) if streaming else None,
        on_stderr=_writer(sys.stderr.buffer) if streaming else None)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.status == ExitKind.TIMED_OUT:
        print(f"microagent: command timed out after {args.timeout} s", file=sys.stderr)
    elif result.status == ExitKind.FAILED_TO_START:
        print(f"microagent: {args.command[0]}: {result.message}", file=sys.stderr)
    return result.exit_code


def cmd_run(engine: Engine, args: argparse.Namespace) -> int:
    positionals = list(args.positionals)  # [IMAGE] COMMAND...: after the first word, everything is the command
    if args.image is None and positionals:
        args.image = positionals.pop(0)
    command = positionals + args.command
    if args.exec_line:
        if command:
            raise InvalidArgument("give the command either with --exec or as arguments, not both")
        command = ["/bin/sh", "-c", args.exec_line]
    streaming = not args.json
    spec, spec_name = spec_from_args(args)
    options = RunOptions(name=_name(args, spec_name), delete=args.delete, cwd=args.cwd, timeout=args.timeout,
                         stdin=_stdin_source(args), capture=args.json, max_output=args.max_output,
                         on_stdout=_writer(sys.stdout.buffer) if streaming else None,
                         on_stderr=_writer(sys.stderr.buffer) if streaming else None)
    info, result = engine.run(command, spec, options)
    if args.json:
        print(json.dumps({"workspace": info.name, "deleted": args.delete, **result.to_json()}, indent=2))
    return result.exit_code


def cmd_prune(engine: Engine, args: argparse.Namespace) -> int:
    gone = engine.prune()
    _emit(args, {"removed": gone}, f"Removed {len(gone)} stopped one-shot workspace(s)"
          + "".join(f"\n  {n}" for n in gone))
    return 0


def cmd_list(engine: Engine, args: argparse.Namespace) -> int:
    infos = engine.list()
    _emit(args, [i.to_json() for i in infos], _list_text(infos))
    return 0


def cmd_ps(engine: Engine, args: argparse.Namespace) -> int:
    infos = engine.ps()
    _emit(args, [i.to_json() for i in infos], _list_text(infos))
    return 0


def cmd_status(engine: Engine, args: argparse.Namespace) -> int:
    info = engine.status(args.name)
    _emit(args, info.to_json(), _status_text(info))
    return 0


def cmd_prepare(engine: Engine, args: argparse.Namespace) -> int:
    """``prepare WHAT``: what an installed front-end registers under the ``microagent.prepare`` entry points (the
    Jupyter package: ``python``, its image and warm snapshot), so the engine imports no front-end."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=PREPARE_ENTRY_POINTS)}
    if args.what not in found:
        known = ", ".join(sorted(found)) or "none (install microagent_jupyter: pip install -e .)"
        raise InvalidArgument(f"nothing to prepare named {args.what!r}; known: {known}")
    line = found[args.what].load()(engine, engine.progress)
    _emit(args, {"prepared": args.what, "detail": line}, line)
    return 0


def cmd_egress(engine: Engine, args: argparse.Namespace) -> int:
    report = engine.egress(args.name)
    _emit(args, report, egress_text(report))
    return 0


def cmd_allow(engine: Engine, args: argparse.Namespace) -> int:
    info = engine.allow(args.name, args.entries)
    _emit(args, info.to_json(), f"{info.name}: {info.config.network_policy.describe()}")
    return 0


def _lifecycle(verb: str) -> Handler:
    def handler(engine: Engine, args: argparse.Namespace) -> int:
        info = getattr(engine, verb)(args.name)
        _emit(args, info.to_json(), f"Workspace {info.name}: {info.state.state}")
        return 0 if info.state.state != "failed" else 1
    return handler


def cmd_delete(engine: Engine, args: argparse.Namespace) -> int:
    engine.status(args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidArgument(f"delete {args.name}: pass --yes to confirm (no terminal to ask on)")
        answer = input(f"Delete workspace {args.name!r} and its disk? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Not deleted.")
            return 1
    engine.delete(args.name)
    _emit(args, {"name": args.name, "deleted": True}, f"Deleted workspace {args.name}")
    return 0


def cmd_logs(engine: Engine, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    try:
        for chunk in engine.logs(args.name, follow=args.follow):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_connect(engine: Engine, args: argparse.Namespace) -> int:
    if args.send is not None:
        print(engine.console_send(args.name, args.send, timeout=args.timeout))
        return 0
    if not sys.stdin.isatty():
        raise InvalidArgument("connect needs a terminal for an interactive console; use --send LINE in scripts")
    import termios
    import tty

    conn = engine.console(args.name)
    print(f"Connected to {args.name}'s serial console. Press Ctrl-] to detach.\r", file=sys.stderr)
    old = termios.tcgetattr(0)
    stop = threading.Event()

    def pump_input() -> None:
        while not stop.is_set():
            data = os.read(0, 1024)
            if not data or b"\x1d" in data:
                stop.set()
                conn.sock.shutdown(2)
                return
            conn.send(FrameType.STDIN, 0, data)

    try:
        tty.setraw(0)
        threading.Thread(target=pump_input, daemon=True).start()
        conn.send(FrameType.STDIN, 0, b"\n")
        for frame in conn.frames():
            if frame.type == FrameType.STDOUT:
                sys.stdout.buffer.write(frame.payload)
                sys.stdout.buffer.flush()
    except MicroagentError:
        pass
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, old)
        conn.close()
    print("\nDetached.", file=sys.stderr)
    return 0


def cmd_cp(engine: Engine, args: argparse.Namespace) -> int:
    where = engine.cp(args.src, args.dst, args.max_size)
    _emit(args, {"src": args.src, "dst": str(where)}, f"Copied {args.src} -> {where}")
    return 0


def cmd_output(engine: Engine, args: argparse.Namespace) -> int:
    if args.output_cmd == "get":
        if not args.output:
            raise InvalidArgument("output get needs the output's name: microagent output get WS NAME [DEST]")
        if args.dest is None and not args.json:
            sys.stdout.buffer.write(engine.output_get(args.name, args.output,  # type: ignore[arg-type]
                                                      max_size=args.max_size))
            return 0
        where = engine.output_get(args.name, args.output, args.dest or ".", args.max_size)
        _emit(args, {"name": args.output, "path": str(where)}, f"Wrote {where}")
        return 0
    outs = engine.outputs(args.name)
    rows = [[o["name"], o["path"], "yes" if o["exists"] else "no"] for o in outs]
    _emit(args, outs, _table(rows, ["NAME", "PATH", "EXISTS"]))
    return 0


def cmd_volume(engine: Engine, args: argparse.Namespace) -> int:
    reg = engine.volumes
    if args.volume_cmd == "create":
        vol = reg.create(args.name, args.size_mib) if args.size_mib else reg.create(args.name)
        _emit(args, vol.to_json(), render_created(vol))
    elif args.volume_cmd in ("list", "ls"):
        vols = reg.list()
        _emit(args, [v.to_json() for v in vols], render_list(vols))
    elif args.volume_cmd == "status":
        vol = reg.get(args.name)
        _emit(args, vol.to_json(), render_status(vol))
    elif args.volume_cmd in ("delete", "rm"):
        vol = reg.delete(args.name, force=args.force)
        _emit(args, vol.to_json(), render_deleted(vol))
    else:
        raise InvalidArgument("volume needs a subcommand: create, list, status or delete")
    return 0


def cmd_images(engine: Engine, args: argparse.Namespace) -> int:
    sub = args.images_cmd or "list"
    if sub == "list":
        imgs = engine.list_images()
        rows = [[", ".join(i.refs) or "-", i.id[:19], str(i.size_mib), i.platform] for i in imgs]
        _emit(args, [i.to_json() for i in imgs], _table(rows, ["REFERENCE", "ID", "SIZE-MIB", "PLATFORM"]))
    elif sub in ("rm", "remove"):
        if not args.ref:
            raise InvalidArgument("images rm needs a reference or an id")
        img = engine.images.remove(args.ref)
        _emit(args, img.to_json(), f"Removed image {img.id}")
    elif sub == "prune":
        gone = engine.prune_images()
        _emit(args, [i.to_json() for i in gone], f"Removed {len(gone)} unused image(s)")
    return 0


def cmd_pull(engine: Engine, args: argparse.Namespace) -> int:
    img = engine.pull(args.ref)
    _emit(args, img.to_json(), f"Pulled {args.ref} ({img.id}, rootfs {img.size_mib} MiB)")
    return 0


def cmd_commit(engine: Engine, args: argparse.Namespace) -> int:
    img = engine.commit(args.name, args.ref, args.max_size)
    _emit(args, img.to_json(), f"Committed {args.name} as {args.ref} ({img.id})")
    return 0


def cmd_profiles(engine: Engine, args: argparse.Namespace) -> int:
    rows = [[p.name, str(p.memory_mib), str(p.cpus), str(p.disk_mib)] for p in PROFILES.values()]
    data = [{"name": p.name, "memoryMiB": p.memory_mib, "cpuCount": p.cpus, "sizeMiB": p.disk_mib}
            for p in PROFILES.values()]
    _emit(args, data, _table(rows, ["NAME", "MEMORY-MIB", "CPUS", "DISK-MIB"]))
    return 0


def cmd_doctor(engine: Engine, args: argparse.Namespace) -> int:
    from .doctor import diagnose, render

    report = diagnose(engine)
    _emit(args, report, render(report))
    return 0 if report["ok"] else 1


# ---- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help="state directory (default ~/.microagent, "
                        "or $MICROAGENT_STATE_DIR)")

    parser = argparse.ArgumentParser(prog="microagent", description="microVM workspaces", parents=[common])
    parser.add_argument("--version", action="version", version=f"microagent {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")

    def add(name: str, handler: Handler, help_: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, parents=[common], aliases=list(aliases))
        p.set_defaults(handler=handler)
        return p

    def create_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", dest="name_opt", help="workspace name")
        add_workspace_arguments(p)

    def exec_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cwd", help="working directory in the guest")
        p.add_argument("--timeout", type=float, metavar="SECONDS", help="TERM then KILL the command after this")
        p.add_argument("-i", "--interactive", action="store_true", help="forward stdin even from a terminal")
        p.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT, metavar="BYTES",
                       help=f"with --json: keep at most this much of stdout and of stderr (default "
                            f"{DEFAULT_MAX_OUTPUT}; more is cut with a marker and \"truncated\": true)")

    p = add("create", cmd_create, "create a workspace (state prepared)")
    p.add_argument("name", nargs="?")
    create_flags(p)
    p.add_argument("--from-snapshot", metavar="SNAPSHOT", help="a clone of a workspace snapshot (own copy of its "
                   "disk); its first start resumes the snapshot with its processes running")

    p = add("start", cmd_start, "boot a workspace")
    p.add_argument("name")
    p.add_argument("--cold", action="store_true", help="boot cold, not from the machine shape's template")

    p = add("exec", cmd_exec, "run a command in a running workspace: exec NAME -- CMD [ARGS...]")
    p.add_argument("name")
    p.add_argument("command", nargs="*")
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE")
    exec_flags(p)

    p = add("run", cmd_run, "create + start + exec (+ halt): run [options] [IMAGE] [CMD...] (after IMAGE every "
            "word is the command's, options included)")
    p.add_argument("positionals", nargs=argparse.REMAINDER, metavar="[IMAGE] CMD")
    create_flags(p)
    exec_flags(p)
    p.add_argument("--exec", dest="exec_line", metavar="LINE", help="command line run with /bin/sh -c")
    p.add_argument("--delete", action="store_true", help="delete the workspace afterwards")
    p.set_defaults(command=[])

    add("list", cmd_list, "saved workspaces", aliases=["ls"])
    add("ps", cmd_ps, "running workspaces")
    add("prune", cmd_prune, "remove stopped one-shot workspaces (those run made under a generated name)")
    p = add("status", cmd_status, "one workspace (with --json: readiness signals)")
    p.add_argument("name")
    p = add("prepare", cmd_prepare, "build ahead of first use, with progress: prepare python (the built-in Python "
            "image and the warm snapshot notebooks start from)")
    p.add_argument("what", metavar="WHAT", help="python")
    p = add("egress", cmd_egress, "what a workspace's DNS and egress proxy refused, and its network policy")
    p.add_argument("name")
    p = add("allow", cmd_allow, "widen a workspace's allow-list (at once when it runs): allow NAME ENTRY...")
    p.add_argument("name")
    p.add_argument("entries", nargs="+", metavar="ENTRY", help=ALLOW_SYNTAX)
    for verb, text in (("halt", "clean disk-preserving shutdown"),
                       ("stop", "ask the guest to shut down; failed after 5 s (no kill)"),
                       ("kill", "terminate the VM at once"),
                       ("pause", "freeze a running workspace's VM (processes keep their state)"),
                       ("resume", "continue a paused workspace, or wake a sleeping one"),
                       ("sleep", "save a workspace's memory to a file and end its VM, keeping its commands, ports "
                                 "and connections; the next exec, port traffic or resume wakes it")):
        p = add(verb, _lifecycle(verb), text)
        p.add_argument("name")
    p = add("snapshot", cmd_snapshot, "workspace snapshots: snapshot WORKSPACE NAME (memory + disk, the VM "
            "stopped briefly) | snapshot list | snapshot rm NAME")
    p.add_argument("words", nargs="+", metavar="WORKSPACE NAME | list | rm NAME")
    p = add("snapshots", cmd_snapshot, "list workspace snapshots")
    p.set_defaults(words=[])
    p = add("delete", cmd_delete, "remove a workspace and its disk", aliases=["rm"])
    p.add_argument("name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p = add("logs", cmd_logs, "serial console output")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing while the workspace runs")
    p = add("connect", cmd_connect, "serial console: interactive, or --send LINE")
    p.add_argument("name")
    p.add_argument("--send", metavar="LINE", help="type LINE into the console shell and print its output")
    p.add_argument("--timeout", type=float, default=30.0)
    p = add("quarantine", _lifecycle("quarantine"), "sever network and mediation; keep disk and logs")
    p.add_argument("name")
    p = add("cp", cmd_cp, "copy a file between the host and a stopped workspace (WS:/path or WS:DISK:/path)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--max-size", metavar="SIZE", help=MAX_SIZE_HELP)
    p = add("output", cmd_output, "declared outputs of a workspace: output list WS | output get WS NAME [DEST]",
            aliases=["artifacts"])
    p.add_argument("output_cmd", choices=["list", "get"])
    p.add_argument("name")
    p.add_argument("output", nargs="?")
    p.add_argument("dest", nargs="?")
    p.add_argument("--max-size", metavar="SIZE", help=MAX_SIZE_HELP)
    p = add("volume", cmd_volume, "named volumes: create | list | status | delete")
    vsub = p.add_subparsers(dest="volume_cmd", metavar="SUBCOMMAND")
    vp = vsub.add_parser("create", parents=[common], help="create a named volume")
    vp.add_argument("name")
    vp.add_argument("--size-mib", type=int, help=f"size in MiB (default {DEFAULT_SIZE_MIB})")
    vsub.add_parser("list", parents=[common], aliases=["ls"], help="list volumes")
    vp = vsub.add_parser("status", parents=[common], help="one volume")
    vp.add_argument("name")
    vp = vsub.add_parser("delete", parents=[common], aliases=["rm"], help="delete a volume and its data")
    vp.add_argument("name")
    vp.add_argument("--force", action="store_true", help="delete even while attached to a running workspace")
    p = add("pull", cmd_pull, "fetch an OCI image and build its rootfs (registry, oci:, oci-archive:, "
            "docker-archive:)")
    p.add_argument("ref")
    p = add("images", cmd_images, "cached images: images [list] | images rm REF | images prune")
    p.add_argument("images_cmd", nargs="?", choices=["list", "rm", "remove", "prune"])
    p.add_argument("ref", nargs="?")
    p = add("commit", cmd_commit, "write a stopped workspace's rootfs as an OCI image: commit WS REF")
    p.add_argument("name")
    p.add_argument("ref")
    p.add_argument("--max-size", metavar="SIZE", help=COMMIT_MAX_SIZE_HELP)
    add("profiles", cmd_profiles, "resource profiles")
    add("doctor", cmd_doctor, "what this host can do (KVM or TCG, qemu, kernel, e2fsprogs)")
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the CLI: raised where it was, so cleanups run (a default death skips them)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminations_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    before = {sig: signal.signal(sig, raise_) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    mark("cli: imported")
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    args.json = getattr(args, "json", False)
    if hasattr(args, "command"):
        args.command = list(args.command) + tail
    elif tail:
        parser.error(f"{args.cmd} takes no command after '--'")
    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    engine = Engine(getattr(args, "state_dir", None), progress=progress)
    try:
        with _terminations_raise():
            return args.handler(engine, args)
    except Terminated as exc:  # what was under way cleaned up as for Ctrl-C (run: no VM left running)
        print(f"microagent: terminated by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    except MicroagentError as exc:
        print(f"microagent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("microagent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `microagent logs ws | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141



def entry() -> NoReturn:
    """The ``microagent`` command: :func:`main`, then its output flushed and the process ended without tearing the
    interpreter down (finalizing the engine's modules took 30-50 ms of every command)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # the reader left, or a command closed a stream: nothing more to say
        pass
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    entry()
