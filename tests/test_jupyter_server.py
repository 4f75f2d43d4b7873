"""The jupyter-server extension's REST API (``<base_url>/microagent/api/``) against a real server and real VMs."""

from __future__ import annotations

import asyncio
import json
import tarfile
import time
from pathlib import Path

import pytest

from jupyter_conftest_helpers import server_config
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from microagent_engine import Engine

pytest_plugins = ("pytest_jupyter.jupyter_server",)
pytestmark = pytest.mark.vm

API = ("microagent", "api")


@pytest.fixture(scope="session")
def allowed_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    (root / "data").mkdir()
    (root / "data" / "hello.txt").write_text("bundled hello\n")
    with tarfile.open(root / "config.tar", "w") as tar:
        tar.add(root / "data" / "hello.txt", arcname="hello.txt")
    return root


@pytest.fixture
def jp_server_config(state_dir: Path, allowed_root: Path):
    return server_config(state_dir, [allowed_root])


@pytest.fixture
def api(jp_fetch):
    """``await api("GET", "workspaces", "x")`` -> (status, body); never raises on HTTP errors."""

    async def call(method: str, *parts: str, body=None, params=None, raw: bool = False, **kwargs):
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        if method in ("POST", "PUT") and body is None:
            body = "{}"
        try:
            resp = await jp_fetch(*API, *parts, method=method, body=body, params=params, **kwargs)
        except HTTPClientError as exc:
            resp = exc.response
        text = resp.body.decode() if resp.body else ""
        if raw:
            return resp.code, text, resp
        return resp.code, (json.loads(text) if text and "json" in resp.headers.get("Content-Type", "") else text)

    return call


ROUTES = [("GET", "workspaces"), ("POST", "workspaces"), ("GET", "workspaces/x"), ("DELETE", "workspaces/x"),
          ("POST", "workspaces/x/start"), ("POST", "workspaces/x/halt"), ("POST", "workspaces/x/stop"),
          ("POST", "workspaces/x/kill"), ("POST", "workspaces/x/exec"), ("GET", "workspaces/x/logs"),
          ("GET", "workspaces/x/logs/stream"), ("GET", "volumes"), ("POST", "volumes"), ("GET", "volumes/x"),
          ("DELETE", "volumes/x"), ("GET", "workspaces/x/files"), ("PUT", "workspaces/x/files"), ("GET", "kernels")]


async def test_every_route_needs_authentication(jp_serverapp, jp_http_port, jp_base_url, api):
    client = AsyncHTTPClient()
    for method, path in ROUTES:
        url = f"http://localhost:{jp_http_port}{jp_base_url}microagent/api/{path}"
        resp = await client.fetch(url, method=method, body="{}" if method in ("POST", "PUT") else None, raise_error=False)
        assert resp.code in (401, 403), (method, path, resp.code)
    code, body = await api("GET", "")  # with the token it answers
    assert code == 200 and body["volumes"] is True


async def test_not_found(api):
    for method, path in [("GET", "workspaces/nope"), ("DELETE", "workspaces/nope"), ("POST", "workspaces/nope/start"),
                         ("POST", "workspaces/nope/kill"), ("GET", "workspaces/nope/logs"),
                         ("GET", "workspaces/nope/logs/stream"), ("GET", "volumes/nope"), ("DELETE", "volumes/nope")]:
        code, body = await api(method, *path.split("/"))
        assert code == 404, (method, path, code, body)
        assert body["type"] == "NotFound" and "nope" in body["error"]
    code, body = await api("POST", "workspaces", "nope", "exec", body={"argv": ["true"]})
    assert code == 404


