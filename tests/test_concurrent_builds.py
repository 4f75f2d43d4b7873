"""Concurrent first uses wait for one build: the built-in busybox image, the agent, the initramfs, the ro-open
shim (each built once under its lock, into a staging name renamed in), and four real ``microagent run`` CLIs
sharing one volume on a fresh state dir (before: mkfs.ext4 checksum errors and a FileNotFoundError traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import remove_state_dir
from microagent_engine.hostinfo import require_tool
from microagent_engine.storage.ext4 import fsck

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 6

CHILD = r"""
import json, sys
from pathlib import Path
from microagent_engine.guest.initramfs import build_agent, build_initramfs
from microagent_engine.guest.kernel import resolve_kernel
from microagent_engine.images.builtin import builtin_image
from microagent_engine.snapshots.shim import ro_open_library

state = Path(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # rendezvous: every process asks at once
notes = []
try:
    out = {"image": str(builtin_image(state, notes.append)), "agent": str(build_agent(state)),
           "shim": str(ro_open_library(state / "cache"))}
    out["initramfs"] = str(build_initramfs(state, resolve_kernel(state), []))
except Exception as exc:
    out = {"error": f"{type(exc).__name__}: {exc}"}
out["notes"] = notes
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def fresh_state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ma-c-", dir="/tmp"))  # short: unix socket paths are limited
    yield path
    remove_state_dir(path)


def counting_tools(bin_dir: Path, log: Path) -> dict[str, str]:
    """Wrappers for mkfs.ext4 and gcc that log each call (one line: tool and arguments), then run the real one;
    returns the environment that puts them first on PATH."""
    bin_dir.mkdir()
    for tool in ("mkfs.ext4", "gcc"):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {require_tool(tool)} "$@"\n')
        wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def test_concurrent_first_uses_build_each_artifact_once(host_tools: None, fresh_state: Path,
                                                        tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = counting_tools(tmp_path / "bin", log)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(fresh_state)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for _ in range(PROCESSES)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.stderr and p.stderr.read()
    for p in procs:  # all of them are waiting: release them together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0 and "Traceback" not in err, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors
    for key in ("image", "agent", "shim", "initramfs"):
        assert len({r[key] for r in results}) == 1, key
    calls = log.read_text().splitlines()
    assert len([c for c in calls if c.startswith("mkfs.ext4 ")]) == 1, calls
    assert len([c for c in calls if c.startswith("gcc ") and "-shared" not in c]) == 1, calls  # the agent
    assert len([c for c in calls if c.startswith("gcc ") and "-shared" in c]) == 1, calls  # the shim
    notes = [n for r in results for n in r["notes"]]
    assert sum(n.startswith("Building image builtin") for n in notes) == 1, notes
    fsck(Path(results[0]["image"]), fix=False)  # whole and consistent
    for d in ("images", "cache"):
        assert not list((fresh_state / d).glob(".*.build")), f"staging left in {d}"


@pytest.mark.vm
def test_concurrent_runs_sharing_a_volume_on_a_fresh_state_dir(host_tools: None, fresh_state: Path) -> None:
    env = {**os.environ, "MICROAGENT_STATE_DIR": str(fresh_state), "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "microagent_engine", *args], capture_output=True, text=True,
                              env=env, timeout=900, cwd=REPO)

    with ThreadPoolExecutor(4) as pool:  # the volume itself: one create wins, the others are told it exists
        creates = list(pool.map(lambda _i: cli("volume", "create", "same", "--size-mib", "16"), range(4)))
    assert [c.returncode for c in creates].count(0) == 1, creates
    for c in creates:
        assert c.returncode == 0 or ('volume "same" already exists' in c.stderr and "Traceback" not in c.stderr), c
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _i: cli("run", "--profile", "tiny", "-v", "same:/w", "--", "true"), range(4)))
    report = "\n".join(f"rc={r.returncode}\n{r.stdout}{r.stderr}" for r in runs)
    assert "Traceback" not in report and "mkfs" not in report and "checksum" not in report, report
    for r in runs:  # each one ran, or met the single-attach rule with its clear error
        assert r.returncode == 0 or 'volume "same" is attached to running workspace' in r.stderr, report
    assert any(r.returncode == 0 for r in runs), report
    assert report.count("Building image builtin") == 1, report
