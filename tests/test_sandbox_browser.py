"""Guest output never runs in the page: real JupyterLab in real Chromium, a notebook on the sandboxed kernel
(started from the launcher) and one using ``%%microagent python``; hostile outputs leave ``window.__pwned``
undefined and a plot shows. The sandboxed notebook as a workplace: the status item names the VM, the panel's card
names the notebook, Upload and Download move files, and Halt on the card goes through the kernel. Runs ``ui-tests/sandbox.spec.mjs`` with node (playwright-core, /usr/bin/chromium)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent_engine import Engine
from lab_helpers import CHROMIUM, UI_TESTS, api_get, browser_tools, fail, running_lab  # noqa: F401 (fixture)
from kernel_helpers import KERNELS, ensure_entry_point

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sandbox_lab(state_dir: Path, python_image: Path, tmp_path: Path, browser_tools: str) -> Iterator[tuple[str, str]]:
    """``jupyter lab`` that sees this checkout's kernelspec and provisioner; yields (url, token)."""
    ep = tmp_path / "ep"
    ensure_entry_point(ep)  # (registers in this process too; the lab gets it through PYTHONPATH)

    def ready(url: str, token: str) -> bool:
        specs = json.loads(api_get(url, token, "api/kernelspecs")[1])["kernelspecs"]
        assert "microagent-python" in specs, sorted(specs)
        return True

    with running_lab(state_dir, tmp_path, ready=ready, jupyter_path=(KERNELS,),
                     pythonpath=(ep,) if ep.exists() else ()) as running:
        yield running


@pytest.fixture
def attacker() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 standing in for an attacker's: yields (url, the paths it was asked for)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


def test_hostile_outputs_stay_inert_in_the_browser(engine: Engine, sandbox_lab: tuple[str, str],
                                                   browser_tools: str, tmp_path: Path,
                                                   attacker: tuple[str, list[str]]) -> None:
    """Scripts do not run; rendering guest output fetches nothing (the attacker server sees only the test's own
    sentinel requests, sent after each render), no same-origin request logs the user out, and Lab's classes and
    fixed positioning cannot draw a fake toast outside the output area."""
    url, token = sandbox_lab
    attacker_url, seen = attacker
    shots = Path(os.environ.get("MICROAGENT_UI_SCREENSHOTS", UI_TESTS / "screenshots"))
    env = {**os.environ, "LAB_URL": url, "LAB_TOKEN": token, "SCREENSHOTS": str(shots), "CHROMIUM": str(CHROMIUM),
           "ATTACKER_URL": attacker_url}
    proc = subprocess.run([browser_tools, str(UI_TESTS / "sandbox.spec.mjs")], cwd=UI_TESTS, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        lab_log = tmp_path / "jupyter-lab.log"
        fail(f"browser test failed (exit {proc.returncode}):\n{out[-6000:]}\n--- jupyter lab log (tail) ---\n"
              f"{lab_log.read_text(errors='replace')[-3000:] if lab_log.exists() else ''}")
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["ok"], result
    assert result["pwned"] == {"sandboxed-kernel": "undefined", "magic": "undefined"}
    assert seen == ["/sentinel-sandboxed-kernel", "/sentinel-magic"], seen
    assert result["loggedIn"] == {"sandboxed-kernel": 200, "magic": 200}, result
    assert result["toastInside"] == {"sandboxed-kernel": True, "magic": True}, result
    w = result["workplace"]  # the sandbox as a workplace (issue 19)
    assert w["statusItem"].startswith("sandbox nbk-") and "network isolated" in w["statusItem"], w
    assert any("notebook's folder" in step for step in w["boardSteps"]), w  # the launch said what it did
    assert w["owner"] == f"kernel of {w['notebook']}" and w["notebook"].endswith(".ipynb"), w
    assert w["uploadDefault"] == "/root/upload.txt" and w["uploadRead"] == "uploaded-from-the-browser", w
    assert w["downloadName"] == "result.csv" and w["downloaded"] == "a,b\n1,2\n", w
    assert w["notebook"] in w["haltDialog"] and "Restart Kernel" in w["haltDialog"], w
    assert w["afterHalt"] == "after-restart False 42", w  # a working kernel, in a new VM
