"""Every public Engine method through the Python API (the CLI, magics and REST are thin layers over these)."""

from __future__ import annotations

import socket
import socketserver
import threading
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, InvalidState
from microagent_engine.model import Output, parse_mediation_flag
from microagent_engine.states import ACTIONS

pytestmark = pytest.mark.vm


def test_lifecycle_console_outputs_commit_through_the_api(engine: Engine, tmp_path: Path) -> None:
    name = "api"
    info = engine.create(name, profile="tiny", outputs=[Output("note", "/root/note.txt")])
    assert info.actions == ["start", "delete", "cp", "commit", "output"]
    info = engine.start(name)
    assert set(info.actions) == {"pause", "sleep", "snapshot", "halt", "stop", "kill", "quarantine", "exec", "publish",
                                "cp"}
    assert info.to_json()["actions"] == info.actions and info.to_json()["live"] is True
    assert engine.console_send(name, "echo console-$((40+2))") == "console-42"
    with engine.connection(name) as conn:
        assert conn.ping() > 0
    with engine.console(name) as conn:
        assert conn.control("state")["ok"]
    assert engine.exec(name, ["sh", "-c", "echo kept > /root/note.txt"]).ok
    assert b"boot at" in b"".join(engine.logs(name))
    assert [i.name for i in engine.ps()] == [name] or name in [i.name for i in engine.ps()]
    info = engine.quarantine(name)
    assert info.state.state == "quarantined" and "start" not in info.actions and "halt" in info.actions
    with pytest.raises(InvalidState, match="quarantined"):
        engine.start(name)
    info = engine.halt(name, timeout=20)  # the keyword that used to clash inside the client
    assert info.state.state == "halted" and "start" in info.actions
    assert engine.outputs(name) == [{"name": "note", "path": "/root/note.txt", "exists": True}]
    assert engine.output_get(name, "note") == b"kept\n"
    image = engine.commit(name, "localhost/api-commit:1")
    assert image.id
    layouts = list((engine.state_dir / "committed").iterdir())
    pulled = engine.pull(f"oci:{layouts[0]}:latest")
    assert pulled.id == image.id
    engine.delete(name)
    assert image.id in {i.id for i in engine.prune_images()}


class _Echo6(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"v6:" + self.rfile.readline())


class _Server6(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


def test_one_shot_run_with_mediation_to_an_ipv6_target(engine: Engine) -> None:
    """``[::1]:PORT`` parses the same everywhere (flag, spec, record) and the bridge reaches it."""
    with pytest.raises(InvalidArgument, match="brackets"):
        parse_mediation_flag("2050=::1:9911")
    srv = _Server6(("::1", 0), _Echo6)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        med = parse_mediation_flag(f"2050=[::1]:{srv.server_address[1]}")
        assert med.host == "::1" and med.target == f"[::1]:{srv.server_address[1]}"
        info, result = engine.run(["sh", "-c", "echo hello | nc -w 3 127.0.0.1 2050"], profile="tiny",
                                  mediation=med, delete=True)
        assert result.stdout == b"v6:hello\n", result.stderr
        assert info.name not in [i.name for i in engine.list()]
    finally:
        srv.shutdown()
        srv.server_close()


def test_actions_cover_every_state() -> None:
    from microagent_engine.states import STATES, allowed_actions

    for state in STATES:
        assert set(allowed_actions(state)) <= set(ACTIONS)
    assert allowed_actions("quarantined") == ["halt", "stop", "kill", "exec", "cp"]
    # asleep: what reaches the guest wakes it; its disk is not read while its saved memory holds unwritten pages
    assert allowed_actions("sleeping") == ["resume", "kill", "exec", "cp"]


def test_states_decide_every_action_and_change() -> None:
    """require() refuses exactly what allowed_actions() leaves out, naming the next step; transition() is the one
    table of state changes (a workspace never jumps, e.g., from halted to running)."""
    from microagent_engine.errors import InvalidState
    from microagent_engine.states import ACTIONS, STATES, TRANSITIONS, allowed_actions, require, transition

    for state in STATES:
        for vm_alive in (False, True):
            for action in ACTIONS:
                if action in allowed_actions(state, vm_alive):
                    require(action, state, "w", vm_alive)
                else:
                    with pytest.raises(InvalidState, match=f"workspace 'w' is (already )?{state}"):
                        require(action, state, "w", vm_alive)
        assert state in TRANSITIONS or state == "prepared"
        assert transition(state, "failed") == "failed"  # anything may fail
    assert transition(None, "prepared") == "prepared"
    with pytest.raises(InvalidState, match="from halted to running"):
        transition("halted", "running")
    with pytest.raises(InvalidState, match="from nothing to running"):
        transition(None, "running")
    with pytest.raises(InvalidState, match="start it first: microagent start w"):
        require("exec", "halted", "w")
    with pytest.raises(InvalidState, match="run 'microagent kill w' first"):
        require("start", "failed", "w", vm_alive=True)


def test_prune_removes_stopped_one_shot_records(engine: Engine) -> None:
    info, result = engine.run(["true"], profile="tiny", network="none")
    assert result.ok and info.config.one_shot and info.state.state == "halted"
    named, _ = engine.run(["true"], name="api-named-run", profile="tiny", network="none")
    try:
        removed = engine.prune()
        assert info.name in removed and named.name not in removed  # a run the user named is theirs to keep
        assert info.name not in {i.name for i in engine.list()}
    finally:
        engine.delete(named.name)
