"""Shared fixtures: a per-session state dir, one booted workspace shared by read-only tests, cleanup of VMs.

Tests boot real VMs with QEMU (TCG on hosts without hardware virtualization). A missing host tool fails the
session with the install step; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.hostinfo import require_tool

REPO = Path(__file__).resolve().parent.parent
# no test may reach Docker Hub: docker.io references go to a closed local port unless a test sets its own registry
os.environ.setdefault("MICROAGENT_DOCKER_IO_REGISTRY", "127.0.0.1:9")
# sandboxed kernels keep no warm pool of VMs behind them (each would be one more TCG VM running beside the test's),
# except in the test of the pool itself (test_sandboxed_kernel.py), which turns it on
os.environ["MICROAGENT_KERNEL_POOL"] = "0"
os.environ["MICROAGENT_SLEEP_AFTER"] = "0"  # nothing sleeps by itself, except in the tests of that


@pytest.fixture(scope="session")
def host_tools() -> None:
    """Fail (never skip) when a tool the VM tests need is missing, naming the install step."""
    missing = []
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "e2fsck", "resize2fs", "debugfs", "gcc", "lz4", "apt-get"):
        try:
            require_tool(tool)
        except MicroagentError as exc:
            missing.append(str(exc))
    if missing:
        pytest.fail("host is missing tools (or run 'make setup'):\n" + "\n".join(missing), pytrace=False)


@pytest.fixture(scope="session")
def state_dir(host_tools: None) -> Iterator[Path]:
    # short path: unix socket paths are limited to 108 bytes
    path = Path(tempfile.mkdtemp(prefix="ma-test-", dir="/tmp"))
    yield path
    remove_state_dir(path)


def remove_state_dir(path: Path) -> None:
    """Kill every VM of the state dir ``path`` (never leave one behind), then remove it."""
    engine = Engine(path)
    for info in engine.list():
        try:
            if info.dir.supervisor_alive() or info.running:
                engine.kill(info.name)
        except MicroagentError:
            pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def engine(state_dir: Path) -> Engine:
    return Engine(state_dir)


@pytest.fixture(scope="session")
def shared_ws(engine: Engine) -> Iterator[str]:
    """One running workspace for tests that only exec in it (boots once per session)."""
    name = "shared"
    engine.create(name, profile="tiny", env={"WS_ENV": "from-create"})
    engine.start(name)
    yield name
    try:
        engine.kill(name)
    except MicroagentError:
        pass
    engine.delete(name)


@pytest.fixture(scope="module")
def python_image(state_dir: Path) -> Path:
    """The built-in ``builtin:python`` image in the session's state dir. Its build (minutes) is cached across
    sessions in $MICROAGENT_TEST_IMAGE_CACHE (default /var/tmp/microagent-test-images-UID), keyed by package set.
    Linked in again per module: ``images prune`` (test_vm_images) removes it from the state dir when unused."""
    from python_image_cache import python_image_into

    return python_image_into(state_dir)


@pytest.fixture
def cli(state_dir: Path):
    """Run the real ``microagent`` CLI as a subprocess against the test state dir."""

    def run(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        full_env = {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO), **(env or {})}
        return subprocess.run([sys.executable, "-m", "microagent_engine", *args], input=input,
                              capture_output=True, env=full_env, timeout=timeout, cwd=cwd or REPO)

    return run


@pytest.fixture(scope="module")
def ip(state_dir: Path):
    """A real IPython shell with the extension loaded, on the test state dir (one per module)."""
    from IPython.core.interactiveshell import InteractiveShell

    os.environ["MICROAGENT_STATE_DIR"] = str(state_dir)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "microagent_jupyter")
    yield shell
    shell.run_line_magic("unload_ext", "microagent_jupyter")
