"""Bad input through every front-end — the CLI (subprocess), the magics in a real IPython shell, REST (a real
jupyter server) — reaches the user as a message, never a Python traceback; REST never answers 500 and creates
nothing for a request it refuses. No VM boots here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jupyter_conftest_helpers import server_config
from IPython.core.error import UsageError
from tornado.httpclient import HTTPClientError

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError

pytest_plugins = ("pytest_jupyter.jupyter_server",)

HOSTILE_SPECS = {
    "bomb.yaml": "a: &a [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi")),
    "deep.yaml": "setup: " + "[" * 5000 + "]" * 5000 + "\n",
    "nul.yaml": "name: a\0b\n",
    "huge.yaml": "resources:\n  sizeMiB: 1000000000\n  memoryMiB: 100000000\n",
    "shadow.yaml": "files:\n  - src: ../../../../etc/shadow\n    dst: /s\n",
    "types.yaml": "name: [1, 2]\nresources: {cpuCount: 1.5}\n",
}


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    for name, text in HOSTILE_SPECS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cli_bad_input_gives_messages(cli, specs: Path, engine: Engine) -> None:
    cases = [
        ("create", "bad/name"), ("create", "x..y"), ("create", "-bad"), ("create", "a" * 200),
        ("create", "fe1", "--memory", "abc"), ("create", "fe1", "--memory", "9" * 5000),
        ("create", "fe1", "--memory", "-5"), ("create", "fe1", "--cpus", "100000"),
        ("create", "fe1", "--size-mib", "1000000000"), ("create", "fe1", "--profile", "huge"),
        ("create", "fe1", "--hostname", "-bad-"), ("create", "fe1", "-e", "1BAD=x"), ("create", "fe1", "-e", "=x"),
        ("create", "fe1", "-v", ":"), ("create", "fe1", "-v", "/etc/passwd:/x"), ("create", "fe1", "--disk", "x"),
        ("create", "fe1", "--bundle", "b=/nonexistent.tar:/b"), ("create", "fe1", "--output", "r=relative"),
        ("create", "fe1", "--mediation", "abc"), ("create", "fe1", "--mediation", "99999=127.0.0.1:1"),
        ("create", "fe1", "--shell", "relative"), ("create", "fe1", "--kernel", "/nonexistent"),
        ("create", "fe1", "--image", "oci:/nonexistent"), ("create", "fe1", "--file", "/dev/zero"),
        ("create", "fe1", "--file", "/nonexistent.yaml"), ("create", "fe1", "--bogus-flag"),
        ("status", "nope"), ("status", "\u202eevil"), ("start", "nope"), ("exec", "nope", "--", "true"),
        ("exec", "nope", "--timeout", "abc", "--", "true"), ("logs", "nope"), ("delete", "nope", "--yes"),
        ("cp", "nope:/x", "/tmp/x"), ("cp", "a", "b"), ("volume", "create", "v1", "--size-mib", "3"),
        ("volume", "create", "v1", "--size-mib", "1000000000"), ("volume", "delete", "nope"),
        ("volume", "status", "x\ty"), ("output", "get", "nope", "r"), ("nonsense",),
        ("create", "fe1", "--allow", "@nope"), ("create", "fe1", "--allow", "*.com"),
        ("create", "fe1", "--allow", "10.0.0.0/8"), ("create", "fe1", "--secret", "T@1.2.3.4"),
        ("create", "fe1", "--secret", "T@api.example.com"),  # not on an allow-list
        ("create", "fe1", "--network", "isolated", "--allow", "pypi.org"), ("create", "fe1", "--image", "builtin:x"),
        ("egress", "nope"), ("allow", "nope", "pypi.org"), ("prepare", "nothing"),
    ] + [("create", "fe1", "--file", str(specs / name)) for name in HOSTILE_SPECS]
    for args in cases:
        proc = cli(*args, timeout=120, env={"MICROAGENT_DOCKER_IO_REGISTRY": "127.0.0.1:9"})
        assert b"Traceback" not in proc.stderr and b"Traceback" not in proc.stdout, (args, proc.stderr[-1500:])
        assert proc.returncode != 0, args
        assert b"error" in proc.stderr, (args, proc.stderr[-500:])
    assert "fe1" not in {i.name for i in engine.list()}


# ---- magics ---------------------------------------------------------------------------------------------------


def test_magics_bad_input_gives_messages(ip, specs: Path, capsys, engine: Engine) -> None:
    lines = [
        "create bad/name", "create fe2 --memory abc", "create fe2 --memory 99999999999999999999",
        "create fe2 --cpus 100000", "create fe2 --size-mib 1000000000", "create fe2 --profile huge",
        "create fe2 -v :", "create fe2 --bundle b=/nonexistent.tar:/b", "create fe2 --output r=relative",
        "create fe2 --hostname -bad-", "create fe2 --bogus", "create fe2 -f /dev/zero", "status nope",
        "status", "logs nope --max-lines abc", "exec", "exec nope -- true", "volume create v1 --size-mib 3",
        "volume create v1 --size-mib 1000000000", "volume delete nope", "volume frobnicate", "cp a", "bogus",
        "--state-dir", "start nope", "delete nope", "output nope",
    ] + [f"create fe2 -f {specs / name}" for name in HOSTILE_SPECS]
    for line in lines:
        result = ip.run_cell(f"%microagent {line}")
        err = result.error_in_exec or result.error_before_exec
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err, (line, out.out[-1500:], out.err[-1500:])
        assert err is not None, line
        assert isinstance(err, (MicroagentError, UsageError)), (line, type(err), err)
    result = ip.run_cell("%%microagent run --bogus\necho hi\n")
    assert isinstance(result.error_in_exec or result.error_before_exec, (MicroagentError, UsageError))
    assert "Traceback" not in "".join(capsys.readouterr())
    assert "fe2" not in {i.name for i in engine.list()}


# ---- REST -----------------------------------------------------------------------------------------------------


@pytest.fixture
def jp_server_config(state_dir: Path, tmp_path: Path):
    return server_config(state_dir, [tmp_path])


@pytest.fixture
def api(jp_fetch):
    async def call(method: str, *parts: str, body=None, params=None):
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        if method in ("POST", "PUT") and body is None:
            body = "{}"
        try:
            resp = await jp_fetch("microagent", "api", *parts, method=method, body=body, params=params)
        except HTTPClientError as exc:
            resp = exc.response
        return resp.code, resp.body.decode(errors="replace") if resp.body else ""
    return call


BAD_CREATES = [
    {"name": "nl\n"}, {"name": "a\nb"}, {"name": "nul\u0000"}, {"name": "../up"}, {"name": ""}, {"name": 5},
    {"name": ["x"]}, {"name": "a" * 100}, {"name": "fe3", "memoryMiB": 10 ** 30}, {"name": "fe3", "memoryMiB": 1e400},
    {"name": "fe3", "memoryMiB": 100000000}, {"name": "fe3", "cpus": 100000}, {"name": "fe3", "cpuCount": -1},
    {"name": "fe3", "sizeMiB": 1000000000}, {"name": "fe3", "sizeMiB": "big"}, {"name": "fe3", "sizeMiB": True},
    {"name": "fe3", "env": {"A\u0000": "x"}}, {"name": "fe3", "env": {"A": "x\u0000"}}, {"name": "fe3", "env": []},
    {"name": "fe3", "env": {"1A": "x"}}, {"name": "fe3", "hostname": "x\ny"}, {"name": "fe3", "profile": 3},
    {"name": "fe3", "network": "host"}, {"name": "fe3", "restart": "sometimes"}, {"name": "fe3", "shell": "sh"},
    {"name": "fe3", "setup": [1]}, {"name": "fe3", "setup": "echo\u0000"}, {"name": "fe3", "entrypoint": ["x"]},
    {"name": "fe3", "attachments": "x"}, {"name": "fe3", "attachments": [5]}, {"name": "fe3", "outputs": [{}]},
    {"name": "fe3", "attachments": [{"kind": "volume", "source": "nl\n", "mountpoint": "/v"}]},
    {"name": "fe3", "unknown": 1}, {"name": "fe3", "kernel": "/boot/x"}, {"name": "fe3", "image": 5},
    {"name": "fe3", "start": "yes please"}, {"name": "fe3", "image": "oci:/etc"},
    {"name": "fe3", "network": {"allow": ["@nope"]}}, {"name": "fe3", "secrets": [{"name": "T", "hosts": "x"}]},
    {"name": "fe3", "secrets": ["T@api.example.com"]}, {"name": "fe3", "files": [{"src": "/etc/shadow", "dst": "/s"}]},
    {"name": "fe3", "secrets": [{"name": "T", "hosts": ["1.2.3.4"]}]}, {"name": "fe3", "image": "builtin:pyhton"},
]
BAD_BODIES = ["{not json", "[1, 2]", '"str"', "null", "[" * 100000, '{"name": "\\ud800"}', b"\xff\xfe",
              '{"name": "fe3", "memoryMiB": 1' + "0" * 5000 + "}"]


async def test_rest_bad_input_is_a_4xx_and_creates_nothing(api, engine: Engine) -> None:
    before = {i.name for i in engine.list()}
    for body in BAD_CREATES + BAD_BODIES:
        code, text = await api("POST", "workspaces", body=body)
        assert 400 <= code < 500, (body if len(str(body)) < 200 else str(body)[:200], code, text[:500])
        assert "Traceback" not in text and json.loads(text)["error"], text[:500]
    for parts, body in ((("workspaces", "nl%0A"), None), (("workspaces", "a%00b"), None),
                        (("volumes", "x%0Ay"), None)):
        code, text = await api("GET", *parts)
        assert code in (400, 404), (parts, code, text)
    for body in ({"name": "nl\n"}, {"name": "v", "sizeMiB": 1000000000}, {"name": "v", "sizeMiB": 3},
                 {"name": 5}, {"name": "v", "extra": 1}, "[" * 100000, "{bad"):
        code, text = await api("POST", "volumes", body=body)
        assert 400 <= code < 500 and "Traceback" not in text, (str(body)[:100], code, text[:300])
    for body in ({"argv": "ls"}, {"argv": []}, {"argv": ["a\u0000"]}, {"argv": ["ls"], "timeout": "x"},
                 {"argv": ["ls"], "env": {"A": 1}}, {"argv": ["ls"], "bogus": 1}, "[" * 100000):
        code, text = await api("POST", "workspaces", "nope", "exec", body=body)
        assert 400 <= code < 500 and "Traceback" not in text, (str(body)[:100], code, text[:300])
    code, text = await api("GET", "workspaces", "nope", "logs", params={"tail": "abc"})
    assert 400 <= code < 500, (code, text)
    assert {i.name for i in engine.list()} == before
    assert not [p for p in engine.workspaces_dir.glob("*") if "\n" in p.name or p.name.startswith(".creating")]