async def test_shared_workspace_exec_and_logs(api, shared_ws):
    code, body = await api("GET", "workspaces")
    assert code == 200 and shared_ws in [w["name"] for w in body]
    code, body = await api("GET", "workspaces", shared_ws)
    assert code == 200 and body["state"] == "running" and body["execReady"]["ready"]
    code, body = await api("POST", "workspaces", shared_ws, "exec",
                           body={"argv": ["sh", "-c", 'echo "$X $WS_ENV"; cat; echo oops >&2; exit 3'],
                                 "env": {"X": "x1"}, "stdin": "from-stdin\n", "cwd": "/tmp"})
    assert code == 200
    assert body["status"] == "exited" and body["exitCode"] == 3
    assert body["stdout"] == "x1 from-create\nfrom-stdin\n" and body["stderr"] == "oops\n"
    code, body = await api("POST", "workspaces", shared_ws, "exec", body={"argv": ["sleep", "5"], "timeout": 0.5})
    assert body["status"] == "timed_out"
    for bad in ({"argv": []}, {"argv": "ls"}, {"argv": ["true"], "timeout": "soon"}, {"argv": ["true"], "x": 1},
                {"argv": ["true"], "cwd": "relative"}):
        code, body = await api("POST", "workspaces", shared_ws, "exec", body=bad)
        assert code == 400, (bad, body)
    code, body = await api("POST", "workspaces", shared_ws, "start")
    assert code == 409 and body["type"] == "InvalidState"

    code, text = await api("GET", "workspaces", shared_ws, "logs", params={"tail": "200"})
    assert code == 200 and "microagent-agent" in text
    code, body = await api("GET", "workspaces", shared_ws, "logs", params={"tail": "3", "format": "json"})
    assert code == 200 and len(body["lines"]) == 3
    code, body = await api("GET", "workspaces", shared_ws, "logs", params={"tail": "-1"})
    assert code == 400
    code, text = await api("GET", "workspaces", shared_ws, "logs", "stream", params={"follow": "0"})
    assert code == 200 and "microagent-agent" in text


async def test_workspace_lifecycle_and_followed_log_stream(api, engine: Engine):
    name = "srv-life"
    code, body = await api("POST", "workspaces", body={"name": name, "profile": "tiny", "env": {"A": "1"}})
    assert code == 201 and body["state"] == "prepared" and body["env"] == {"A": "1"}
    code, body = await api("POST", "workspaces", body={"name": name, "profile": "tiny"})
    assert code == 409 and body["type"] == "AlreadyExists"
    code, body = await api("POST", "workspaces", name, "exec", body={"argv": ["true"]})
    assert code == 409
    code, body = await api("POST", "workspaces", name, "start")
    assert code == 200 and body["state"] == "running"

    chunks: list[tuple[float, bytes]] = []
    stream = asyncio.ensure_future(api("GET", "workspaces", name, "logs", "stream", request_timeout=120,
                                       streaming_callback=lambda c: chunks.append((time.monotonic(), c))))
    deadline = time.monotonic() + 60  # the log so far arrives first (rendezvous), then the stream stays open
    while b"microagent-agent" not in b"".join(c for _, c in chunks):
        assert not stream.done() and time.monotonic() < deadline, b"".join(c for _, c in chunks)[-500:]
        await asyncio.sleep(0.1)
    assert not stream.done()
    code, body = await api("POST", "workspaces", name, "exec",
                           body={"argv": ["sh", "-c", "echo live-marker > /dev/console"]})
    assert code == 200
    for _ in range(50):
        if b"live-marker" in b"".join(c for _, c in chunks):
            break
        await asyncio.sleep(0.1)
    assert b"live-marker" in b"".join(c for _, c in chunks)
    code, body = await api("POST", "workspaces", name, "halt")
    assert code == 200 and body["state"] == "halted"
    code, _ = await asyncio.wait_for(stream, 15)  # the followed stream ends with the workspace
    assert code == 200

    code, body = await api("POST", "workspaces", name, "kill")
    assert code == 409
    code, body = await api("DELETE", "workspaces", name)
    assert code == 200 and body == {"name": name, "deleted": True}
    code, body = await api("GET", "workspaces", name)
    assert code == 404
    assert name not in [i.name for i in engine.list()]


