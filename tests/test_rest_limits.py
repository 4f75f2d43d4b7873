"""REST limits against a real jupyter server and real VMs: long execs cannot stall listing, exec responses are
capped, execs get a default timeout, and log tails are read from the end of the file."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from pathlib import Path

import pytest

from jupyter_conftest_helpers import server_config
from tornado.httpclient import HTTPClientError

from microagent_engine import Engine
from microagent_engine.logfiles import tail_lines
from microagent_jupyter.server import handlers

pytest_plugins = ("pytest_jupyter.jupyter_server",)
pytestmark = pytest.mark.vm

API = ("microagent", "api")
MiB = 1 << 20


@pytest.fixture
def jp_server_config(state_dir: Path):
    return server_config(state_dir)


@pytest.fixture
def api(jp_fetch):
    """``await api("GET", "workspaces")`` -> (status, JSON or text); never raises on HTTP errors."""

    async def call(method: str, *parts: str, body=None, params=None, **kwargs):
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        try:
            resp = await jp_fetch(*API, *parts, method=method, body=body, params=params, **kwargs)
        except HTTPClientError as exc:
            resp = exc.response
        text = resp.body.decode() if resp.body else ""
        return resp.code, (json.loads(text) if text and "json" in resp.headers.get("Content-Type", "") else text)

    return call


def waiting_shells(engine: Engine, name: str, gate: str) -> int:
    """How many guest processes wait on ``gate`` (counted from /proc cmdlines)."""
    r = engine.exec(name, ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; true"])
    return r.stdout.decode(errors="replace").count(f"while [ ! -e {gate} ]")


async def test_eight_long_execs_do_not_stall_listing(api, engine: Engine, shared_ws: str) -> None:
    gate = f"/tmp/rest-gate-{secrets.token_hex(4)}"
    script = f"while [ ! -e {gate} ]; do sleep 0.2; done; echo released"
    execs = [asyncio.ensure_future(api("POST", "workspaces", shared_ws, "exec", request_timeout=600,
                                       body={"argv": ["sh", "-c", script], "timeout": 600}))
             for _ in range(8)]
    for _ in range(600):  # rendezvous: all eight run in the guest
        if await asyncio.to_thread(waiting_shells, engine, shared_ws, gate) >= 8:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the eight execs never all ran")
    code, body = await api("GET", "workspaces")
    assert code == 200 and shared_ws in [w["name"] for w in body]
    code, body = await api("GET", "workspaces", shared_ws)
    assert code == 200 and body["state"] == "running"
    assert not any(t.done() for t in execs)  # listing answered while all eight were still running
    await asyncio.to_thread(engine.exec, shared_ws, ["touch", gate])
    for code, body in await asyncio.gather(*execs):
        assert code == 200 and body["stdout"] == "released\n" and body["truncated"] is False


def _rss(pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_exec_output_is_capped_and_the_server_stays_bounded(api, shared_ws: str) -> None:
    code, body = await api("POST", "workspaces", shared_ws, "exec", request_timeout=600, body={
        "argv": ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo err >&2"], "maxOutput": 100000})
    assert code == 200, body
    assert body["truncated"] is True and body["exitCode"] == 0 and body["stderr"] == "err\n"
    assert body["stdout"].startswith("x" * 100000) and "x" * 100001 not in body["stdout"]
    assert "[microagent: output truncated after 100000 bytes" in body["stdout"]
    for bad in (0, -1, "big", True):
        code, body = await api("POST", "workspaces", shared_ws, "exec", body={"argv": ["true"], "maxOutput": bad})
        assert code == 400 and "maxOutput" in body["error"]

    # 100 MB of output with the default cap: the server (this process) grows by a bounded amount
    base = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code, body = await api("POST", "workspaces", shared_ws, "exec", request_timeout=900, body={
            "argv": ["sh", "-c", "head -c 100000000 /dev/zero | tr '\\0' x"]})
    finally:
        done.set()
        sampler.join()
    assert code == 200 and body["truncated"] is True and len(body["stdout"]) < 17 * MiB
    del body
    assert peak - base < 300 * MiB, f"the server grew by {(peak - base) / MiB:.0f} MiB"


async def test_exec_gets_a_default_timeout(api, shared_ws: str, monkeypatch) -> None:
    monkeypatch.setattr(handlers, "REST_EXEC_TIMEOUT", 1.0)  # the server runs in this process
    code, body = await api("POST", "workspaces", shared_ws, "exec", request_timeout=600,
                           body={"argv": ["sleep", "120"]})
    assert code == 200 and body["status"] == "timed_out" and body["exitCode"] == 124
    code, body = await api("POST", "workspaces", shared_ws, "exec", body={"argv": ["true"], "timeout": -1})
    assert code == 400


async def test_log_tail_reads_from_the_end(api, engine: Engine) -> None:
    name = "logtail"
    engine.create(name, profile="tiny")
    try:
        log = engine.status(name).dir.serial_log
        with open(log, "wb") as fh:
            fh.writelines(f"line {i}\r\n".encode() for i in range(200000))
        code, body = await api("GET", "workspaces", name, "logs", params={"tail": "3", "format": "json"})
        assert code == 200 and body["lines"] == ["line 199997", "line 199998", "line 199999"]
        code, body = await api("GET", "workspaces", name, "logs", params={"tail": "0", "format": "json"})
        assert code == 200 and body["lines"] == []
        # a tail never reads more than its bound, even when one line is larger
        with open(log, "ab") as fh:
            fh.write(b"y" * (3 * MiB) + b"\n")
        assert tail_lines(log, 2, max_bytes=MiB) == ["y" * (MiB - 1)]
    finally:
        engine.delete(name)
