"""The hypervisor runs jailed: unprivileged uid, no capabilities, seccomp, no_new_privs, a private root,
its own namespaces; doctor and status say what is unavailable (cgroup v2 on this v1 host) and why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.records import process_matches
from microagent_engine.sandbox import cgroups

pytestmark = pytest.mark.vm

NAMESPACES = ("mnt", "pid", "ipc", "uts", "net")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _assert_jailed(pid: int, *, root: bool) -> None:
    st = _status(pid)
    assert st["Name"].startswith("qemu-system"), st["Name"]  # vmPid is QEMU itself, not the launcher
    uid = int(st["Uid"].split()[0])
    assert uid != 0 and int(st["Gid"].split()[0]) != 0
    if root:
        assert uid >= 0x70000000  # the per-VM range, not a host user
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == st["CapAmb"] == "0000000000000000"
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    # its root is a private tmpfs, not the host's /, holding only what QEMU opens
    assert os.stat(f"/proc/{pid}/root").st_dev != os.stat("/").st_dev
    assert sorted(os.listdir(f"/proc/{pid}/root")) == ["bin", "dev", "etc", "lib", "lib64", "sbin", "usr", "vm"]
    assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == ["null", "random", "urandom", "zero"]
    assert os.listdir(f"/proc/{pid}/root/etc") == ["ld.so.cache"]
    for ns in ("mnt", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


def test_qemu_is_jailed_and_lifecycle_still_works(engine: Engine, cli) -> None:
    name = "jailed"
    engine.create(name, profile="tiny", network="none")
    info = engine.start(name)
    pid = info.state.vm_pid
    assert pid and process_matches(pid, info.state.vm_start_time)
    _assert_jailed(pid, root=os.geteuid() == 0)
    # an isolated workspace also gets an empty network namespace
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    proc = cli("--json", "status", name)
    assert proc.returncode == 0, proc.stderr
    conf = json.loads(proc.stdout)["confinement"]
    assert conf["enabled"] and conf["uid"] == int(_status(pid)["Uid"].split()[0])
    assert conf["namespaces"] == {"mnt": "new", "pid": "new", "ipc": "new", "uts": "new", "net": "new"}
    assert conf["rlimits"]["core"] == 0 and conf["rlimits"]["nofile"] > 0 and conf["rlimits"]["nproc"] > 0
    assert conf["rlimits"]["fsize"] >= info.dir.rootfs.stat().st_size
    assert "elevateprivileges=deny" in conf["seccomp"]
    support = cgroups.detect()
    assert conf["cgroup"]["available"] == support.available
    if not support.available:  # this host: cgroup v1 hybrid
        assert "v1" in conf["cgroup"]["detail"]
        assert any(u["what"] == "cgroup" and u["why"] == support.reason for u in conf["unavailable"])
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert "Max core file size        0" in limits and f"Max open files            {conf['rlimits']['nofile']}" in limits

    doctor = cli("doctor")
    line = next(ln for ln in doctor.stdout.decode().splitlines() if "vm cgroup" in ln)
    assert ("unavailable" in line and "v1" in line) if not support.available else "available" in line

    # exec, mediation-free halt and start still work through fd-passed disks and chardevs
    assert engine.exec(name, ["sh", "-c", "echo persisted > /root/j.txt; sync"]).code == 0
    assert engine.halt(name).state.state == "halted"
    info = engine.start(name)
    assert info.state.vm_pid != pid
    _assert_jailed(info.state.vm_pid, root=os.geteuid() == 0)
    assert engine.exec(name, ["cat", "/root/j.txt"]).stdout == b"persisted\n"
    engine.kill(name)
    assert not process_matches(info.state.vm_pid, info.state.vm_start_time)
    engine.delete(name)


def _python_for(user: str) -> str:
    """An interpreter ``user`` can run (the test venv may live under a private home)."""
    for cand in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(["su", user, "-s", "/bin/sh", "-c", f"{cand} -c 'import yaml'"], capture_output=True)
        if probe.returncode == 0:
            return cand
    pytest.fail(f"no Python with PyYAML that user {user} can run: apt-get install -y python3-yaml")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
def test_unprivileged_user_gets_namespaces_and_seccomp(state_dir: Path) -> None:
    """A non-root user's VM: its own uid (no other is possible), a user namespace holding the rest."""
    home = Path(f"/tmp/ma-nobody-{os.getpid()}")
    home.mkdir()
    try:
        from microagent_engine.guest.kernel import resolve_kernel

        resolve_kernel(state_dir)  # installed on first need (this test may run alone)
        shutil.copytree(state_dir / "kernels", home / "kernels", symlinks=True)
        # the engine's code, where nobody can read it (the checkout may live under a private home)
        engine_src = Path(__file__).resolve().parent.parent / "microagent_engine"
        shutil.copytree(engine_src, home / "src" / "microagent_engine", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chown", "-R", "nobody:", str(home)], check=True)
        home.chmod(0o700)
        py = _python_for("nobody")
        env = f"HOME={home} MICROAGENT_STATE_DIR={home} PYTHONPATH={home / 'src'}"

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            cmd = f"cd {home} && env {env} {py} -m microagent_engine " + " ".join(args)
            return subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", cmd], capture_output=True, timeout=300)

        # isolated: slirp4netns needs /dev/net/tun, which is root-only (0600) on this host (doctor says so)
        assert run("create", "nb", "--profile", "tiny", "--network", "isolated").returncode == 0
        proc = run("start", "nb")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(run("--json", "status", "nb").stdout)
        pid = data["vmPid"]
        st = _status(pid)
        assert st["Uid"].split()[0] == subprocess.check_output(["id", "-u", "nobody"]).decode().strip()
        assert st["CapEff"] == "0000000000000000" and st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
        assert os.stat(f"/proc/{pid}/root").st_dev != os.stat("/").st_dev
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert data["confinement"]["namespaces"]["user"].startswith("new")
        assert run("exec", "nb", "--", "true").returncode == 0
        assert run("kill", "nb").returncode == 0
    finally:
        subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"rm -rf {home}"])
        shutil.rmtree(home, ignore_errors=True)
