"""Warm Python sessions: sessions resume a snapshot whose guest process already imported ipykernel, numpy, pandas
and matplotlib; each gets a kernel of its own (own HMAC key, own variables, own random state); a broken snapshot
falls back to a cold boot with the reason; sessions of a notebook kernel killed hard are swept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from microagent_engine import Engine, WorkspaceSpec
from kernel_helpers import KERNELS
from microagent_engine.engine import warm_python as engine_warm
from microagent_engine.errors import NotFound
from microagent_engine.snapshots.overlay import overlay_of
from microagent_jupyter import python_session as PS
from microagent_jupyter import session_owner, warm_python

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine(state_dir: Path, python_image: Path) -> Iterator[Engine]:
    os.environ["MICROAGENT_STATE_DIR"] = str(state_dir)
    yield Engine(state_dir)
    PS.stop_all()


def value(sess: PS.PythonSession, code: str) -> Any:
    InteractiveShell.instance()  # display() publishes through a shell (this test may run alone)
    with capture_output() as cap:
        sess.run_cell(code)
    return cap.outputs[-1].data["text/plain"]


def test_warm_session_starts_with_the_imports_done(engine: Engine) -> None:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "microagent_jupyter")
    try:
        with capture_output() as cap:
            shell.run_cell_magic("microagent", "python", "import sys\n'pandas' in sys.modules, "
                                 "'matplotlib.pyplot' in sys.modules")
        assert cap.outputs[-1].data["text/plain"] == "(True, True)"
        sess = PS._sessions[PS._key(engine, PS.default_session_name(engine))]
        assert sess.warm_from and sess.warm_from.startswith(engine_warm.SNAPSHOT_PREFIX), sess.cold_reason
        # the notebook's own session is deleted with it: its root disk is an overlay over the snapshot's, not a copy
        assert overlay_of(engine.status(sess.name).dir.path), "the session's disk was copied"
        with capture_output() as cap:  # the figure comes back as a cold kernel's would
            shell.run_cell_magic("microagent", "python", "import matplotlib.pyplot as plt\nplt.plot([1, 2])\n"
                                 "plt.show()")
        assert any("image/png" in o.data for o in cap.outputs)
    finally:
        PS.stop_all()
        shell.run_line_magic("unload_ext", "microagent_jupyter")


def test_two_warm_sessions_have_own_keys_state_and_randomness(engine: Engine) -> None:
    a = PS.get_session(engine, "warm-a")
    b = PS.get_session(engine, "warm-b")
    try:
        assert a.warm_from and a.warm_from == b.warm_from, (a.cold_reason, b.cold_reason)
        assert a.kernel.key != b.kernel.key and a.kernel.host_base != b.kernel.host_base
        a.run_cell("x = 1")
        assert value(a, "'x' in globals()") == "True"
        assert value(b, "'x' in globals()") == "False"
        draw = "import random, numpy; (random.random(), float(numpy.random.random()))"
        assert value(a, draw) != value(b, draw)
        # each clone's first kernel is the one the zygote prepared before the snapshot (no fork, no set-up), with
        # the session's key and a session id of its own
        assert "prepared" in a.kernel.steps and "prepared" in b.kernel.steps, (a.kernel.steps, b.kernel.steps)
        ident = "get_ipython().kernel.session.session"
        assert value(a, ident) != value(b, ident)
        pid = "import os; os.getpid()"
        first = value(a, pid)
        a.restart()  # the clone's next kernel is forked, as every kernel was before
        assert "forked" in a.kernel.steps and "prepared" not in a.kernel.steps, a.kernel.steps
        assert value(a, "'x' in globals()") == "False" and value(a, pid) != first
    finally:
        for s in (a, b):
            s.stop()
            PS._sessions.pop(PS._key(engine, s.name), None)
            session_owner.remove_workspace(engine, s.name)


CHILD = """
import sys, time
from microagent_engine import Engine
from microagent_jupyter import python_session as PS
sess = PS.get_session(Engine(sys.argv[1]), None)
print("READY", sess.name, flush=True)
time.sleep(600)
"""


def test_sessions_of_a_killed_notebook_kernel_are_swept(engine: Engine, state_dir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(state_dir)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    try:
        line = child.stdout.readline().split()
        assert line[:1] == ["READY"], line
        name = line[1]
        assert engine.status(name).vm_alive
        child.send_signal(signal.SIGKILL)  # no atexit: the VM stays behind
        child.wait()
        assert engine.status(name).vm_alive
        from microagent_jupyter.python_session import session_magic
        out = session_magic(engine, ["list"])
        assert name in out
        with pytest.raises(NotFound):
            engine.status(name)
    finally:
        if child.poll() is None:
            child.kill()


def test_an_idle_session_sleeps_and_its_next_cell_wakes_it(engine: Engine, monkeypatch) -> None:
    """After MICROAGENT_SLEEP_AFTER idle seconds the session's VM sleeps by itself (QEMU gone, memory in a file);
    the next cell's messages wake it through the same connections and the kernel still has its variables."""
    monkeypatch.setenv("MICROAGENT_SLEEP_AFTER", "1")
    sess = PS.get_session(engine, None)  # the notebook's own: its root disk an overlay, which a wake reopens
    assert overlay_of(engine.status(sess.name).dir.path)
    try:
        assert value(sess, "x = 41; x") == "41"
        for _ in range(1200):  # rendezvous: the idle timer puts it to sleep by itself (the record says "sleeping"
            # a moment before the timer's Engine.sleep returns and counts it)
            if engine.status(sess.name).state.state == "sleeping" and sess.sleeper and sess.sleeper.sleeps:
                break
            time.sleep(0.1)
        assert engine.status(sess.name).state.state == "sleeping", "the idle session did not go to sleep"
        assert engine.status(sess.name).state.vm_pid is None
        assert sess.sleeper is not None and sess.sleeper.sleeps == 1
        sess.sleeper.after = 3600  # no second sleep while this test looks
        assert value(sess, "x + 1") == "42"
        assert engine.status(sess.name).state.state == "running"
    finally:
        PS.stop_all()


