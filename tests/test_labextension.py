"""The JupyterLab panel in real Chromium against a real `jupyter lab` and real (TCG) microVMs.

Runs ``ui-tests/panel.spec.mjs`` with node (Playwright's ``playwright-core`` driving Debian's
``/usr/bin/chromium``; no browser is ever downloaded). The lab loads the committed build in
``microagent_jupyter/labextension`` through a private ``JUPYTER_PATH``, so nothing needs installing into the
environment's ``share/jupyter`` for this test.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.model import Attachment
from lab_helpers import CHROMIUM, UI_TESTS, api_get, browser_tools, fail, running_lab  # noqa: F401 (fixture)
WS, VOL = "paneltest", "panelvol"

pytestmark = pytest.mark.vm


@pytest.fixture
def lab(state_dir: Path, tmp_path: Path, browser_tools: str) -> Iterator[tuple[str, str]]:
    """A real ``jupyter lab`` with the microagent server extension; yields (url, token)."""
    with running_lab(state_dir, tmp_path, server_extension=True,
                     ready=lambda url, token: api_get(url, token, "microagent/api/")[0] == 200) as running:
        yield running


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
        fail(f"browser test failed (exit {proc.returncode}):\n{out[-6000:]}\n--- jupyter lab log (tail) ---\n"
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
