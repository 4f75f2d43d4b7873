"""microagent.yaml, setup, files, entrypoint, restart policy, mediation and quarantine with real VMs."""

from __future__ import annotations

import json
import socketserver
import threading
import time
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.errors import GuestError, InvalidState
from microagent_engine.model import parse_mediation_flag

pytestmark = pytest.mark.vm

SPEC = """\
name: research
image: builtin
profile: tiny
restart: never
entrypoint: echo entrypoint-ran-$MICROAGENT_NAME
shell: /bin/sh
hostname: research-host
setup:
  - mkdir -p /workspace
  - echo ready > /workspace/status
  - echo once >> /setup-count
files:
  - src: ./body.py
    dst: /app/body.py
    mode: "0755"
env:
  MICROAGENT_NAME: research
resources:
  memoryMiB: 256
  cpuCount: 1
  sizeMiB: 600
"""


def _wait(pred, limit: float = 30.0, step: float = 0.2):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def test_seed_spec_end_to_end(engine: Engine, cli, tmp_path: Path) -> None:
    (tmp_path / "body.py").write_text("print('body')\n")
    (tmp_path / "microagent.yaml").write_text(SPEC)
    # microagent.yaml in the current directory is read automatically
    proc = cli("create", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines()[:2] == ["Workspace: research", "State: prepared"]
    assert b"Resources: memory=256MiB cpus=1 disk=600MiB" in proc.stdout
    engine.start("research")
    r = engine.exec("research", ["sh", "-c", "cat /workspace/status /setup-count; stat -c %a /app/body.py; "
                                             "hostname; echo $MICROAGENT_NAME"])
    assert r.stdout.decode().split() == ["ready", "once", "755", "research-host", "research"]
    logs = b"".join(engine.logs("research")).decode(errors="replace")
    assert "entrypoint-ran-research" in logs
    assert "setup 1/3: mkdir -p /workspace" in logs
    engine.halt("research")
    engine.start("research")  # setup ran once: not again after halt/start
    assert engine.exec("research", ["cat", "/setup-count"]).stdout == b"once\n"
    data = json.loads(cli("--json", "status", "research").stdout)
    assert data["setupDone"] is True and data["entrypoint"].startswith("echo entrypoint-ran")
    engine.kill("research")
    engine.delete("research")


def test_spec_with_cli_overrides(cli, tmp_path: Path) -> None:
    (tmp_path / "body.py").write_text("x\n")
    spec = tmp_path / "ws.yaml"
    spec.write_text(SPEC)
    proc = cli("create", "--file", str(spec), "--name", "research-2", "--profile", "small", "--memory", "300")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(cli("--json", "status", "research-2").stdout)
    assert data["name"] == "research-2" and data["profile"] == "small"
    assert data["resources"] == {"memoryMiB": 300, "cpuCount": 1, "sizeMiB": 600}
    assert cli("delete", "research-2", "--yes").returncode == 0


def test_spec_errors_name_file_line_field(cli, tmp_path: Path) -> None:
    spec = tmp_path / "microagent.yaml"
    spec.write_text("name: x\nresources:\n  memoryMB: 5\n")
    proc = cli("create", "--file", str(spec))
    assert proc.returncode == 2
    assert f"{spec}:3: resources.memoryMB".encode() in proc.stderr
    spec.write_text("name: x\nfiles:\n  - src: ./missing.txt\n    dst: /a\n")
    proc = cli("create", "--file", str(spec))
    assert proc.returncode == 2 and b"missing.txt" in proc.stderr and b":3:" in proc.stderr
    assert cli("status", "x").returncode == 1


def test_failing_setup_leaves_failed_state_with_output(engine: Engine, cli) -> None:
    proc = cli("create", "badsetup", "--profile", "tiny", "--setup", "echo about-to-fail; exit 3")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(GuestError, match="setup command 1"):
        engine.start("badsetup")
    info = engine.status("badsetup")
    assert info.state.state == "failed"
    assert "setup.log" in info.state.error
    assert "about-to-fail" in (info.dir.path / "setup.log").read_text()
    engine.delete("badsetup")


@pytest.mark.parametrize("policy,code,restarts", [("on-failure", 1, True), ("never", 1, False), ("always", 0, True)])
def test_restart_policy_on_entrypoint_exit(engine: Engine, policy: str, code: int, restarts: bool) -> None:
    name = f"crashy-{policy}"
    engine.create(name, profile="tiny", restart=policy, entrypoint=f"echo exiting; exit {code}")
    engine.start(name)
    if restarts:
        # the restarted VM ran its entrypoint again (its exit caused the second restart): a polled "running" would
        # race the entrypoint's exit, which a warm clone reaches within a fraction of a second
        assert _wait(lambda: engine.status(name).state.restart_count >= 2, 90)
        log = b"".join(engine.logs(name)).decode(errors="replace")
        assert log.count(f"entrypoint ended: exited {code}") >= 2, log[-2000:]
    else:
        assert _wait(lambda: engine.status(name).state.entrypoint == f"exited {code}", 30)
        time.sleep(2)
        st = engine.status(name).state
        assert (st.state, st.restart_count) == ("running", 0)
    engine.kill(name)
    assert engine.status(name).state.state == "stopped"
    engine.delete(name)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(b"echo:" + data)


def _server() -> socketserver.ThreadingTCPServer:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_mediation_bridge_and_fail_closed(engine: Engine, cli) -> None:
    srv = _server()
    port = srv.server_address[1]
    proc = cli("create", "med", "--profile", "tiny", "--mediation", f"2048=127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    engine.start("med")
    r = engine.exec("med", ["sh", "-c", "echo hello | nc -w 2 127.0.0.1 2048"])
    assert r.stdout == b"echo:hello\n", r.stderr
    assert engine.status("med").state.readiness["mediationReady"]["ready"] is True
    srv.shutdown()
    srv.server_close()  # the host service goes away mid-run
    sig = _wait(lambda: (s := engine.status("med").state.readiness["mediationReady"]) and
                not s["ready"] and s["error"] and s, 20)
    assert "unreachable" in sig["error"] and "cut" in sig["error"]
    r = engine.exec("med", ["sh", "-c", "echo again | nc -w 2 127.0.0.1 2048; echo rc=$?"])
    assert b"echo:again" not in r.stdout
    engine.kill("med")
    # with the target down, a required fail-closed channel refuses to start
    with pytest.raises(GuestError, match="mediation is required and fail-closed"):
        engine.start("med")
    assert engine.status("med").state.state == "failed"
    engine.delete("med")


def test_quarantine_cuts_network_and_start_refused(engine: Engine, cli) -> None:
    srv = _server()
    port = srv.server_address[1]
    engine.create("quar", profile="tiny", mediation=parse_mediation_flag(f"2049=127.0.0.1:{port}"),
                  network={"hostPorts": [port]})
    engine.start("quar")
    # the opted-in host port: the host's 127.0.0.1:port is 10.0.2.2:port from the guest
    r = engine.exec("quar", ["sh", "-c", f"echo net | nc -w 3 10.0.2.2 {port}"])
    assert r.stdout == b"echo:net\n", r.stderr
    proc = cli("quarantine", "quar")
    assert proc.returncode == 0, proc.stderr
    info = engine.status("quar")
    assert info.state.state == "quarantined"
    assert info.state.readiness["mediationReady"]["ready"] is False
    r = engine.exec("quar", ["sh", "-c", f"echo net | nc -w 3 10.0.2.2 {port}; "
                                         f"echo med | nc -w 2 127.0.0.1 2049; true"])
    assert b"echo:" not in r.stdout
    with pytest.raises(InvalidState):
        engine.start("quar")
    assert b"quarantined" in cli("status", "quar").stdout
    engine.halt("quar")
    assert engine.status("quar").state.state == "halted"
    engine.start("quar")  # allowed again after halt
    assert engine.status("quar").state.state == "running"
    engine.kill("quar")
    engine.delete("quar")
    srv.shutdown()
    srv.server_close()