async def test_create_rejects_host_paths_outside_allowed_roots(api, allowed_root: Path, tmp_path: Path):
    outside_tar = tmp_path / "outside.tar"
    with tarfile.open(outside_tar, "w"):
        pass
    link = allowed_root / "link.tar"
    link.symlink_to(outside_tar)
    forbidden = [
        {"attachments": [{"kind": "bundle", "name": "cfg", "source": str(outside_tar), "mountpoint": "/config"}]},
        {"attachments": [{"kind": "disk", "name": "d", "source": "/etc/passwd", "mountpoint": "/mnt"}]},
        # a path that reads as inside the root only before normalization, and a symlink out of the root
        {"attachments": [{"kind": "bundle", "source": f"{allowed_root}/../outside.tar", "mountpoint": "/c"}]},
        {"attachments": [{"kind": "bundle", "source": str(link), "mountpoint": "/c"}]},
        {"kernel": "/boot/vmlinuz"},
        {"image": "oci:/var/lib/images/x"},
    ]
    for extra in forbidden:
        code, body = await api("POST", "workspaces", body={"name": "srv-bad", "profile": "tiny", **extra})
        assert code == 403, (extra, code, body)
        assert "allowed" in body["error"] or "not accepted" in body["error"]
    for bad in ({"name": "srv-bad", "bogus": 1}, {"name": "srv-bad", "volumes": ["data:/x"]},
                {"name": "srv-bad", "attachments": [{"kind": "disk", "source": "rel.ext4", "mountpoint": "/x"}]},
                {"name": "srv-bad", "attachments": [{"kind": "volume", "source": "v", "mountpoint": "/proc"}]},
                {"name": "srv-bad", "outputs": [{"name": "r", "path": "relative"}]}, {"name": "Bad Name!"}, {"name": "srv-bad", "memoryMiB": "lots"},
                {"name": "srv-bad", "env": {"A": 1}}, {"name": "srv-bad", "profile": "enormous"}):
        code, body = await api("POST", "workspaces", body=bad)
        assert code == 400, (bad, code, body)
    code, body = await api("POST", "workspaces", body="{not json")
    assert code == 400 and "JSON" in body["error"]

    # inside the allowed roots: accepted and passed to the engine
    code, body = await api("POST", "workspaces", body={"name": "srv-ok", "profile": "tiny", "attachments": [
        {"kind": "bundle", "name": "cfg", "source": f"{allowed_root}/sub/../config.tar", "mountpoint": "/config"}]})
    assert code == 201, body
    # the engine recorded the very object the roots check read: normalized, inside the root
    assert body["attachments"] == [{"kind": "bundle", "name": "cfg", "source": str(allowed_root / "config.tar"),
                                    "mountpoint": "/config", "readOnly": True}]
    code, body = await api("DELETE", "workspaces", "srv-ok")
    assert code == 200


async def test_volumes_and_single_attach(api, engine: Engine):
    code, body = await api("POST", "volumes", body={"name": "srvvol", "sizeMiB": 32})
    assert code == 201 and body["name"] == "srvvol"
    code, body = await api("POST", "volumes", body={"name": "srvvol"})
    assert code == 409
    code, body = await api("POST", "volumes", body={"sizeMiB": 32})
    assert code == 400
    code, body = await api("GET", "volumes")
    assert "srvvol" in [v["name"] for v in body]
    code, body = await api("GET", "volumes", "srvvol")
    assert code == 200 and body["name"] == "srvvol"

    code, body = await api("POST", "workspaces", body={"name": "srv-vol", "profile": "tiny",
                                                       "attachments": [{"kind": "volume", "source": "srvvol", "mountpoint": "/data"}], "start": True})
    assert code == 201 and body["state"] == "running"
    try:
        code, body = await api("POST", "workspaces", "srv-vol", "exec",
                               body={"argv": ["sh", "-c", "echo kept > /data/f && cat /data/f"]})
        assert body["stdout"] == "kept\n"
        code, body = await api("DELETE", "volumes", "srvvol")
        assert code == 409, body  # held by a running workspace
        code, body = await api("POST", "workspaces", body={"name": "srv-vol2", "profile": "tiny",
                                                           "attachments": [{"kind": "volume", "source": "srvvol", "mountpoint": "/data"}]})
        if code == 201:  # single-attach may be enforced at create or at start
            code, body = await api("POST", "workspaces", "srv-vol2", "start")
        assert code == 409, body
    finally:
        await asyncio.to_thread(engine.kill, "srv-vol")
        for name in ("srv-vol", "srv-vol2"):
            await api("DELETE", "workspaces", name)
    code, body = await api("DELETE", "volumes", "srvvol")
    assert code == 200
    code, body = await api("GET", "volumes", "srvvol")
    assert code == 404


