"""The browser tests' shared parts: where the built panel, the Playwright scripts and Chromium are, the fixture
that checks the tools (failing with the install step), and one way to run a real ``jupyter lab`` for a test."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jupyter_conftest_helpers import REPO, free_port

UI_TESTS = REPO / "ui-tests"
BUILT = REPO / "microagent_jupyter" / "labextension"
CHROMIUM = Path("/usr/bin/chromium")


def fail(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="module")
def browser_tools() -> str:
    """node, playwright-core and chromium, or a failure that names the install step."""
    node = shutil.which("node")
    if not node:
        fail("node is missing; install Node.js 20 (Debian: apt-get install -y nodejs npm)")
    if not CHROMIUM.exists():
        fail(f"{CHROMIUM} is missing; install it with: apt-get install -y chromium")
    if not (UI_TESTS / "node_modules" / "playwright-core" / "package.json").exists():
        fail("playwright-core is missing; install it with: cd ui-tests && npm ci "
             "(it never downloads a browser; the test uses /usr/bin/chromium)")
    if not (BUILT / "package.json").exists() or not list((BUILT / "static").glob("remoteEntry.*.js")):
        fail("the JupyterLab extension is not built; build it with: cd labextension && jlpm install && jlpm build:prod")
    return node


@contextlib.contextmanager
def running_lab(state_dir: Path, tmp_path: Path, *, ready: Callable[[str, str], bool],
                jupyter_path: tuple[Path, ...] = (), pythonpath: tuple[Path, ...] = (),
                server_extension: bool = False) -> Iterator[tuple[str, str]]:
    """A real ``jupyter lab`` on a free port of 127.0.0.1 with this checkout's panel, the test's state dir and
    private Jupyter dirs under ``tmp_path``; yields (url, token) once ``ready(url, token)`` holds. Its log is
    ``tmp_path/jupyter-lab.log``; the server is stopped (TERM, then KILL) afterwards."""
    data = tmp_path / "jupyter-data"
    (data / "labextensions").mkdir(parents=True)
    os.symlink(BUILT, data / "labextensions" / "microagent-jupyter")
    config = tmp_path / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    # no "receive Jupyter news?" toast over the page, no update checks from the browser
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir),
           "JUPYTER_PATH": os.pathsep.join(map(str, (data, *jupyter_path))),
           "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-userdata"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "PYTHONPATH": os.pathsep.join(map(str, (REPO, *pythonpath)))}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}"]
    if server_extension:
        cmd.append('--ServerApp.jpserver_extensions={"microagent_jupyter": True}')
    log_path = tmp_path / "jupyter-lab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                fail(f"jupyter lab exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                if ready(url, token):
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                fail(f"jupyter lab did not answer in 60 s:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def api_get(url: str, token: str, path: str) -> tuple[int, bytes]:
    """(status, body) of an authenticated GET of ``path`` on the server at ``url``."""
    req = urllib.request.Request(url + path, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=2) as resp:
        return resp.status, resp.read()
