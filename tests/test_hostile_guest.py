"""A hostile guest cannot hurt the host: real VMs running the hostile program (tests/hostile).

One booted tiny workspace is shared by the tests whose guest survives (flood, forged frames, spoofed HELLO,
output caps); the ones that end the VM or a channel (oversized and garbage frames, garbage on the mediation
port, fork bomb) boot their own.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import GUEST_PATH, install_hostile

from microagent_engine import Engine
from microagent_engine.client import ExecResult
from microagent_engine.errors import ExecTimeout, GuestError, MicroagentError
from microagent_engine.logfiles import RotatingLog, rotated
from microagent_engine.model import parse_mediation_flag
from microagent_engine.protocol import FrameType, encode_exec, encode_frame
from microagent_engine.textsafe import safe_text

pytestmark = pytest.mark.vm

MiB = 1 << 20
RSS_BOUND = 100 * MiB


def wait_for(predicate: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something true (a generous wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"gave up waiting ({timeout:.0f} s) for {what or predicate}")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def guest_cmdlines(engine: Engine, name: str) -> str:
    """Every guest process's command line, arguments joined by spaces, one per line."""
    r = engine.exec(name, ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"],
                    timeout=60)
    return r.stdout.decode(errors="replace")


def status(engine: Engine, name: str) -> dict[str, Any]:
    return engine.status(name).to_json()


def _hostile_workspace(engine: Engine, name: str) -> Iterator[str]:
    """A booted tiny workspace with the hostile program installed; killed and deleted afterwards."""
    engine.create(name, profile="tiny")
    engine.start(name)
    install_hostile(engine, name)
    yield name
    try:
        engine.kill(name)
    except MicroagentError:
        pass
    engine.delete(name)


@pytest.fixture(scope="module")
def hostile_ws(engine: Engine) -> Iterator[str]:
    yield from _hostile_workspace(engine, "hostile-shared")


@pytest.fixture
def fresh_ws(engine: Engine, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _hostile_workspace(engine, f"hostile-{request.node.name.split('[')[-1].rstrip(']')[:20]}"
                                  .replace("_", "-"))


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# ---- without a VM -------------------------------------------------------------------------------------------

def test_guest_text_is_escaped_and_bounded() -> None:
    spoof = "6.1\x1b]0;pwned\x07\x1b[2J\u202egnp.exe\r\n"
    clean = safe_text(spoof, 100)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in clean)
    assert clean.startswith("6.1\\x1b]0;pwned\\x07\\x1b[2J\\u202e")
    long = safe_text("a" * 10000, 256)
    assert long.startswith("a" * 256) and long.endswith("…[+9744 chars]")
    assert safe_text("two\nlines\x1b", newlines=True) == "two\nlines\\x1b"


def test_serial_log_rotates_at_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    log = RotatingLog(path, max_bytes=1000)
    for i in range(100):
        log.write(f"{i:04d} ".encode() * 10)
    log.close()
    assert path.stat().st_size <= 1000 and rotated(path).stat().st_size <= 1000
    assert path.read_bytes().endswith(b"0099 " * 10)


# ---- shared workspace ---------------------------------------------------------------------------------------

def test_flood_to_a_stalled_client_keeps_the_supervisor_bounded(engine: Engine, hostile_ws: str) -> None:
    info = engine.status(hostile_ws)
    pid = info.state.supervisor_pid
    assert pid
    before = rss(pid)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(info.dir.control_socket))
    stalled.sendall(encode_frame(FrameType.EXEC, 1, encode_exec([GUEST_PATH, "flood"])))  # and never read
    wait_for(lambda: "hostile flood" in guest_cmdlines(engine, hostile_ws), what="the flood to run")
    peak = 0
    end = time.monotonic() + 30
    while time.monotonic() < end:
        peak = max(peak, rss(pid))
        time.sleep(0.25)
    assert peak < RSS_BOUND, f"supervisor RSS reached {peak / MiB:.0f} MiB (started at {before / MiB:.0f} MiB)"
    stalled.close()
    wait_for(lambda: "hostile flood" not in guest_cmdlines(engine, hostile_ws), what="the flood to end")
    assert rss(pid) < RSS_BOUND
    assert engine.exec(hostile_ws, ["echo", "still here"]).stdout == b"still here\n"