def test_prepare_python_builds_ahead_with_progress(engine: Engine, cli) -> None:
    """``microagent prepare python`` (the CLI finds the Jupyter package's preparer by its entry point) leaves the
    image and the one warm snapshot that the magic's sessions and the sandboxed kernel both start from."""
    r = cli("prepare", "python")
    assert r.returncode == 0, r.stderr
    out, progress = r.stdout.decode(), r.stderr.decode()
    assert "builtin:python is ready" in out and "Preparing builtin:python" in progress
    key = engine_warm.SNAPSHOT_PREFIX + engine_warm.snapshot_key(engine, warm_python.session_spec())
    assert key in out and key in [m["name"] for m in engine.snapshots(internal=True)]
    # its RAM is a file its clones map copy-on-write (read-only to them), not a stream each one reads
    meta = next(m for m in engine.snapshots(internal=True) if m["name"] == key)
    snap_dir = engine.state_dir / "snapshots" / key
    assert meta["memory"] == "file" and meta["stateBytes"] < 1 << 20, meta
    assert (snap_dir / "memory").stat().st_size == meta["memoryMiB"] << 20
    assert (snap_dir / "memory").stat().st_mode & 0o777 == 0o644
    assert not [w for w in engine.list() if w.config.name.startswith(engine_warm.BUILD_PREFIX)]  # the build ended
    # the kernel's workspace and a magic's session share it: one key for both
    shipped = json.loads((KERNELS / "kernels" / "microagent-python" / "kernel.json").read_text())
    kernel = warm_python.session_spec(WorkspaceSpec.from_json(
        shipped["metadata"]["kernel_provisioner"]["config"]["workspace_spec"]))
    magic = warm_python.session_spec(WorkspaceSpec(network="isolated"))
    assert engine_warm.snapshot_key(engine, kernel) == engine_warm.snapshot_key(engine, magic)
    r = cli("prepare", "pyhton")
    assert r.returncode != 0 and b"nothing to prepare named 'pyhton'; known: python" in r.stderr


