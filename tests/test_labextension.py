"""The JupyterLab panel in real Chromium against a real `jupyter lab` and real (TCG) microVMs.

Runs ``ui-tests/panel.spec.mjs`` with node (Playwright's ``playwright-core`` driving Debian's
``/usr/bin/chromium``; no browser is ever downloaded). The lab loads the committed build in
``microagent_jupyter/labextension`` through a private ``JUPYTER_PATH``, so nothing needs installing into the
environment's ``share/jupyter`` for this test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.model import Attachment

REPO = Path(__file__).resolve().parent.parent
UI_TESTS = REPO / "ui-tests"
BUILT = REPO / "microagent_jupyter" / "labextension"
CHROMIUM = Path("/usr/bin/chromium")
WS, VOL = "paneltest", "panelvol"

pytestmark = pytest.mark.vm


def _fail(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="module")
def browser_tools() -> str:
    """node, playwright-core and chromium, or a failure that names the install step."""
    node = shutil.which("node")
    if not node:
        _fail("node is missing; install Node.js 20 (Debian: apt-get install -y nodejs npm)")
    if not CHROMIUM.exists():
        _fail(f"{CHROMIUM} is missing; install it with: apt-get install -y chromium")
    if not (UI_TESTS / "node_modules" / "playwright-core" / "package.json").exists():
        _fail("playwright-core is missing; install it with: cd ui-tests && npm ci "
              "(it never downloads a browser; the test uses /usr/bin/chromium)")
    if not (BUILT / "package.json").exists() or not list((BUILT / "static").glob("remoteEntry.*.js")):
        _fail("the JupyterLab extension is not built; build it with: "
              "cd labextension && jlpm install && jlpm build:prod")
    return node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(state_dir: Path, tmp_path: Path, browser_tools: str) -> Iterator[tuple[str, str]]:
    """A real ``jupyter lab`` with the microagent server extension, on a free port; yields (url, token)."""
    data = tmp_path / "jupyter-data"
    (data / "labextensions").mkdir(parents=True)
    os.symlink(BUILT, data / "labextensions" / "microagent-jupyter")
    config = tmp_path / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    # no "receive Jupyter news?" toast over the panel, no update checks from the browser
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    root = tmp_path / "root"
    root.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir), "JUPYTER_PATH": str(data),
           "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-userdata"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", '--ServerApp.jpserver_extensions={"microagent_jupyter": True}',
           f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}"]
    log_path = tmp_path / "jupyter-lab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                _fail(f"jupyter lab exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                req = urllib.request.Request(url + "microagent/api/", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                _fail(f"jupyter lab did not serve /microagent/api/ in 60 s:\n"
                      f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def panel_workspace(engine: Engine) -> Iterator[str]:
    """A running tiny workspace holding a 16 MiB volume, its network narrowed to one name (the panel widens it);
    killed and deleted (with the volumes) afterwards."""
    engine.volumes.create(VOL, size_mib=16)
    try:
        engine.create(WS, profile="tiny", attachments=[Attachment("volume", VOL, VOL, "/data")],
                      network={"mode": "user", "allow": ["allowed.test:80"]})
        engine.start(WS)
        yield WS
    finally:
        try:
            if engine.status(WS).running:
                engine.kill(WS)
        except MicroagentError:
            pass
        try:
            engine.delete(WS)
        except MicroagentError:
            pass
        for vol in (VOL, VOL + "x"):
            try:
                engine.volumes.delete(vol, force=True)
            except MicroagentError:
                pass


NOTEBOOK_CELLS = (
    "%load_ext microagent_jupyter",
    "%microagent start {ws}",
    '%microagent exec {ws} -- sh -c "echo hi there"',
    "%microagent logs {ws}",
    "%microagent exec {ws} -- sh -c 'seq 60 | sed s/^/console-line-/ > /dev/console; echo ma-last-line > /dev/console'",
    "%microagent halt {ws}",
    "open('in.txt', 'w').write('payload from host\\n')\n%microagent cp in.txt {ws}:/root/in.txt",
    "%microagent cp {ws}:/root/in.txt back.txt",
    "print(open('back.txt').read())",
    "%%microagent run --profile tiny\ntrap '' INT TERM; echo started; while true; do echo x; sleep 0.1; done",
    "%microagent ps",
)


def _write_notebook(path: Path, ws: str) -> None:
    """The notebook the browser runs cell by cell (see notebookChecks in panel.spec.mjs)."""
    cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": src.replace("{ws}", ws)} for src in NOTEBOOK_CELLS]
    path.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}))


def test_panel_in_chromium(engine: Engine, lab: tuple[str, str], panel_workspace: str, browser_tools: str,
                           tmp_path: Path) -> None:
    url, token = lab
    shots = Path(os.environ.get("MICROAGENT_UI_SCREENSHOTS", UI_TESTS / "screenshots"))
    _write_notebook(tmp_path / "root" / "polish.ipynb", panel_workspace)
    env = {**os.environ, "LAB_URL": url, "LAB_TOKEN": token, "MA_WS": panel_workspace, "MA_VOL": VOL,
           "SCREENSHOTS": str(shots), "CHROMIUM": str(CHROMIUM), "MA_NOTEBOOK": "polish.ipynb"}
    proc = subprocess.run([browser_tools, str(UI_TESTS / "panel.spec.mjs")], cwd=UI_TESTS, env=env,
                          capture_output=True, text=True, timeout=480)
    out = proc.stdout + proc.stderr
    print(out)
    if proc.returncode != 0:
        lab_log = tmp_path / "jupyter-lab.log"
        _fail(f"browser test failed (exit {proc.returncode}):\n{out[-6000:]}\n--- jupyter lab log (tail) ---\n"
              f"{lab_log.read_text(errors='replace')[-3000:] if lab_log.exists() else ''}")
    result_line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result_line, out
    result = json.loads(result_line[-1][len("RESULT "):])
    assert result["ok"], result
    # the panel's Allow widened the running workspace's allow-list (and its record)
    assert result["allowed"] == "blocked.test:80"
    assert "blocked.test:80" in engine.status(panel_workspace).config.network_policy.to_json()["allow"]
    # the click in the browser really halted the VM (and the notebook, which started it again, halted it too)
    assert engine.status(panel_workspace).state.state == "halted"
    assert result["interruptSeconds"] < 10
    assert not [i.name for i in engine.list() if i.name.startswith("run-")]  # the interrupted one-shot is gone
    vol = engine.volumes.get(VOL)
    assert vol.attached is None and vol.last_holder == panel_workspace
    assert VOL + "x" not in {v.name for v in engine.volumes.list()}
    for shot in result["screenshots"]:
        assert Path(shot).stat().st_size > 0
    serial = Path(engine.status(panel_workspace).to_json()["serialLog"]).read_text(errors="replace")
    if "Traceback (most recent call last)" in serial:  # the panel shows this log to users: flag host noise in it
        warnings.warn("the workspace's serial log contains a host-side Python traceback:\n"
                      + serial[serial.index("Traceback"):][:1500])