def test_forged_frames_for_other_streams_are_dropped_and_counted(engine: Engine, hostile_ws: str) -> None:
    gate = "/tmp/forged-done"
    victim_script = f"rm -f {gate}; while [ ! -e {gate} ]; do sleep 0.2; done; echo real"
    thread, out = in_thread(lambda: engine.exec(hostile_ws, ["sh", "-c", victim_script], timeout=300))
    wait_for(lambda: f"while [ ! -e {gate} ]" in guest_cmdlines(engine, hostile_ws), what="the victim to run")
    dropped = status(engine, hostile_ws)["droppedFrames"]
    # guest stream ids used to count up from 1: forge the first ones (and the top of the range)
    targets = " ".join(str(s) for s in [*range(1, 33), 4294967294])
    forger = engine.exec(hostile_ws, ["sh", "-c", f"for s in {targets}; do {GUEST_PATH} forge $s || exit 1; done; "
                                                  f"touch {gate}"], timeout=300)
    assert forger.exit_code == 0, forger.stderr
    thread.join(300)
    assert "error" not in out, out.get("error")
    victim: ExecResult = out["result"]
    assert victim.exit_code == 0 and victim.stdout == b"real\n" and b"INJECTED" not in victim.stdout + victim.stderr
    count = wait_for(lambda: status(engine, hostile_ws)["droppedFrames"] >= dropped + 2 * 33 and
                     status(engine, hostile_ws)["droppedFrames"], what="the dropped frames to be counted")
    assert count >= dropped + 66
    assert status(engine, hostile_ws)["execReady"]["ready"]


def test_spoofed_hello_and_ready_change_nothing(engine: Engine, hostile_ws: str, cli) -> None:
    before = status(engine, hostile_ws)
    r = engine.exec(hostile_ws, [GUEST_PATH, "hello"], timeout=60)
    assert r.exit_code == 0, r.stderr
    wait_for(lambda: status(engine, hostile_ws)["droppedFrames"] >= before["droppedFrames"] + 2,
             what="the second HELLO and READY to be counted")
    after = status(engine, hostile_ws)
    for key in ("bootSeconds", "kernelRelease", "state", "startedAt"):
        assert after[key] == before[key], key
    assert after["guestReady"]["detail"] == before["guestReady"]["detail"]
    assert after["execReady"]["ready"] and after["guestReady"]["ready"]
    text = cli("status", hostile_ws)
    js = cli("status", hostile_ws, "--json")
    assert text.returncode == 0 and js.returncode == 0
    for out in (text.stdout, js.stdout):
        assert b"\x1b" not in out and b"\x07" not in out and b"pwned" not in out
    assert json.loads(js.stdout)["bootSeconds"] == before["bootSeconds"]


def test_output_caps_truncate_with_a_marker(engine: Engine, hostile_ws: str, cli) -> None:
    script = "head -c 200000 /dev/zero | tr '\\0' o; head -c 300000 /dev/zero | tr '\\0' e >&2"
    seen = bytearray()
    r = engine.exec(hostile_ws, ["sh", "-c", script], max_output=1000, on_stdout=seen.extend)
    assert r.truncated and r.exit_code == 0
    assert r.stdout.startswith(b"o" * 1000) and b"o" * 1001 not in r.stdout
    assert r.stderr.startswith(b"e" * 1000) and b"[microagent: output truncated after 1000 bytes" in r.stderr
    assert len(seen) == 200000  # the callback saw everything
    proc = cli("exec", hostile_ws, "--json", "--max-output", "5000", "--", "sh", "-c", script)
    body = json.loads(proc.stdout)
    assert body["truncated"] is True and body["stdout"].startswith("o" * 5000) and "o" * 5001 not in body["stdout"]
    assert "output truncated after 5000 bytes" in body["stdout"]
    small = engine.exec(hostile_ws, ["echo", "ok"])
    assert small.stdout == b"ok\n" and not small.truncated


