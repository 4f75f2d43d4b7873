"""Warm start from template snapshots (real VMs): clones of one template have their own identity and their own
memory and disks; a template that does not fit falls back to a cold boot with the reason shown; --cold works."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.snapshots.templates import list_templates, shape_of

pytestmark = pytest.mark.vm

PROBE = "hostname; date +%s; head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"


def _probe(engine: Engine, name: str) -> tuple[str, int, str, tuple[float, float]]:
    before = time.time()
    res = engine.exec(name, ["sh", "-c", PROBE])
    after = time.time()
    hostname, clock, rng = res.stdout.decode().split("\n")[:3]
    return hostname, int(clock), rng, (before, after)


def _template_memory(state_dir: Path) -> Path:
    metas = list_templates(state_dir)
    assert metas, "no template was saved"
    return Path(metas[0]["memoryFile"])


@pytest.fixture(scope="module")
def clones(engine: Engine) -> list[str]:
    """Three tiny workspaces of one shape: the first start builds the template, every start is a clone."""
    names = ["warm-a", "warm-b", "warm-c"]
    for name in names:
        engine.create(name, profile="tiny", network="none", hostname=f"host-{name}")
    for name in names[:2]:
        info = engine.start(name)
        assert info.state.boot_mode == "warm", info.state.cold_reason
    yield names
    for name in names:
        try:
            engine.kill(name)
        except Exception:
            pass
        engine.delete(name)


def test_clones_have_their_own_identity(engine: Engine, clones: list[str]) -> None:
    a, b = (_probe(engine, n) for n in clones[:2])
    assert (a[0], b[0]) == ("host-warm-a", "host-warm-b")
    assert a[2] != b[2] and len(a[2]) == 32 and len(b[2]) == 32, "clones share their RNG output"
    for _, clock, _, (before, after) in (a, b):  # `date +%s` truncates: the guest read its clock in between
        assert int(before) - 1 <= clock <= after + 1, f"guest clock {clock} vs host {before}..{after}"
    status = engine.status(clones[0]).to_json()
    assert status["bootMode"] == "warm" and status["coldReason"] is None


def test_writes_stay_in_their_clone(engine: Engine, clones: list[str], state_dir: Path) -> None:
    a, b, c = clones
    memory = _template_memory(state_dir)
    before = hashlib.sha256(memory.read_bytes()).hexdigest()
    # memory (tmpfs), page cache and disk writes in a
    engine.exec(a, ["sh", "-c", "dd if=/dev/urandom of=/tmp/ram-a bs=1M count=16 2>/dev/null; "
                                "echo from-a > /disk-a; sync"])
    for other in (b,):
        out = engine.exec(other, ["sh", "-c", "ls /tmp/ram-a /disk-a 2>&1; true"]).stdout.decode()
        assert "No such file" in out and out.count("No such file") == 2, out
    info = engine.start(c)  # a clone started after a's writes
    assert info.state.boot_mode == "warm"
    out = engine.exec(c, ["sh", "-c", "ls /tmp/ram-a /disk-a 2>&1; true"]).stdout.decode()
    assert out.count("No such file") == 2, out
    assert hashlib.sha256(memory.read_bytes()).hexdigest() == before, "a clone wrote into the template's RAM file"
    assert oct(memory.stat().st_mode & 0o777) == oct(0o644)


def test_cold_flag(engine: Engine, cli) -> None:
    engine.create("warm-cold", profile="tiny", network="none")
    try:
        proc = cli("start", "warm-cold", "--cold")
        assert proc.returncode == 0, proc.stderr.decode()
        assert "cold" in proc.stdout.decode()
        status = json.loads(cli("status", "warm-cold", "--json").stdout)
        assert status["bootMode"] == "cold" and "--cold" in status["coldReason"]
        assert engine.exec("warm-cold", ["true"]).exit_code == 0
    finally:
        engine.kill("warm-cold")
        engine.delete("warm-cold")


def test_one_shot_run_is_warm(engine: Engine, clones: list[str]) -> None:
    info, result = engine.run(["sh", "-c", "echo hi"], profile="tiny", network="none")
    assert result.stdout == b"hi\n"
    assert info.state.boot_mode == "warm", info.state.cold_reason


def test_the_translation_cache_size_is_not_part_of_a_shape() -> None:
    # the host's JIT cache, nothing a restored guest has seen: resizing it must not orphan templates or snapshots
    argv = ["/bin/true", "-accel", "tcg,tb-size=32", "-cpu", "max", "-m", "512"]
    resized = ["/bin/true", "-accel", "tcg,tb-size=128", "-cpu", "max", "-m", "512"]
    assert shape_of(argv) == shape_of(resized)
    assert shape_of(argv) != shape_of([*argv[:-1], "256"])
    assert shape_of(argv) != shape_of(["/bin/true", "-accel", "kvm", "-cpu", "max", "-m", "512"])


def test_mismatched_template_falls_back_to_cold(engine: Engine, state_dir: Path, clones: list[str]) -> None:
    # the template the clones were made from (other tests build other shapes: volumes, NICs, memory sizes)
    serial = engine.status(clones[0]).dir.serial_log.read_text(errors="replace")
    found = re.search(r"clone of template ([0-9a-f]+)", serial)
    assert found, serial[-2000:]
    tiny = [Path(state_dir, "templates", found.group(1), "meta.json")]
    assert tiny[0].is_file(), tiny
    meta = json.loads(tiny[0].read_text())
    meta["memoryMiB"] = 512  # as if the template had been built for another memory size
    tiny[0].write_text(json.dumps(meta))
    engine.create("warm-mismatch", profile="tiny", network="none")
    try:
        info = engine.start("warm-mismatch")
        assert info.state.boot_mode == "cold"
        assert "512 MiB" in info.state.cold_reason and "256 MiB" in info.state.cold_reason
        assert engine.exec("warm-mismatch", ["true"]).exit_code == 0
        assert "cold: template" in info.dir.serial_log.read_text(errors="replace")
        engine.kill("warm-mismatch")
        info = engine.start("warm-mismatch")  # the broken template was removed; this start built a new one
        assert info.state.boot_mode == "warm", info.state.cold_reason
    finally:
        engine.kill("warm-mismatch")
        engine.delete("warm-mismatch")


def test_pause_resume_keeps_a_running_command(engine: Engine, clones: list[str]) -> None:
    import threading

    from microagent_engine.errors import InvalidState

    name = clones[1]
    started = threading.Event()
    out: list[bytes] = []
    result: list[object] = []

    def on_stdout(data: bytes) -> None:
        out.append(data)
        if b"started" in b"".join(out):
            started.set()

    script = "echo started; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo resumed-and-done"
    worker = threading.Thread(target=lambda: result.append(engine.exec(name, ["sh", "-c", script],
                                                                       on_stdout=on_stdout)))
    worker.start()
    assert started.wait(60), "the command did not start"
    info = engine.pause(name)
    assert info.state.state == "paused" and "resume" in info.actions and "exec" not in info.actions
    with pytest.raises(InvalidState, match="resume it first"):
        engine.exec(name, ["true"])
    assert worker.is_alive()
    assert engine.resume(name).state.state == "running"
    assert engine.exec(name, ["touch", "/tmp/go"]).exit_code == 0
    worker.join(60)
    assert result and result[0].exit_code == 0  # type: ignore[attr-defined]
    assert b"resumed-and-done" in b"".join(out)


def test_create_cold_boots_every_start_cold(engine: Engine) -> None:
    engine.create("warm-cold-cfg", profile="tiny", network="none", cold=True)
    try:
        info = engine.start("warm-cold-cfg")
        assert info.state.boot_mode == "cold" and "--cold" in info.state.cold_reason
        assert engine.exec("warm-cold-cfg", ["true"]).exit_code == 0
    finally:
        engine.kill("warm-cold-cfg")
        engine.delete("warm-cold-cfg")


def test_a_clone_binds_its_own_disks_in_order_and_keeps_no_helper(engine: Engine, cli, tmp_path: Path) -> None:
    # the disk driver is loaded in the template but binds at CONFIG, in the bus's order (the root stays /dev/vda,
    # an attached disk /dev/vdb, each with its own size); the NIC is bound and configured at boot; the helper that
    # warms the exec path (forked at boot, woken by CONFIG) is gone, not even a zombie
    disk = tmp_path / "extra.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk), "24M"], check=True)
    script = ("ls -d /sys/bus/virtio/devices/*; ls -d /sys/bus/virtio/devices/*/driver; "
              "cat /sys/bus/virtio/drivers_autoprobe; cat /sys/block/vdb/size; ip -4 addr show eth0; ip route; "
              "grep -E ' (/|/extra) ' /proc/mounts; ps -o stat,args | grep -v '\\['")
    proc = cli("run", "--name", "warm-disks", "--disk", f"extra={disk}:/extra:rw", "--", "sh", "-c", script)
    try:
        assert proc.returncode == 0, proc.stderr.decode()
        status = json.loads(cli("status", "warm-disks", "--json").stdout)
    finally:
        cli("delete", "--yes", "warm-disks")
    out = proc.stdout.decode()
    assert status["bootMode"] == "warm", status["coldReason"]
    devices = [line for line in out.splitlines() if line.startswith("/sys/bus/virtio/devices/")]
    bound = [d for d in devices if d.endswith("/driver")]
    assert len(devices) == 2 * len(bound) and len(bound) >= 4, out  # console, both disks, the NIC: all bound
    assert "\n1\n49152\n" in out, out  # autoprobe is back on; the attached disk is vdb, 24 MiB in 512-byte sectors
    assert "inet 10.0.2.15/24" in out and "default via 10.0.2.2 dev eth0" in out, out
    assert "/dev/vda / ext4 rw" in out and "/dev/vdb /extra ext4 rw" in out, out
    procs = [line.split(None, 1) for line in out.split("STAT COMMAND", 1)[1].strip().splitlines()]
    assert not [p for p in procs if p[0].startswith("Z")], out
    assert [p[1] for p in procs if "/init" in p[1]] == ["/init"], out


def test_a_runs_steps_are_marked_across_its_processes(cli, tmp_path: Path, monkeypatch) -> None:
    # $MICROAGENT_TRACE: the CLI, the engine, the supervisor's standby and the supervisor each append their steps to
    # one file, in the order they happen (what bench_core --trace reads); without it nothing is written anywhere
    from microagent_engine.timeline import TRACE_ENV, mark, read

    monkeypatch.delenv(TRACE_ENV, raising=False)
    mark("nowhere")  # no file named: a no-op
    trace = tmp_path / "trace.txt"
    assert cli("run", "--delete", "--", "true").returncode == 0  # the shape's template exists (or is built now)
    proc = cli("run", "--delete", "--", "true", env={TRACE_ENV: str(trace)})
    assert proc.returncode == 0, proc.stderr.decode()
    marks = read(trace)
    labels = [label for _at, _pid, label in marks]
    # a clone's network is enforced while QEMU loads its state (the guest is paused until then)
    want = ["cli: imported", "run: created", "standby: took the workspace", "supervisor: main",
            "supervisor: VM spawned (warm)", "supervisor: network up", "supervisor: VM restored", "supervisor: READY",
            "run: started", "run: command done", "supervisor: VM exited", "kill: answered", "kill: supervisor gone",
            "run: VM ended", "run: deleted"]
    assert [label for label in labels if label in want] == want, labels
    pids = {label: pid for _at, pid, label in marks}
    cli_pid = pids["cli: imported"]
    assert {pid for _at, pid, label in marks if label.startswith("supervisor:")} - {cli_pid}, marks  # its own process
    # the supervisor's side was imported by the standby (forked before the CLI's imports, beside them), which then
    # became the supervisor: nothing of it was imported by the CLI
    standby = {pid for _at, pid, label in marks if label.startswith("standby:")}
    assert standby == {pids["supervisor: main"]} and cli_pid not in standby, marks
    assert "standby: supervisor imported" in labels, labels
    # a cold boot's network is enforced while QEMU starts, its vCPUs held until then
    trace.unlink()
    proc = cli("run", "--cold", "--delete", "--", "true", env={TRACE_ENV: str(trace)})
    assert proc.returncode == 0, proc.stderr.decode()
    labels = [label for _at, _pid, label in read(trace)]
    want = ["supervisor: VM spawned (cold)", "supervisor: network up", "supervisor: VM resumed", "supervisor: READY",
            "run: command done"]
    assert [label for label in labels if label in want] == want, labels


def test_a_command_that_starts_nothing_leaves_no_standby(cli, tmp_path: Path) -> None:
    # `start` of a workspace that does not exist: the standby forked for it ends with the CLI (its socket closed),
    # having started nothing
    from microagent_engine.entry import command_of
    from microagent_engine.timeline import TRACE_ENV, read

    assert command_of(["--state-dir", "run", "start", "x"]) == "start"
    assert command_of(["--json", "run", "--name", "x"]) == "run"
    assert command_of(["exec", "ws", "--", "run"]) == "exec"
    assert command_of(["--", "run"]) is None and command_of([]) is None
    trace = tmp_path / "trace.txt"
    proc = cli("start", "no-such-workspace", env={TRACE_ENV: str(trace)})
    assert proc.returncode != 0 and b"no-such-workspace" in proc.stderr and b"Traceback" not in proc.stderr
    deadline = time.monotonic() + 60
    while "standby: unused" not in [label for _at, _pid, label in read(trace)] and time.monotonic() < deadline:
        time.sleep(0.05)
    marks = read(trace)
    standby = {pid for _at, pid, label in marks if label.startswith("standby:")}
    assert [label for _at, _pid, label in marks if label.startswith("standby:")] == [
        "standby: supervisor imported", "standby: unused"], marks
    (pid,) = standby
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"the standby {pid} outlived its CLI"


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's exit may wait for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
