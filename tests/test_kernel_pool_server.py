"""The jupyter server starts the warm pool of the sandboxed kernelspec when it starts (a real server, real VMs), so
that the first notebook opened takes a kernel already resumed and answering."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from jupyter_conftest_helpers import server_config
from kernel_helpers import KERNELS, ensure_entry_point
from microagent_engine import Engine
from microagent_engine.workspace_spec import WorkspaceSpec

pytest_plugins = ("pytest_jupyter.jupyter_server",)
pytestmark = pytest.mark.vm


@pytest.fixture
def warm_built(engine: Engine, python_image: Path, tmp_path: Path) -> None:
    """The kernelspec's warm snapshot exists (the server's start never builds one) and its provisioner is found."""
    from microagent_jupyter.warm_python import session_spec, warm_snapshot

    ensure_entry_point(tmp_path / "ep")
    spec = json.loads((KERNELS / "kernels" / "microagent-python" / "kernel.json").read_text())
    ws = WorkspaceSpec.from_json(spec["metadata"]["kernel_provisioner"]["config"]["workspace_spec"], what="spec")
    warm_snapshot(engine, session_spec(ws))


@pytest.fixture
def jp_server_config(state_dir: Path, warm_built: None, jp_data_dir: Path):
    # the kernelspec installed where the test server looks (its own data dir), the pool from the server's config
    # (the tests' environment turns it off) as a user would set it
    shutil.copytree(KERNELS / "kernels" / "microagent-python", jp_data_dir / "kernels" / "microagent-python")
    return {**server_config(state_dir), "MicroagentProvisioner": {"pool_size": 1, "state_dir": str(state_dir)}}


async def _until(predicate, timeout: float = 600) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout  # a VM resumes in the background: wait for it, never time it
    while not predicate() and loop.time() < deadline:
        await asyncio.sleep(0.5)


async def test_the_server_prepares_the_first_notebooks_kernel(jp_serverapp, jp_fetch, engine: Engine) -> None:
    from microagent_jupyter import kernel_pool
    from microagent_jupyter.session_owner import owner_of

    kid = None
    try:
        await _until(lambda: kernel_pool.pooled(engine))  # before any kernel was asked for
        pooled = kernel_pool.pooled(engine)
        assert len(pooled) == 1 and owner_of(engine, pooled[0])["kind"] == "pool", pooled
        resp = await jp_fetch("api", "sessions", method="POST", body=json.dumps(
            {"path": "first.ipynb", "type": "notebook", "kernel": {"name": "microagent-python"}}))
        kid = json.loads(resp.body)["kernel"]["id"]
        provisioner = jp_serverapp.kernel_manager.get_kernel(kid).provisioner
        assert provisioner.workspace == pooled[0] and provisioner.warm_from == "pool"
        # the server's own origin is known to the kernel's output policy (links to it never pass from a guest)
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(jp_serverapp.connection_url))
        assert origin in provisioner.relay.policy.server_origins, provisioner.relay.policy.server_origins
        assert owner_of(engine, pooled[0])["kind"] == "kernel"
        await _until(lambda: kernel_pool.pooled(engine))  # and the pool refills behind it
        assert len(kernel_pool.pooled(engine)) == 1 and pooled[0] not in kernel_pool.pooled(engine)
    finally:
        if kid is not None:
            await jp_serverapp.kernel_manager.shutdown_kernel(kid, now=True)
        await _until(lambda: not any(t.name.startswith("microagent-") and "pool" in t.name
                                     for t in threading.enumerate()))
        kernel_pool.drain()
    assert not [i.name for i in engine.list() if i.name.startswith("nbk-")]


def test_a_kernel_outside_a_server_does_not_import_the_server() -> None:
    # nbclient or a KernelManager has no server whose origin to guard: its first kernel must not import
    # jupyter_server's app (with jsonschema's format grammars, ~1 s) to find that out
    code = ("import sys; from microagent_jupyter.provisioner import server_origins; "
            "assert server_origins() == frozenset(); assert 'jupyter_server.serverapp' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
