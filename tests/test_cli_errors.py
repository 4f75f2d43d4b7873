"""Clear errors that lose nothing: names, duplicates, unknown workspaces, missing qemu or kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a..b", "-x", "x" * 64, "sp ace"])
def test_invalid_names(engine: Engine, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        engine.create(bad)
    assert not any(p.name.startswith(".creating") for p in (engine.state_dir / "workspaces").glob(".*"))


def test_unknown_workspace(cli) -> None:
    for verb in (["status", "nope"], ["start", "nope"], ["exec", "nope", "--", "true"], ["delete", "nope", "--yes"],
                 ["halt", "nope"], ["logs", "nope"]):
        proc = cli(*verb)
        assert proc.returncode == 1, verb
        assert b"no workspace named 'nope'" in proc.stderr, verb


def test_duplicate_name_keeps_the_first(engine: Engine, cli) -> None:
    engine.create("dup", profile="tiny", env={"K": "first"})
    proc = cli("create", "dup")
    assert proc.returncode == 1
    assert b"already exists" in proc.stderr
    assert engine.status("dup").config.env == {"K": "first"}
    engine.delete("dup")


def test_create_output_and_profiles(cli) -> None:
    proc = cli("create", "--name", "research", "--profile", "medium")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "Workspace: research"
    assert lines[1] == "State: prepared"
    assert lines[2].startswith("Rootfs: ") and lines[2].endswith("/workspaces/research/rootfs.ext4")
    assert lines[3:] == ["Profile: medium", "Resources: memory=2048MiB cpus=2 disk=8192MiB"]
    rootfs = Path(lines[2].split(": ", 1)[1])
    assert rootfs.stat().st_size == 8192 * 1024 * 1024
    assert rootfs.stat().st_blocks * 512 < 64 * 1024 * 1024  # sparse
    proc = cli("create", "over", "--profile", "tiny", "--memory", "300", "--cpus", "1", "--size-mib", "600")
    assert b"Resources: memory=300MiB cpus=1 disk=600MiB" in proc.stdout
    listing = cli("list").stdout.decode().splitlines()
    assert ["over", "prepared", "qemu", "tiny", "user", "never"] in [line.split() for line in listing]
    assert cli("delete", "research", "--yes").returncode == 0
    assert cli("delete", "over", "--yes").returncode == 0
    table = cli("profiles").stdout.decode()
    assert "small" in table and "16384" in table


def test_bad_flag_values(cli) -> None:
    proc = cli("create", "x1", "--memory", "0")
    assert proc.returncode == 2 and b"--memory must be a positive whole number" in proc.stderr
    proc = cli("create", "x1", "-e", "NOEQUALS_NOT_SET_ANYWHERE")
    assert proc.returncode == 2 and b"KEY=VALUE" in proc.stderr
    proc = cli("create", "x1", "--image", "docker.io/library/alpine:3.20",
               env={"MICROAGENT_DOCKER_IO_REGISTRY": "127.0.0.1:9"})  # the override (a closed port) wins
    assert proc.returncode == 3 and b"127.0.0.1:9" in proc.stderr
    proc = cli("create", "x1", "--image", "127.0.0.1:9/none:1")
    assert proc.returncode == 3 and b"127.0.0.1:9" in proc.stderr
    assert cli("status", "x1").returncode == 1  # nothing was recorded


def test_missing_qemu_names_install_step(engine: Engine, cli) -> None:
    engine.create("noqemu", profile="tiny")
    proc = cli("start", "noqemu", env={"PATH": "/nonexistent"})
    assert proc.returncode == 3
    assert b"apt-get install -y --no-install-recommends qemu-system-x86" in proc.stderr
    assert engine.status("noqemu").state.state == "prepared"
    engine.delete("noqemu")


def test_missing_kernel(cli, tmp_path: Path) -> None:
    proc = cli("create", "nokernel", "--kernel", str(tmp_path / "vmlinux"))
    assert proc.returncode == 1
    assert b"does not exist; pass --kernel PATH" in proc.stderr
    assert cli("status", "nokernel").returncode == 1


def test_delete_needs_confirmation_without_tty(engine: Engine, cli) -> None:
    engine.create("keep", profile="tiny")
    proc = cli("delete", "keep")
    assert proc.returncode == 2 and b"--yes" in proc.stderr
    assert engine.status("keep").state.state == "prepared"
    engine.delete("keep")


def test_doctor_reports_accelerator(cli) -> None:
    proc = cli("--json", "doctor")
    import json

    report = json.loads(proc.stdout)
    assert report["accel"] in ("kvm", "tcg")
    names = {c["name"]: c for c in report["checks"]}
    assert names["qemu"]["ok"] and "QEMU emulator" in names["qemu"]["detail"]
    if os.path.exists("/sys/module/kvm_pvm"):
        assert report["accel"] == "tcg" and "kvm_pvm" in names["kvm"]["detail"]


def test_leftovers_of_a_killed_delete_or_create_are_swept(engine: Engine) -> None:
    wsdir = engine.state_dir / "workspaces"
    wsdir.mkdir(parents=True, exist_ok=True)
    (wsdir / ".deleting-gone-1234").mkdir()
    old = wsdir / ".creating-old-5678"
    old.mkdir()
    os.utime(old, (0, 0))
    fresh = wsdir / ".creating-busy-9abc"  # another process may be creating right now
    fresh.mkdir()
    engine.create("sweeper", profile="tiny")
    assert not (wsdir / ".deleting-gone-1234").exists() and not old.exists() and fresh.exists()
    fresh.rmdir()
    engine.delete("sweeper")
