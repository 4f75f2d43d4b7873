"""Execute every notebook in notebooks/ headless (nbclient, a real kernel, real VMs) and check key outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from microagent_engine import Engine

from jupyter_conftest_helpers import REPO, kernel_env, run_names

pytestmark = pytest.mark.vm

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, state_dir: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env(state_dir))
    return nb


def text_of(cell: nbformat.NotebookNode, kind: str = "stdout") -> str:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream" and o["name"] == kind:
            out.append(o["text"])
        elif kind == "result" and o["output_type"] in ("execute_result", "display_data"):
            out.append(o["data"].get("text/plain", ""))
        elif kind == "error" and o["output_type"] == "error":
            out.append(f"{o['ename']}: {o['evalue']}")
    return "".join(out)


def cell_with(nb: nbformat.NotebookNode, snippet: str) -> nbformat.NotebookNode:
    found = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert found, f"no cell contains {snippet!r}"
    return found[0]


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(
        ["quickstart.ipynb", "volumes.ipynb", "persistent_workspace.ipynb", "spec_file.ipynb"])


def test_quickstart(state_dir: Path, engine: Engine, tmp_path: Path):
    nb = execute("quickstart.ipynb", state_dir, tmp_path)
    hello = cell_with(nb, 'echo "hello from')
    assert "hello from run-" in text_of(hello) and "Linux" in text_of(hello)
    ticks = cell_with(nb, "tick $i")
    assert text_of(ticks) == "tick 1\ntick 2\ntick 3\n" and text_of(ticks, "stderr") == "to stderr\n"
    # streamed: three separate stream messages at least (they arrive a second apart)
    assert len([o for o in ticks.outputs if o["output_type"] == "stream" and o["name"] == "stdout"]) >= 3
    failing = cell_with(nb, "exit 3")
    assert text_of(failing) == "about to fail\n"
    assert "MicroagentCellError" in text_of(failing, "error") and "exited with code 3" in text_of(failing, "error")
    assert text_of(cell_with(nb, "exit 4")) == ""  # --out captured it
    assert text_of(cell_with(nb, 'print("exit code:"')) == \
        "exit code: 4 | status: exited | stdout: 'captured, not shown\\n'\n"
    assert "one-shot VMs still running: []" in text_of(cell_with(nb, "running = %microagent ps"))
    assert run_names(engine) == []


def test_persistent_workspace(state_dir: Path, engine: Engine, tmp_path: Path):
    nb = execute("persistent_workspace.ipynb", state_dir, tmp_path)
    status = cell_with(nb, "status = %microagent status")
    views = [o for o in status.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views, "the status widget was not displayed"
    assert "Workspace nb-dev: prepared" in views[0]["data"]["text/plain"]
    assert "Workspace nb-dev: running" in text_of(cell_with(nb, "%microagent start nb-dev"), "result")
    assert text_of(cell_with(nb, "%%microagent exec nb-dev")) == "project: demo\nwritten before the halt\n"
    assert text_of(cell_with(nb, "uname -r")).startswith("6.")
    logs = cell_with(nb, "logs = %microagent logs")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in logs.outputs)
    assert text_of(cell_with(nb, "status.wait_for")) == "status widget says: halted\n"
    assert text_of(cell_with(nb, "%%microagent run --name nb-dev")) == "written before the halt\n"
    # the widget state saved with the notebook tracked the workspace past its first value. (Which state comes
    # last depends on timing: nbclient keeps only updates sent while a cell runs, and the final cell restarts
    # the workspace, so the poller may have last reported starting or running.)
    widget_state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    model_id = views[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert widget_state[model_id]["state"]["workspace"] == "nb-dev"
    assert widget_state[model_id]["state"]["state"] in ("starting", "running", "halted")
    assert "Deleted workspace nb-dev" in text_of(nb.cells[-1], "result")
    assert "nb-dev" not in [i.name for i in engine.list()]
    assert run_names(engine) == []


def test_volumes(state_dir: Path, engine: Engine, tmp_path: Path):
    nb = execute("volumes.ipynb", state_dir, tmp_path)
    assert text_of(cell_with(nb, "echo 42 > /data/counter.txt")) == "wrote 42\n"
    assert text_of(cell_with(nb, 'print("read back:"')) == "read back: 42\n"
    assert "nb-data" in text_of(cell_with(nb, "%microagent volume list"), "result")
    blocked = cell_with(nb, 'echo "never runs"')
    assert "never runs" not in text_of(blocked) and "nb-data" in text_of(blocked, "error")
    assert "nb-data" in text_of(cell_with(nb, "%microagent volume delete nb-data"), "error")
    assert "Deleted volume nb-data" in text_of(nb.cells[-2], "result")
    assert "nb-data" not in text_of(nb.cells[-1], "result")
    assert run_names(engine) == []


def test_spec_file(state_dir: Path, engine: Engine, tmp_path: Path):
    nb = execute("spec_file.ipynb", state_dir, tmp_path)
    created = text_of(cell_with(nb, "%microagent create --file microagent.yaml'"[:-1]), "result")
    assert "Workspace nb-spec" in created and "tiny" in created
    large = text_of(cell_with(nb, "--name nb-spec-large"), "result")
    assert "Workspace nb-spec-large" in large and "memory=384MiB" in large
    assert text_of(cell_with(nb, "%%microagent exec nb-spec")) == (
        "hostname: research\nready\nbundled file\nbody says hi to research\n")
    assert "report" in text_of(cell_with(nb, "%microagent outputs nb-spec"), "result")
    assert text_of(cell_with(nb, "%microagent output nb-spec report"), "result").strip() == "all good"
    assert "nb-spec" not in [i.name for i in engine.list()]
    assert run_names(engine) == []
