"""The seeds' literal `microagent run` form: options, then IMAGE, then the command with its own options."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vm


def test_run_image_then_command_with_options_needs_no_double_dash(cli) -> None:
    assert cli("volume", "create", "data", "--size-mib", "16").returncode == 0
    proc = cli("run", "-v", "data:/work", "--profile", "tiny", "builtin", "sh", "-c", "echo 42 > /work/counter.txt")
    assert proc.returncode == 0, proc.stderr.decode()
    proc = cli("run", "--delete", "-v", "data:/work", "--profile", "tiny", "builtin", "cat", "/work/counter.txt")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"42\n"
    # leave the session's state as found: the first run's record (a one-shot) and the volume
    assert cli("prune").returncode == 0
    assert cli("volume", "delete", "data").returncode == 0, "the pruned one-shot still holds the volume"


def test_cli_exec_interrupt_ends_a_command_that_ignores_int_and_term(cli, shared_ws, state_dir) -> None:
    """SIGINT to the CLI: the guest group gets INT, then TERM, then KILL; the CLI exits 130 with one line."""
    import os
    import signal
    import subprocess
    import sys

    from jupyter_conftest_helpers import REPO

    env = {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "microagent_engine", "exec", shared_ws, "--", "sh", "-c",
                             "trap '' INT TERM; while true; do echo x; sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"x\n"  # it runs (rendezvous)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["microagent: interrupted"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_run_terminated_leaves_no_vm_and_no_record(cli, state_dir, sig) -> None:
    """`timeout 60 microagent run …` or a closed terminal: SIGTERM/SIGHUP to the CLI end the run as Ctrl-C does
    (the VM killed, the --delete'd record gone), not by dying where it stood with the VM left running."""
    import os
    import signal
    import subprocess
    import sys

    from jupyter_conftest_helpers import REPO
    from microagent_engine import Engine

    env = {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO)}
    name = f"term-{sig.lower()}"
    proc = subprocess.Popen([sys.executable, "-m", "microagent_engine", "run", "--delete", "--name", name,
                             "--profile", "tiny", "builtin", "sh", "-c", "echo up; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # it runs (rendezvous)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert err.decode().strip().splitlines()[-1] == f"microagent: terminated by {sig}"
    assert name not in [w.name for w in Engine(state_dir).list()]
