"""One workspace request (WorkspaceSpec): its JSON form, its merge rules, the rules between fields, one argparse
group for the CLI and the magics, the record that embeds it, and the panel's types generated from its schema."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_conftest_helpers import REPO
from microagent_engine import Engine, WorkspaceSpec
from microagent_engine.cli import build_parser
from microagent_engine.errors import InvalidArgument, MicroagentError
from microagent_engine.model import Attachment, Output, Publish
from microagent_engine.network_policy import NetworkPolicy
from microagent_engine.spec_args import spec_from_args
from microagent_engine.workspace_spec import json_keys

FULL_JSON = {
    "image": "builtin:python", "packages": ["git", "python3-scipy"], "profile": "small", "memoryMiB": 512,
    "cpus": 1, "sizeMiB": 2048, "env": {"A": "1"}, "hostname": "box", "network": {"mode": "user",
    "allow": ["203.0.113.7"], "hostPorts": [8080]}, "accel": "tcg", "restart": "on-failure", "shell": "/bin/sh",
    "setup": ["true"], "entrypoint": "sleep 1", "mediation": {"port": 2048, "target": "127.0.0.1:9900"},
    "attachments": [{"kind": "volume", "source": "data", "mountpoint": "/data"}],
    "outputs": [{"name": "report", "path": "/data/r.json"}], "publish": [{"hostPort": 0, "guestPort": 80}],
    "cold": True,
}


def test_json_form_round_trips_and_normalises() -> None:
    with pytest.raises(InvalidArgument, match="'203.0.113.7' lies inside"):
        WorkspaceSpec.from_json(FULL_JSON)  # documentation addresses are never reachable: refused when built
    data = {**FULL_JSON, "network": {"mode": "user", "allow": ["45.33.32.0/24:443"], "hostPorts": [8080]}}
    spec = WorkspaceSpec.from_json(data)
    assert spec.network == NetworkPolicy.parse(data["network"])  # a typed object, parsed once
    assert spec.attachments == (Attachment("volume", "data", "data", "/data"),)
    assert spec.outputs == (Output("report", "/data/r.json"),)
    assert spec.publish == (Publish(0, 80),)
    assert WorkspaceSpec.from_json(spec.to_json()) == spec
    assert set(spec.to_json()) == set(data)
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # frozen all the way down
    assert WorkspaceSpec().to_json() == {}


@pytest.mark.parametrize("data, message", [
    ({"memory": 512}, "unknown field(s) memory; known: image, packages"),
    ({"memoryMiB": "512"}, "memoryMiB must be an integer"),
    ({"memoryMiB": True}, "memoryMiB must be an integer"),
    ({"memoryMiB": 0}, "--memory must be a positive whole number"),
    ({"env": {"A": 1}}, "env must be an object of string values"),
    ({"env": {"1A": "x"}}, "invalid environment variable name"),
    ({"setup": "true"}, "setup must be a list"),
    ({"shell": "sh"}, "shell must be an absolute guest path"),
    ({"profile": "huge"}, "unknown profile 'huge'"),
    ({"restart": "sometimes"}, "unknown restart policy"),
    ({"network": {"mode": "isolated", "allow": ["pypi.org"]}}, "network mode isolated has no network device"),
    ({"attachments": [{"kind": "volume", "source": "d", "mountpoint": "/"}]}, "reserved by the guest system"),
    ({"publish": [{"hostPort": 1, "guestPort": 2}, {"hostPort": 1, "guestPort": 3}]}, "published twice"),
    ({"files": [{"src": "rel.txt", "dst": "/x"}]}, "must be an absolute host path"),
    ({"image": "a\0b"}, "must not contain a NUL byte"),
    ([], "must be an object, got list"),
])
def test_bad_json_gets_a_clear_error(data, message) -> None:
    with pytest.raises(InvalidArgument) as info:
        WorkspaceSpec.from_json(data)
    assert message in str(info.value)


def test_fields_that_contradict_each_other_are_refused_by_check() -> None:
    with pytest.raises(InvalidArgument, match=r"only a name, --hostname and -e/--env .*\(not image, memory_mib\)"):
        WorkspaceSpec(from_snapshot="snap", image="x", memory_mib=256, env={"A": "1"}).check()
    assert WorkspaceSpec(from_snapshot="snap", hostname="h", env={"A": "1"}).check()
    with pytest.raises(InvalidArgument, match="packages can only be added to the built-in Debian image"):
        WorkspaceSpec(packages=["git"]).check()
    WorkspaceSpec(image="builtin:python", packages=["git"]).check()
    # a partial request (a spec file completed by flags) is not checked until it is whole
    assert WorkspaceSpec(packages=["git"]).merged(WorkspaceSpec(image="builtin:python")).check()


def test_merge_rules() -> None:
    base = WorkspaceSpec(image="a", env={"A": "1", "B": "1"}, setup=["one"],
                         attachments=[Attachment("volume", "d", "d", "/d"), Attachment("volume", "e", "e", "/e")],
                         outputs=[Output("r", "/r")])
    over = WorkspaceSpec(env={"B": "2"}, setup=["two"], attachments=[Attachment("volume", "f", "f", "/e")],
                         outputs=[Output("r", "/s"), Output("t", "/t")])
    merged = base.merged(over)
    assert merged.image == "a"  # not set over: kept
    assert merged.env == {"A": "1", "B": "2"}  # key by key
    assert merged.setup == ("two",)  # other lists: replaced
    assert [a.source for a in merged.attachments] == ["d", "f"]  # same mountpoint replaced, others added
    assert merged.outputs == (Output("r", "/s"), Output("t", "/t"))  # same name replaced
    assert base.merged(None) is base


def _workspace_options(parser: argparse.ArgumentParser) -> set[str]:
    groups = [g for g in parser._action_groups if g.title == "workspace"]
    assert len(groups) == 1, "the workspace flags come from spec_args.add_workspace_arguments"
    return {s for a in groups[0]._group_actions for s in a.option_strings}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_cli_and_magics_share_one_argparse_group() -> None:
    from microagent_jupyter.magic_args import create_args, run_args
    from microagent_jupyter.python_session import python_args

    cli_create, cli_run = _workspace_options(_subparser("create")), _workspace_options(_subparser("run"))
    assert cli_create == cli_run == _workspace_options(create_args.parser) == _workspace_options(run_args.parser)
    assert {"--image", "--memory", "--allow", "-v", "--publish", "--file", "--cold"} <= cli_create
    assert _workspace_options(python_args.parser) <= cli_create  # the sessions take a subset
    ns = run_args.parser.parse_args(["--memory", "300", "-e", "A=1", "--network", "isolated", "-v", "d:/d"])
    spec, name = spec_from_args(ns, find_spec=False)
    assert name is None
    assert spec == WorkspaceSpec(memory_mib=300, env={"A": "1"}, network="isolated",
                                 attachments=[Attachment("volume", "d", "d", "/d")])


def test_flags_merge_over_a_spec_file(tmp_path: Path) -> None:
    (tmp_path / "microagent.yaml").write_text(
        "name: from-file\nimage: builtin\nenv: {A: '1'}\nnetwork: {mode: user, hostPorts: [8080]}\n")
    ns = _subparser("create").parse_args(["--allow", "45.33.32.0/24", "-e", "B=2", "--cpus", "1"])
    spec, name = spec_from_args(ns, cwd=tmp_path)
    assert name == "from-file"
    assert spec.image == "builtin" and spec.cpus == 1 and spec.env == {"A": "1", "B": "2"}
    assert spec.network.to_json() == {"mode": "user", "allow": ["45.33.32.0/24"], "hostPorts": [8080]}
    ns = _subparser("create").parse_args(["--from-snapshot", "snap", "--file", str(tmp_path / "microagent.yaml")])
    with pytest.raises(InvalidArgument, match="drop --file"):
        spec_from_args(ns, cwd=tmp_path)


def test_the_record_embeds_the_request(engine: Engine) -> None:
    spec = WorkspaceSpec(memory_mib=200, env={"A": "1"}, network={"mode": "user", "hostPorts": [8080]})
    info = engine.create("spec-record", spec)
    try:
        assert info.config.spec == spec.to_json()
        assert engine.status("spec-record").config.network_policy == spec.network
        with pytest.raises(InvalidArgument, match="either as a WorkspaceSpec or as keywords"):
            engine.create("spec-record-2", spec, memory_mib=300)
        with pytest.raises(InvalidArgument, match="WorkspaceSpec"):
            engine.create("spec-record-2", memroy_mib=300)
    finally:
        engine.delete("spec-record")
    assert not any(i.name.startswith("spec-record") for i in engine.list())


def test_panel_types_are_generated_from_the_schema() -> None:
    """labextension/src/workspaceSpec.ts is what WorkspaceSpec.json_schema() generates (run
    python scripts/panel_types.py after changing a field)."""
    schema = WorkspaceSpec.json_schema()
    assert list(schema["properties"]) == list(json_keys())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "panel_types.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    ts = (REPO / "labextension" / "src" / "workspaceSpec.ts").read_text()
    for key in json_keys():
        assert f"\n  {key}?:" in ts


def test_no_input_makes_from_json_raise_anything_else() -> None:
    """Whatever JSON a REST client or a kernelspec sends, the answer is a MicroagentError (never a traceback)."""
    values = [None, True, 0, -1, 2**70, 1.5, "", "x" * 5000, "\0", [], [1], {}, {"a": 1}, [{"kind": "disk"}]]
    for key in json_keys():
        for value in values:
            try:
                WorkspaceSpec.from_json({key: value})
            except MicroagentError:
                pass
    json.dumps(WorkspaceSpec.json_schema())  # the schema is plain JSON


def test_a_misspelt_builtin_image_is_refused_with_the_name_meant() -> None:
    with pytest.raises(InvalidArgument, match="unknown built-in image 'builtin:pyhton'; did you mean builtin:python"):
        WorkspaceSpec(image="builtin:pyhton")  # not docker.io/library/builtin:pyhton
