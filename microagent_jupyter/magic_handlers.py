"""The ``%microagent`` line subcommands: workspaces, snapshots, files, volumes and Python sessions. Each takes a
:class:`~microagent_jupyter.magic_call.Call` and returns what the cell shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from microagent_engine import Engine
from microagent_engine.errors import NotFound
from microagent_engine.render import egress_text
from microagent_engine.spec_args import spec_from_args, workspace_name

from . import display as D
from .magic_args import create_args, logs_args, notebook_spec, status_args, volume_args
from .magic_call import Call
from .progress import CellProgress


def _no_arguments(call: Call) -> None:
    if call.argv:
        raise UsageError(f"%microagent {call.sub} takes no arguments")


def _one_name(call: Call) -> str:
    if len(call.argv) != 1 or call.argv[0].startswith("-"):
        raise UsageError(f"usage: %microagent {call.sub} NAME")
    return call.argv[0]


def ps(call: Call) -> Any:
    _no_arguments(call)
    return D.workspaces_table(call.engine.ps() if call.sub == "ps" else call.engine.list())


def status(call: Call) -> Any:
    args = status_args.parser.parse_args(call.argv)
    info = call.engine.status(args.name)
    if args.static or not call.in_kernel:
        return D.workspace_record(info)
    from .widgets import WorkspaceStatusWidget
    return WorkspaceStatusWidget(call.engine, args.name)


def logs(call: Call) -> Any:
    args = logs_args.parser.parse_args(call.argv)
    call.engine.status(args.name)
    if args.static or not call.in_kernel:
        text = b"".join(call.engine.logs(args.name)).decode(errors="replace").replace("\r\n", "\n")
        return D.Text("\n".join(text.splitlines()[-args.max_lines:]))
    from .widgets import SerialLogWidget
    return SerialLogWidget(call.engine, args.name, max_lines=args.max_lines)


def create(call: Call) -> Any:
    engine, args = call.engine, create_args.parser.parse_args(call.argv)
    name = workspace_name(args.name, args.name_opt)
    if args.file and not args.from_snapshot and not Path(args.file).expanduser().is_file():
        raise NotFound(f"no spec file at {args.file}")
    spec, spec_name = spec_from_args(args)
    spec = notebook_spec(spec)
    info = engine.create(name or spec_name, spec)
    if args.start:
        info = engine.start(info.name)
    return D.workspace_record(info)


def egress(call: Call) -> Any:
    """``%microagent egress NAME``: the text of ``microagent egress NAME`` (where the next step names the magic)."""
    report = call.engine.egress(_one_name(call))
    return D.Text(egress_text(report, "%microagent"))


def allow(call: Call) -> Any:
    """``%microagent allow NAME ENTRY ...``."""
    if len(call.argv) < 2:
        raise UsageError("usage: %microagent allow NAME ENTRY ...  (ENTRY: a name, *.suffix, a preset such as "
                         "@pypi, or a CIDR; with :PORT)")
    info = call.engine.allow(call.argv[0], call.argv[1:])
    return D.Text(f"{info.name}: {info.config.network_policy.describe()}")


def lifecycle(call: Call) -> Any:
    """start, pause, resume, sleep, halt, stop, kill: the engine method of that name."""
    name = _one_name(call)
    info = getattr(call.engine, call.sub)(name)
    return D.Message(f"Workspace {name}: {info.state.state}", info.to_json(), info.state.state)


def delete(call: Call) -> Any:
    name = _one_name(call)
    call.engine.delete(name)
    return D.Message(f"Deleted workspace {name}", {"name": name, "deleted": True})


def snapshot(call: Call) -> Any:
    """%microagent snapshot WS NAME | snapshot list | snapshot rm NAME | snapshots"""
    engine, rest = call.engine, call.argv
    if call.sub == "snapshots" or rest in (["list"], ["ls"]):
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


def cp(call: Call) -> Any:
    parts, max_size = _max_size_option(call.argv)
    if len(parts) != 2:
        raise UsageError("usage: %microagent cp [--max-size SIZE] SRC DST   (one side is WORKSPACE:/path or "
                         "WORKSPACE:DISK:/path)")
    result = call.engine.cp(parts[0], parts[1], max_size)
    return D.Message(f"Copied {parts[0]} → {parts[1]}", {"copied": str(result)} if result is not None else None)


def outputs(call: Call) -> Any:
    rows = call.engine.outputs(_one_name(call))
    return D.Table(["NAME", "PATH", "EXISTS"], [[o["name"], o["path"], o.get("exists")] for o in rows],
                   data=rows, empty="(no declared outputs)")


def output(call: Call) -> Any:
    parts, max_size = _max_size_option(call.argv)
    if len(parts) not in (2, 3):
        raise UsageError("usage: %microagent output [--max-size SIZE] NAME OUTPUT [HOST_DEST]")
    got = call.engine.output_get(parts[0], parts[1], parts[2] if len(parts) == 3 else None, max_size)
    if isinstance(got, bytes):
        return D.output_bytes(got, _output_basename(call.engine, parts[0], parts[1]))
    return D.Message(f"Output {parts[1]} of {parts[0]} copied to {got}", {"path": str(got)})


def _output_basename(engine: Engine, workspace: str, output: str) -> str:
    decl = next((o for o in engine.status(workspace).config.outputs if o.name == output), None)
    return decl.path.rstrip("/").rsplit("/", 1)[-1] if decl else output


def prune(call: Call) -> Any:
    _no_arguments(call)
    gone = call.engine.prune()
    return D.Message(f"Removed {len(gone)} stopped one-shot workspace(s)", {"removed": gone})


def volume(call: Call) -> Any:
    args, volumes = volume_args.parser.parse_args(call.argv), call.engine.volumes
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


def python(call: Call) -> Any:
    """``%%microagent python``: a persistent sandboxed IPython session (microagent_jupyter.python_session)."""
    from .python_session import python_magic
    return python_magic(call.shell, call.engine, call.argv, call.cell, CellProgress(call.in_kernel))


def session(call: Call) -> Any:
    from .python_session import session_magic
    return D.Text(session_magic(call.engine, call.argv))
