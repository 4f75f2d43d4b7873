"""`microagent run`: one-shot create + start + exec + halt, through the real CLI."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.vm


def test_run_prints_guest_kernel_and_deletes(cli, state_dir) -> None:
    before = set((state_dir / "workspaces").glob("*"))
    proc = cli("run", "--delete", "--profile", "tiny", "--", "uname", "-r")
    assert proc.returncode == 0, proc.stderr
    release = proc.stdout.decode().strip()
    assert release.endswith("-cloud-amd64")  # Debian's cloud kernel, not the host's
    assert release != os.uname().release
    assert set((state_dir / "workspaces").glob("*")) == before  # nothing left behind


def test_run_keeps_halted_workspace_and_exit_code(cli) -> None:
    proc = cli("run", "--name", "oneshot", "--profile", "tiny", "--exec", "echo kept > /root/f; exit 4")
    assert proc.returncode == 4, proc.stderr
    status = cli("status", "oneshot").stdout.decode()
    assert "State: halted" in status
    assert cli("delete", "oneshot", "--yes").returncode == 0
