"""Lifecycle with real VMs: persistence across halt/start, stop/kill/delete semantics, crash detection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from microagent_engine import Engine
from microagent_engine.errors import InvalidState
from microagent_engine.records import process_matches

pytestmark = pytest.mark.vm


def _wait_state(engine: Engine, name: str, want: str, limit: float = 20) -> str:
    deadline = time.monotonic() + limit
    state = ""
    while time.monotonic() < deadline:
        state = engine.status(name).state.state
        if state == want:
            return state
        time.sleep(0.1)
    return state


def test_halt_start_persists_and_refusals(engine: Engine, cli) -> None:
    name = "life"
    engine.create(name, profile="tiny")
    with pytest.raises(InvalidState, match="start it first"):
        engine.exec(name, ["true"])
    engine.start(name)
    with pytest.raises(InvalidState, match="already running"):
        engine.start(name)
    proc = cli("delete", name, "--yes")
    assert proc.returncode != 0
    assert b"halt, stop or kill it first" in proc.stderr
    assert engine.status(name).state.state == "running"

    engine.exec(name, ["sh", "-c", "echo 'notes from run 1' > /root/notes.txt"])
    # logs -f follows the console while the workspace runs and ends by itself when it halts
    follower = subprocess.Popen([sys.executable, "-m", "microagent_engine", "--state-dir", str(engine.state_dir),
                                 "logs", "-f", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    engine.exec(name, ["sh", "-c", "echo followed-line > /dev/console"])
    info = engine.halt(name)
    out, _ = follower.communicate(timeout=20)
    assert follower.returncode == 0
    assert b"microagent: boot at" in out and b"followed-line" in out
    assert info.state.state == "halted"
    assert not process_matches(info.state.vm_pid, info.state.vm_start_time)
    proc = cli("exec", name, "--", "true")
    assert proc.returncode != 0 and b"is halted" in proc.stderr and b"microagent start life" in proc.stderr

    # the write is in the ext4 image itself, readable on the host with e2fsprogs while halted
    dump = subprocess.run(["debugfs", "-R", "cat /root/notes.txt", str(info.dir.rootfs)], capture_output=True)
    assert dump.stdout == b"notes from run 1\n"

    engine.start(name)
    assert engine.exec(name, ["cat", "/root/notes.txt"]).stdout == b"notes from run 1\n"

    assert engine.stop(name).state.state == "stopped"
    engine.start(name)
    assert engine.kill(name).state.state == "stopped"
    with pytest.raises(InvalidState, match="not running"):
        engine.halt(name)
    proc = cli("delete", name, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not (engine.state_dir / "workspaces" / name).exists()


def test_vm_killed_from_outside_becomes_failed(engine: Engine, cli) -> None:
    name = "crash"
    engine.create(name, profile="tiny", network="isolated")
    info = engine.start(name)
    os.kill(info.state.vm_pid, signal.SIGKILL)
    assert _wait_state(engine, name, "failed") == "failed"
    st = engine.status(name).state
    assert "exited unexpectedly" in st.error and "signal 9" in st.error
    assert not st.readiness["execReady"]["ready"]
    assert cli("ps").stdout.decode().count(name) == 0
    # a failed workspace can be started again
    engine.start(name)
    assert engine.exec(name, ["echo", "back"]).stdout == b"back\n"
    # --network isolated: no NIC at all, only loopback
    links = engine.exec(name, ["ip", "-o", "link"]).stdout.decode()
    assert "lo:" in links and "eth0" not in links

    # the supervisor itself dies: its VM goes with it and the record says failed, not running
    sup = engine.status(name).state.supervisor_pid
    vm = engine.status(name).state
    os.kill(sup, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_matches(vm.vm_pid, vm.vm_start_time) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_matches(vm.vm_pid, vm.vm_start_time)
    # the VM can be gone a moment before the last thread of the killed supervisor releases its lock
    assert _wait_state(engine, name, "failed", limit=10) == "failed"
    st = engine.status(name).state
    assert "supervisor exited unexpectedly" in st.error
    engine.delete(name)


def test_boot_failure_is_reported(engine: Engine, tmp_path) -> None:
    """A rootfs that is not ext4 cannot boot: start fails with the console's words, state failed."""
    name = "corrupt"
    info = engine.create(name, profile="tiny")
    with open(info.dir.rootfs, "r+b") as fh:
        fh.seek(1024)
        fh.write(b"\0" * 4096)  # wipe the superblock
    from microagent_engine.errors import GuestError

    with pytest.raises(GuestError, match="failed to start") as exc:
        engine.start(name, boot_timeout=60)
    assert "mount" in str(exc.value).lower()
    assert engine.status(name).state.state == "failed"
    engine.delete(name)