def test_the_first_cell_takes_the_session_prepared_when_the_extension_loaded(engine: Engine, monkeypatch) -> None:
    """With the warm pool on, loading the extension prepares the notebook's default session in the background; the
    first option-less ``%%microagent python`` takes it; a first cell asking for something else gets its own."""
    monkeypatch.setenv("MICROAGENT_KERNEL_POOL", "1")
    shell = InteractiveShell.instance()
    PS.stop_all()
    key = PS._key(engine, PS.default_session_name(engine))
    # loading the extension never builds the warm snapshot: built here (when no earlier test did)
    warm_python.warm_snapshot(engine, warm_python.session_spec(PS.flags_spec(PS.python_args.parser.parse_args([]))))

    def prepared() -> PS.PythonSession:
        thread = PS._prewarming[key][0]
        thread.join(timeout=600)  # rendezvous: the preparation (with its warm-up cells) is over
        sess = PS._sessions[key]
        assert sess.warm_from, sess.cold_reason
        return sess

    shell.run_line_magic("load_ext", "microagent_jupyter")
    try:
        ready = prepared()
        with capture_output() as cap:
            shell.run_cell_magic("microagent", "python", "import os, matplotlib.pyplot as plt\n"
                                 "os.getcwd(), 40 + 2, [k for k in ('_p', '_s') if k in globals()], "
                                 "plt.get_fignums(), len(In)")
        # the warm-up cells left nothing a user could see
        assert cap.outputs[-1].data["text/plain"] == "('/notebook', 42, [], [], 2)"
        assert PS._sessions[key] is ready and key not in PS._prewarming  # taken: no second start
        PS.stop_all()
        assert PS.prewarm(str(engine.state_dir)) is not None
        ready = prepared()
        with capture_output() as cap:
            shell.run_cell_magic("microagent", "python -e WHO=me", "import os\nos.environ['WHO']")
        assert cap.outputs[-1].data["text/plain"] == "'me'"
        assert PS._sessions[key] is not ready and not ready.kernel.alive
    finally:
        PS.stop_all()
        shell.run_line_magic("unload_ext", "microagent_jupyter")


PY = WorkspaceSpec(image="builtin:python", network="isolated")


def _run(engine: Engine, argv: list[str], spec: WorkspaceSpec = PY, **options: Any):
    from microagent_engine import RunOptions
    progress: list[str] = []
    before, engine.progress = engine.progress, progress.append
    try:
        _info, res = engine.run(argv, spec, RunOptions(delete=True, **options))
    finally:
        engine.progress = before
    return res, "\n".join(progress)


def test_python_one_shots_run_in_a_fork_of_the_warm_process(engine: Engine) -> None:
    """``run builtin:python python3 …`` resumes the warm snapshot (the same one as the sessions': same shape) and
    runs the command in a fork of the process that already imported pandas, as a fresh python3 would behave."""
    probe = ("import os, sys, IPython, matplotlib\n"
             "print('pandas' in sys.modules, sys.argv, __name__, IPython.get_ipython(), matplotlib.get_backend(),"
             " os.getcwd(), os.environ['WHO'], sys.path[0] == '', sep='|')\n"
             "print('to stderr', file=sys.stderr)\nsys.exit(3)")
    res, progress = _run(engine, ["python3", "-c", probe, "a b"], WorkspaceSpec(
        image="builtin:python", network="isolated", env={"WHO": "me"}), cwd="/tmp")
    assert "Resuming the warm Python snapshot pywarm-" in progress, progress
    assert res.exit_code == 3, res
    assert res.stdout.decode().split("|") == ["True", "['-c', 'a b']", "__main__", "None", "agg", "/tmp", "me",
                                              "True\n"], res.stdout
    assert res.stderr == b"to stderr\n"
    # the program on stdin, an uncaught exception: python3's exit code and traceback
    res, _ = _run(engine, ["python3"], stdin=b"import sys\nprint(40 + 2, sys.argv)\nraise ValueError('boom')\n")
    assert (res.exit_code, res.stdout) == (1, b"42 ['']\n"), res
    assert res.stderr.decode().rstrip().endswith("ValueError: boom") and 'File "<stdin>", line 3' in res.stderr.decode()
    # an option a fork cannot honour exactly: the real python3 runs it (cold: pandas is not imported)
    res, _ = _run(engine, ["python3", "-I", "-c", "import sys; print('pandas' in sys.modules)"])
    assert (res.exit_code, res.stdout) == (0, b"False\n"), res
    # a command the agent ends at its timeout ends the fork too (no exec left waiting on the fork's pipes)
    res, _ = _run(engine, ["python3", "-c", "import time; print('up', flush=True); time.sleep(3600)"], timeout=10)
    assert (res.status, res.stdout) == ("timed_out", b"up\n"), res
    # a run deleted afterwards writes into an overlay over the snapshot's disk: no copy, the image untouched
    snap = engine_warm.find(engine, PY)
    image = engine.state_dir / "snapshots" / str(snap) / "rootfs.ext4"
    before = (image.stat().st_mtime_ns, image.stat().st_size, hashlib.sha256(image.read_bytes()[:1 << 24]).digest())
    res, progress = _run(engine, ["python3", "-c", "open('/root/big', 'wb').write(b'x' * (8 << 20)); "
                                  "import os; os.sync(); print(os.path.getsize('/root/big'))"])
    assert (res.exit_code, res.stdout) == (0, b"8388608\n") and "Copying snapshot" not in progress, (res, progress)
    after = (image.stat().st_mtime_ns, image.stat().st_size, hashlib.sha256(image.read_bytes()[:1 << 24]).digest())
    assert after == before and image.stat().st_nlink == 1  # the run's hard link went with it


