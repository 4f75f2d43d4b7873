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
