"""Workspace snapshots (real VMs): snapshot WS NAME while it runs, create --from-snapshot resumes its processes in a
clone with its own disk, memory, RNG and clock; the CLI's snapshot verbs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, InvalidState, NotFound

pytestmark = pytest.mark.vm

# the value is replaced atomically (write then rename), so a reader never sees a half-written file
COUNTER = ("(i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/c; sleep 0.2; done) "
           "</dev/null >/dev/null 2>&1 &")


def _count(engine: Engine, name: str) -> int:
    return int(engine.exec(name, ["cat", "/tmp/c"]).stdout.decode().strip())


def _wait_above(engine: Engine, name: str, value: int) -> int:
    """The counter once it is past ``value`` (the loop runs on its own; no timing is asserted)."""
    for _ in range(600):
        if engine.exec(name, ["test", "-s", "/tmp/c"]).exit_code != 0:  # the loop has not written yet
            time.sleep(0.1)
            continue
        now = _count(engine, name)
        if now > value:
            return now
        time.sleep(0.1)
    raise AssertionError(f"the counter in {name} stayed at {value}")


@pytest.fixture(scope="module")
def source(engine: Engine) -> Iterator[str]:
    name = "snap-src"
    engine.create(name, profile="tiny", network="none")
    engine.start(name)
    assert engine.exec(name, ["sh", "-c", COUNTER]).exit_code == 0
    _wait_above(engine, name, 0)
    yield name
    for ws in (name, "snap-clone", "snap-clone2"):
        try:
            engine.kill(ws)
        except Exception:
            pass
        try:
            engine.delete(ws)
        except Exception:
            pass
    for snap in engine.snapshots():
        engine.remove_snapshot(snap["name"])


def test_clone_resumes_a_running_counter(engine: Engine, source: str, state_dir: Path) -> None:
    assert "snapshot" in engine.status(source).actions
    before = _wait_above(engine, source, 3)  # the loop has been counting for a while
    meta = engine.snapshot(source, "snap1")
    at_snapshot = _count(engine, source)
    assert meta["workspace"] == source and meta["stateBytes"] > 0
    snap_dir = state_dir / "snapshots" / "snap1"
    assert oct(snap_dir.stat().st_mode & 0o777) == oct(0o700)
    assert all(oct(f.stat().st_mode & 0o777) == oct(0o600) for f in snap_dir.iterdir())
    # the source runs on
    assert engine.status(source).state.state == "running"
    _wait_above(engine, source, at_snapshot)

    info = engine.create("snap-clone", from_snapshot="snap1")
    assert info.config.from_snapshot == "snap1" and info.state.state == "prepared"
    info = engine.start("snap-clone")
    assert info.state.boot_mode == "snapshot", info.state.cold_reason
    first = _count(engine, "snap-clone")
    assert first >= before, (first, before)  # it resumed the loop where the snapshot caught it ...
    assert _wait_above(engine, "snap-clone", first) > first  # ... and the loop keeps counting

    # writes in the clone stay there (memory and disk), and the source's stay in the source
    engine.exec("snap-clone", ["sh", "-c", "echo clone > /tmp/only-clone; echo clone > /only-clone; sync"])
    out = engine.exec(source, ["sh", "-c", "ls /tmp/only-clone /only-clone 2>&1; true"]).stdout.decode()
    assert out.count("No such file") == 2, out
    engine.exec(source, ["sh", "-c", "echo src > /only-src; sync"])
    assert "No such file" in engine.exec("snap-clone", ["sh", "-c", "ls /only-src 2>&1; true"]).stdout.decode()

    # its own RNG and the host's clock
    rng = "head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    a = engine.exec(source, ["sh", "-c", rng]).stdout
    b = engine.exec("snap-clone", ["sh", "-c", rng]).stdout
    assert a != b and len(a) == 32
    before = time.time()
    clock = int(engine.exec("snap-clone", ["date", "+%s"]).stdout)
    assert int(before) - 1 <= clock <= time.time() + 1

    # the first start consumed the restore: a halt and start boot the clone's disk
    engine.halt("snap-clone")
    info = engine.start("snap-clone")
    assert info.state.boot_mode in ("warm", "cold")
    assert engine.exec("snap-clone", ["cat", "/only-clone"]).stdout == b"clone\n"


def test_snapshot_rules(engine: Engine, source: str) -> None:
    with pytest.raises(NotFound, match="no snapshot named"):
        engine.create("x-none", from_snapshot="no-such-snapshot")
    with pytest.raises(InvalidArgument, match="only a name, --hostname and -e/--env"):
        engine.create("x-bad", from_snapshot="snap1", memory_mib=512)
    engine.create("snap-stopped", profile="tiny", network="none")
    try:
        with pytest.raises(InvalidState, match="only a running or paused workspace"):
            engine.snapshot("snap-stopped", "never")
    finally:
        engine.delete("snap-stopped")


def test_cli_snapshot_verbs(engine: Engine, source: str, cli) -> None:
    proc = cli("snapshot", source, "snap-cli")
    assert proc.returncode == 0, proc.stderr.decode()
    listed = json.loads(cli("snapshot", "list", "--json").stdout)
    assert "snap-cli" in [s["name"] for s in listed]
    proc = cli("create", "snap-clone2", "--from-snapshot", "snap-cli", "--hostname", "clone-two")
    assert proc.returncode == 0, proc.stderr.decode()
    assert engine.start("snap-clone2").state.boot_mode == "snapshot"
    assert engine.exec("snap-clone2", ["hostname"]).stdout == b"clone-two\n"
    _wait_above(engine, "snap-clone2", _count(engine, "snap-clone2"))
    assert cli("snapshot", "rm", "snap-cli").returncode == 0
    assert "snap-cli" not in [s["name"] for s in json.loads(cli("snapshots", "--json").stdout)]
    # the clone has its own disk: removing the snapshot leaves it working
    assert engine.exec("snap-clone2", ["true"]).exit_code == 0


def test_a_new_warm_snapshot_replaces_the_older_one_of_its_family(engine: Engine, source: str) -> None:
    """A warm Python snapshot built for a newer image or zygote replaces the one of the same shape it supersedes
    (no key asks for the older one again: its disk would stay forever); other families are kept."""
    from microagent_engine.engine import warm_python as W
    from microagent_engine.workspace_spec import WorkspaceSpec

    # shapes no other test's warm snapshot has (this state dir may hold a real one of the default shape)
    isolated, user = (W.family(WorkspaceSpec(image="builtin:python", network=n, memory_mib=448))
                      for n in ("isolated", "user"))
    assert isolated != user and W.family(WorkspaceSpec(image="builtin:python", network="isolated")) != isolated
    for snap in ("pywarm-old", "pywarm-other-shape", "pywarm-new"):  # stand-ins: snapshots of a real workspace
        engine.snapshot(source, snap, internal=True)
    assert W.supersede(engine, "pywarm-old", isolated) == []
    assert W.supersede(engine, "pywarm-other-shape", user) == []
    assert W.supersede(engine, "pywarm-new", isolated) == ["pywarm-old"]
    left = [m["name"] for m in engine.snapshots(internal=True)]
    assert "pywarm-old" not in left and {"pywarm-new", "pywarm-other-shape"} <= set(left)
    for snap in ("pywarm-new", "pywarm-other-shape"):
        engine.remove_snapshot(snap)
        (Path(engine.state_dir) / W.WARM_DIR / f"{snap[len(W.SNAPSHOT_PREFIX):]}.built").unlink()


def test_sleep_ends_the_vm_and_keeps_every_stream_until_the_next_exec_wakes_it(engine: Engine, cli,
                                                                                 tmp_path: Path) -> None:
    """sleep: the VM's memory goes to a file and QEMU ends; the supervisor stays with every stream. A command the
    host was reading from when it fell asleep goes on after the wake, as do a background loop and RAM-only files;
    an exec (or resume) wakes it; kill while asleep ends it and removes the saved memory."""
    name = "sleeper"
    engine.create(name, profile="tiny", network="none")
    try:
        engine.start(name)
        assert engine.exec(name, ["sh", "-c", f"echo kept > /tmp/in-ram; mkfifo /tmp/go; {COUNTER}"]).exit_code == 0
        before = _wait_above(engine, name, 0)
        # a command the host reads from, blocked on a FIFO (rendezvous: its first line has arrived)
        started, held = threading.Event(), []
        holder = threading.Thread(target=lambda: held.append(engine.exec(
            name, ["sh", "-c", "echo started; read x < /tmp/go; echo $x"],
            on_stdout=lambda b: started.set() if b"started" in b else None)))
        holder.start()
        assert started.wait(120)
        r = cli("sleep", name)
        assert r.returncode == 0 and f"Workspace {name}: sleeping" in r.stdout.decode(), r.stderr
        info = engine.status(name)
        assert info.state.state == "sleeping" and info.dir.supervisor_alive() and info.state.vm_pid is None
        assert info.to_json()["actions"] == ["resume", "kill", "exec", "cp"]
        assert (info.dir.run_dir / "sleep-state").stat().st_size > 1 << 20
        assert holder.is_alive()  # its stream waits with the supervisor
        with pytest.raises(InvalidState, match="is sleeping"):  # its disk is not to be read while it sleeps
            engine.outputs(name)
        r = cli("sleep", name)  # twice: a clear refusal, no traceback
        assert r.returncode != 0 and b"only a running or paused workspace can be put to sleep" in r.stderr
        # the next exec wakes it; the held command reads its line and ends normally
        assert engine.exec(name, ["sh", "-c", "echo done > /tmp/go; cat /tmp/in-ram"]).stdout == b"kept\n"
        holder.join()
        assert held[0].exit_code == 0 and held[0].stdout == b"started\ndone\n", held
        assert engine.status(name).state.state == "running"
        assert not (info.dir.run_dir / "sleep-state").exists()
        _wait_above(engine, name, before)  # the loop started before the sleep runs on
        engine.sleep(name)
        assert engine.resume(name).state.state == "running"  # resume wakes it too
        engine.sleep(name)
        engine.cp(f"{name}:/tmp/in-ram", str(tmp_path / "in-ram"))  # so does a copy through its agent
        assert (tmp_path / "in-ram").read_bytes() == b"kept\n" and engine.status(name).state.state == "running"
        engine.sleep(name)
        assert engine.kill(name).state.state == "stopped" and not (info.dir.run_dir / "sleep-state").exists()
        # a supervisor killed while its workspace slept: the record says failed; the next start boots the disk and
        # the useless saved memory goes
        engine.start(name)
        engine.sleep(name)
        os.kill(engine.status(name).state.supervisor_pid, signal.SIGKILL)
        wait_gone = engine.status(name)
        for _ in range(300):
            if not wait_gone.dir.supervisor_alive():
                break
            time.sleep(0.05)
            wait_gone = engine.status(name)
        assert engine.status(name).state.state == "failed"
        assert (info.dir.run_dir / "sleep-state").exists()
        assert engine.start(name).state.state == "running" and not (info.dir.run_dir / "sleep-state").exists()
    finally:
        try:
            engine.kill(name)
        except Exception:
            pass
        engine.delete(name)