async def test_upload_and_download_one_file(api, jp_fetch, jp_serverapp, shared_ws):
    """The panel's Upload and Download: a round trip through the running workspace's agent, served as a download
    (never rendered), with the cp rules and the byte cap."""
    data = bytes(range(256)) * 300 + b"<script>window.__pwned=1</script>"
    code, body = await api("PUT", "workspaces", shared_ws, "files", params={"path": "/tmp/up/a b.html"}, body=data)
    assert code == 201, body
    assert body["bytes"] == len(data) and body["path"] == "/tmp/up/a b.html"
    resp = await jp_fetch(*API, "workspaces", shared_ws, "files", params={"path": "/tmp/up/a b.html"})
    assert resp.code == 200 and resp.body == data
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Disposition"] == 'attachment; filename="a_b.html"'
    for path, status in (("relative.txt", 400), ("/tmp/../etc/passwd", 400), ("/tmp/missing", 404),
                         ("/tmp", 404), ("", 400)):
        code, body = await api("GET", "workspaces", shared_ws, "files", params={"path": path})
        assert code == status, (path, code, body)
        assert "Traceback" not in json.dumps(body)
    code, body = await api("PUT", "workspaces", shared_ws, "files", params={"path": "/tmp/dir/"}, body=b"x")
    assert code == 400 and "not of a directory" in body["error"]
    config = jp_serverapp.web_app.settings["microagent_config"]
    config.max_transfer_mib = 1
    try:
        big = b"y" * ((1 << 20) + 1)
        code, body = await api("PUT", "workspaces", shared_ws, "files", params={"path": "/tmp/big"}, body=big)
        assert code == 400 and "max_transfer_mib" in body["error"]
        # a guest file over the cap: nothing is served and nothing is left on the host
        code, body = await api("POST", "workspaces", shared_ws, "exec",
                               body={"argv": ["sh", "-c", "head -c 1100000 /dev/zero > /tmp/big"]})
        assert body["exitCode"] == 0
        code, body = await api("GET", "workspaces", shared_ws, "files", params={"path": "/tmp/big"})
        assert code == 409 and "larger than" in body["error"]
    finally:
        config.max_transfer_mib = 256
    code, body = await api("GET", "workspaces", "nope", "files", params={"path": "/x"})
    assert code == 404


async def test_a_kernels_vm_is_halted_through_its_kernel(api, jp_serverapp, engine: Engine, monkeypatch):
    """A workspace recorded as a kernel's VM names its notebook; halting it without saying what becomes of the
    kernel is refused with the notebook named; with "restart" the VM halts and the kernel restarts, its
    auto-restarter stopped meanwhile (it would see the VM gone and launch the kernel a second time beside the
    restart: a browser test caught two launches racing)."""
    from microagent_jupyter.session_owner import record_owner

    sessions = jp_serverapp.session_manager
    model = await sessions.create_session(path="work/analysis.ipynb", type="notebook", kernel_name="python3")
    kid = model["kernel"]["id"]
    name = "srv-kernel-vm"
    engine.create(name, profile="tiny", network="none")
    record_owner(engine, name, kind="kernel", kernel_id=kid, notebook="old-name.ipynb")
    try:
        engine.start(name)
        code, body = await api("GET", "workspaces", name)
        assert body["owner"]["kind"] == "kernel" and body["owner"]["kernelId"] == kid
        assert body["owner"]["notebook"] == "work/analysis.ipynb" and body["owner"]["thisServer"] is True
        code, body = await api("POST", "workspaces", name, "halt")
        assert code == 409 and body["type"] == "KernelOwned" and body["notebook"] == "work/analysis.ipynb"
        assert "work/analysis.ipynb" in body["error"] and engine.status(name).state.state == "running"
        code, body = await api("POST", "workspaces", name, "halt", body={"kernel": "later"})
        assert code == 400
        polling: list[bool] = []
        halt = Engine.halt

        def halting(self: Engine, target: str, *args, **kwargs):
            restarter = jp_serverapp.kernel_manager.get_kernel(kid)._restarter
            polling.append(restarter is not None and restarter._pcallback is not None)
            return halt(self, target, *args, **kwargs)
        monkeypatch.setattr(Engine, "halt", halting)
        restarter = jp_serverapp.kernel_manager.get_kernel(kid)._restarter
        assert restarter is not None and restarter._pcallback is not None  # it polls the kernel
        code, body = await api("POST", "workspaces", name, "halt", body={"kernel": "restart"})
        assert code == 200 and body["kernel"] == "restart", body
        assert polling == [False]
        monkeypatch.undo()
        restarter = jp_serverapp.kernel_manager.get_kernel(kid)._restarter
        assert restarter is not None and restarter._pcallback is not None  # polling again after the restart
        assert engine.status(name).state.state == "halted"
        assert kid in jp_serverapp.kernel_manager  # the kernel lives on (restarted)
        code, body = await api("POST", "workspaces", name, "kill", body={"kernel": "shutdown"})
        assert code == 200 and body["kernel"] == "shutdown", body
        assert kid not in jp_serverapp.kernel_manager
    finally:
        if kid in jp_serverapp.kernel_manager:
            await jp_serverapp.kernel_manager.shutdown_kernel(kid)
        try:
            engine.kill(name)
        except Exception:  # noqa: BLE001
            pass
        engine.delete(name)