# ---- fresh workspaces (the VM ends) -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["oversize", "garbage"])
def test_malformed_frames_fail_the_channel_closed(engine: Engine, fresh_ws: str, mode: str, cli) -> None:
    thread, out = in_thread(lambda: engine.exec(fresh_ws, ["sleep", "600"]))
    wait_for(lambda: "sleep 600" in guest_cmdlines(engine, fresh_ws), what="the in-flight exec to run")
    try:
        engine.exec(fresh_ws, [GUEST_PATH, mode], timeout=60)
    except GuestError:
        pass  # the hostile command's own stream ends with the channel
    thread.join(60)
    assert not thread.is_alive(), "the in-flight exec hangs after a malformed frame"
    assert isinstance(out.get("error"), GuestError), out
    assert "broke the channel protocol" in str(out["error"])
    st = wait_for(lambda: (s := status(engine, fresh_ws))["state"] in ("failed", "stopped") and
                  s["vmPid"] is None and s, what="the workspace to be marked failed and its VM gone")
    assert st["state"] == "failed" and not st["execReady"]["ready"] and not st["guestReady"]["ready"]
    assert "protocol violation" in st["execReady"]["error"]
    assert "broke the channel protocol" in st["error"]
    text = cli("status", fresh_ws)
    assert b"execReady: no" in text.stdout and b"\x1b" not in text.stdout


def test_fork_bomb_makes_exec_not_ready_and_a_timed_exec_returns(engine: Engine, fresh_ws: str) -> None:
    """Under a fork bomb nothing hangs and status tells the truth. Whether the starved agent still answers pings
    within the liveness limit depends on the guest scheduler, so both truthful outcomes are accepted: execReady
    false with the liveness reason, or execReady true while the agent really answers a ping."""
    bomb, bomb_out = in_thread(lambda: engine.exec(fresh_ws, [GUEST_PATH, "forkbomb"]))  # no timeout: it stays

    def bombing() -> bool:  # rendezvous: the guest is full of processes (or too busy to even count them)
        try:
            r = engine.exec(fresh_ws, ["sh", "-c", "ls -d /proc/[0-9]* | wc -l"], timeout=10)
        except ExecTimeout:
            return True
        return r.status != "exited" or int(r.stdout.strip() or 0) > 200

    wait_for(bombing, timeout=120, what="the fork bomb to fill the guest")
    timed, out = in_thread(lambda: engine.exec(fresh_ws, ["true"], timeout=5))
    timed.join(300)
    assert not timed.is_alive(), "exec with a timeout hangs under a fork bomb"
    if "error" in out:
        assert isinstance(out["error"], ExecTimeout), out["error"]
    else:
        assert isinstance(out["result"], ExecResult)
    assert bomb.is_alive(), f"the fork bomb ended: {bomb_out}"
    st = status(engine, fresh_ws)
    assert st["state"] == "running"  # the VM is left to the user
    if st["execReady"]["ready"]:
        pinged, pong = in_thread(lambda: engine.ping(fresh_ws))
        pinged.join(60)
        assert not pinged.is_alive() and "result" in pong, "execReady says yes but the agent does not answer"
    else:
        assert "not answered a ping" in st["execReady"]["error"]


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(b"echo:" + data)


def test_garbage_on_the_mediation_port_fails_it_closed(engine: Engine, cli) -> None:
    """The guest writes garbage on the mediation port: its open connection is closed, new ones are refused,
    status says why and the serial log has one line; the agent channel (exec) is untouched."""
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    name = "hostile-mediation"
    engine.create(name, profile="tiny", mediation=parse_mediation_flag(f"2050=127.0.0.1:{srv.server_address[1]}"))
    try:
        engine.start(name)
        install_hostile(engine, name)
        wait_for(lambda: status(engine, name)["mediationReady"]["ready"], what="mediation to be ready")
        r = engine.exec(name, [GUEST_PATH, "medgarbage", "2050"], timeout=300)
        assert b"hostile: answer: echo:before" in r.stderr, r.stderr
        assert r.exit_code == 0, r.stderr.decode(errors="replace")
        assert b"first connection closed" in r.stderr and b"new connection refused" in r.stderr
        med = status(engine, name)["mediationReady"]
        assert med["ready"] is False and med["detail"] == "mediation channel closed"
        assert med["error"].startswith("protocol violation: frame type 0x7e on stream 1"), med
        serial = engine.status(name).dir.serial_log.read_text(errors="replace")
        lines = [ln for ln in serial.splitlines() if "mediation channel failed" in ln]
        assert len(lines) == 1 and len(lines[0]) < 500, lines
        st = status(engine, name)
        assert st["state"] == "running" and st["execReady"]["ready"]
        assert engine.exec(name, ["echo", "still here"]).stdout == b"still here\n"
        text = cli("status", name)
        assert b"mediationReady: no" in text.stdout, text.stdout
    finally:
        with contextlib.suppress(MicroagentError):
            engine.kill(name)
        engine.delete(name)
        srv.shutdown()
        srv.server_close()