def test_a_disposable_clone_keeps_its_writes_and_is_refused_by_the_tools_that_read_its_disk(
        engine: Engine, tmp_path: Path) -> None:
    """A disposable clone of a snapshot (a notebook session's VM) keeps its writes in its overlay across a halt and
    a start (which boots it from a template built with that overlay); it has no ext4 root disk of its own, so cp,
    outputs and commit of it stopped say so and what to do instead, and change nothing; disposable needs a
    snapshot."""
    from microagent_engine.errors import InvalidArgument, InvalidState

    snap, why = warm_python.warm_snapshot(engine, warm_python.session_spec())
    assert snap is not None, why
    engine.create("disp", from_snapshot=snap, disposable=True)
    try:
        assert engine.status("disp").to_json()["rootfs"].endswith("/rootfs.qcow2")  # the file it has
        engine.start("disp")
        assert engine.exec("disp", ["/bin/sh", "-c", "echo kept > /root/mark && sync"], capture=True).exit_code == 0
        engine.halt("disp")
        for call in (lambda: engine.cp("disp:/root/mark", str(tmp_path / "h")),
                     lambda: engine.cp(str(Path(__file__)), "disp:/root/x"),
                     lambda: engine.commit("disp", "local/disp:1")):
            with pytest.raises(InvalidState, match="disposable clone.*'microagent cp' and 'microagent exec'"):
                call()
        assert not (tmp_path / "h").exists() and engine.status("disp").state.state == "halted"
        info = engine.start("disp")
        assert (info.state.boot_mode, info.state.cold_reason) == ("warm", ""), info.state.cold_reason
        assert engine.exec("disp", ["cat", "/root/mark"], capture=True).stdout == b"kept\n"
    finally:
        session_owner.remove_workspace(engine, "disp")
    with pytest.raises(InvalidArgument, match="clone of a snapshot"):
        engine.create("disp", image="builtin:python", disposable=True)
    with pytest.raises(NotFound):
        engine.status("disp")


def test_broken_warm_snapshot_falls_back_to_cold(engine: Engine, state_dir: Path) -> None:
    # the one a default session resumes (built if missing)
    built, why = warm_python.warm_snapshot(engine, warm_python.session_spec())
    assert built is not None, why
    snaps = [built]
    from microagent_engine.snapshots.workspace import snapshot_dir
    state = snapshot_dir(state_dir, snaps[0]) / "state"
    with open(state, "r+b") as fh:  # a torn stream: the restore fails
        fh.truncate(4096)
    sess = PS.get_session(engine, "warm-broken")
    try:
        assert sess.warm_from is None and "could not be resumed" in sess.cold_reason, sess.cold_reason
        assert value(sess, "40 + 2") == "42"
        assert snaps[0] not in [m["name"] for m in engine.snapshots(internal=True)]  # removed: the next session rebuilds it
    finally:
        sess.stop()
        PS._sessions.pop(PS._key(engine, sess.name), None)
        session_owner.remove_workspace(engine, sess.name)
