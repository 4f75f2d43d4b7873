"""The sandboxed kernel: the host-side ZMQ relay (against a real local ipykernel standing in for the guest: the
relay is transport-agnostic) and the whole kernelspec "Python 3 (microagent sandbox)" run by nbclient in a VM."""

from __future__ import annotations

import hashlib
import hmac
import threading
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client import KernelManager
from jupyter_client.blocking.client import BlockingKernelClient

from kernel_helpers import (HOSTILE_CELLS, KERNELS, PORTS, assert_inert, ensure_entry_point, free_ports,  # noqa: F401
                            local_kernel)
from microagent_jupyter.guest_kernel import connection_info
from microagent_jupyter.relay import DELIM, Relay

REPO = Path(__file__).resolve().parent.parent
@pytest.fixture
def relayed() -> Iterator[tuple[BlockingKernelClient, Relay, dict[str, Any]]]:
    km, guest = local_kernel()
    front = connection_info(uuid.uuid4().hex, free_ports())
    relay = Relay(front, guest, alive=km.is_alive)
    relay.start()
    client = BlockingKernelClient()
    client.load_connection_info(front)
    client.start_channels()
    client.wait_for_ready(timeout=120)
    yield client, relay, guest
    client.stop_channels()
    relay.stop()
    km.shutdown_kernel(now=True)


def _run(client: BlockingKernelClient, code: str, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    outs: list[dict[str, Any]] = []
    reply = client.execute_interactive(code, output_hook=outs.append, timeout=timeout)
    return reply, outs


def test_relay_applies_the_policy_and_resigns(relayed) -> None:
    client, relay, _guest = relayed
    shown: list[dict[str, Any]] = []
    for cell in HOSTILE_CELLS:
        reply, outs = _run(client, cell)
        assert reply["content"]["status"] == "ok"
        shown += [{"type": m["msg_type"], **m["content"]} for m in outs if m["msg_type"] == "display_data"]
    assert len(shown) == 5
    assert_inert(shown)
    assert any("dropped output type" in o["data"].get("text/plain", "") for o in shown)
    reply, outs = _run(client, "print('hi'); 40 + 2")
    assert [m["content"]["text"] for m in outs if m["msg_type"] == "stream"] == ["hi\n"]
    assert [m["content"]["data"]["text/plain"] for m in outs if m["msg_type"] == "execute_result"] == ["42"]


def test_the_relay_says_when_requests_wait_for_their_replies(relayed) -> None:
    """The idle timer that puts a kernel's VM to sleep (idle_sleep.py) runs only while no request waits: the relay
    says busy when the first one starts waiting and idle when the last one is answered."""
    client, relay, _guest = relayed
    said: list[bool] = []
    relay.on_busy = said.append
    reply, _outs = _run(client, "1 + 1")
    assert reply["content"]["status"] == "ok"
    assert said and said[0] is True and said[-1] is False
    assert all(a != b for a, b in zip(said, said[1:]))  # busy and idle alternate


def test_relay_drops_guest_comms_and_forged_messages(relayed) -> None:
    client, relay, guest = relayed
    _reply, outs = _run(client, "from ipykernel.comm import Comm\nc = Comm(target_name='jupyter.widget', "
                                "data={'x': '<script>window.__pwned=6</script>'})\nc.send({'y': 1})")
    assert not [m for m in outs if m["msg_type"].startswith("comm_")]
    # a message on iopub signed with a wrong key (what a guest without the key could forge) never arrives
    ctx = zmq.Context.instance()
    forged_dropped = relay.dropped
    pub = ctx.socket(zmq.DEALER)
    pub.connect(f"tcp://127.0.0.1:{relay.frontend['shell_port']}")
    header = json.dumps({"msg_id": "x", "msg_type": "execute_request", "session": "s", "username": "u",
                         "version": "5.3", "date": "2026-01-01T00:00:00Z"}).encode()
    parts = [header, b"{}", b"{}", json.dumps({"code": "import os"}).encode()]
    bad = hmac.new(b"not-the-key", digestmod=hashlib.sha256)
    for p in parts:
        bad.update(p)
    pub.send_multipart([DELIM, bad.hexdigest().encode(), *parts])
    reply, _ = _run(client, "1")
    assert reply["content"]["status"] == "ok"
    assert relay.dropped > forged_dropped
    pub.close(0)


def test_relay_survives_a_message_that_breaks_its_rewriting(relayed) -> None:
    """A guest iopub message whose content is 100,000 nested JSON lists (200 KB, correctly signed) made the relay
    thread die on RecursionError: now that message is dropped and counted, and the next one passes."""
    client, relay, _guest = relayed
    _run(client, "k = get_ipython().kernel\n"
                 "k.session.send(k.iopub_socket, 'stream', content=b'[' * 100000 + b']' * 100000, "
                 "parent=k.get_parent('shell'))")
    reply, outs = _run(client, "print('after')", timeout=20)
    assert reply["content"]["status"] == "ok"
    assert [m["content"]["text"] for m in outs if m["msg_type"] == "stream"] == ["after\n"]
    assert relay.running and relay.broken >= 1


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_relay_forwards_only_replies_to_what_the_frontend_asked(relayed) -> None:
    """Replies whose parent the frontend never sent, a second reply to one request and an input_request while
    the frontend's execute_request did not allow stdin are dropped; kernel_info says what the host says."""
    client, relay, _guest = relayed
    before = relay.unsolicited
    client.execute_interactive("k = get_ipython().kernel\n"
                 "ident = k._parent_ident['shell']\n"
                 "k.session.send(k.shell_stream, 'execute_reply', {'status': 'ok', 'execution_count': 99}, "
                 "parent={'msg_id': 'never-sent', 'msg_type': 'execute_request'}, ident=ident)\n"
                 "k.session.send(k.shell_stream, 'kernel_info_reply', {'status': 'ok'}, "
                 "parent=k.get_parent('shell'), ident=ident)\n"
                 "k.session.send(k.stdin_socket, 'input_request', {'prompt': 'sign in again, password:', "
                 "'password': True}, parent=k.get_parent('shell'), ident=ident)", allow_stdin=False, timeout=120)
    _wait_for(lambda: relay.unsolicited >= before + 3, "the relay to drop three unsolicited messages")
    reply, _ = _run(client, "1")
    assert reply["content"]["status"] == "ok"
    assert not client.shell_channel.msg_ready() and not client.stdin_channel.msg_ready()

    # what is ours to say: a guest claiming another language, a path as extension, a debugger and a help link
    _run(client, "k = get_ipython().kernel\n"
                 "k.language_info = {'name': 'javascript', 'mimetype': 'text/html', 'file_extension': '../../.bashrc',"
                 " 'codemirror_mode': 'javascript', 'version': '<b>3</b>'}\n"
                 "k.help_links = [{'text': 'Sign in', 'url': 'https://phish.example/login'}]")
    info = client.kernel_info(reply=True, timeout=60)["content"]
    assert info["language_info"]["name"] == "python" and info["language_info"]["file_extension"] == ".py"
    assert info["language_info"]["mimetype"] == "text/x-python" and info["language_info"]["version"] == ""
    assert info["debugger"] is False
    assert all("phish" not in link["url"] for link in info["help_links"])


def test_relay_bounds_every_reply(relayed) -> None:
    """complete/history/is_complete/kernel_info replies pass only as their schema allows: lists and strings
    bounded, unknown keys and guest metadata dropped, indent only whitespace; headers rebuilt from known keys."""
    client, _relay, _guest = relayed
    _run(client, "k = get_ipython().kernel\n"
                 "k.do_complete = lambda code, pos: {'status': 'ok', 'matches': ['m' * 3000] * 3000, "
                 "'cursor_start': 0, 'cursor_end': 'x', 'metadata': {'_jupyter_types_experimental': ['<b>']}, "
                 "'extra': 'y' * 1000}\n"
                 "k.do_history = lambda *a, **kw: {'status': 'ok', 'history': [[0, 1, 'x' * 70000]] * 150 + "
                 "[{'not': 'an entry'}] + [[0, 2, 'y']] * 3000}\n"
                 "k.do_is_complete = lambda code: {'status': 'incomplete', 'indent': '<img src=x>'}")
    comp = client.complete("x", reply=True, timeout=60)
    assert len(comp["content"]["matches"]) == 2000 and all(len(m) == 1000 for m in comp["content"]["matches"])
    assert comp["content"]["metadata"] == {} and "extra" not in comp["content"]
    assert comp["content"]["cursor_end"] == 0
    assert set(comp["header"]) <= {"msg_id", "msg_type", "username", "session", "date", "version"}
    hist = client.history(reply=True, timeout=60)["content"]["history"]
    assert len(hist) == 999 and [len(h[2]) for h in hist[:150]] == [64 * 1024] * 150  # (under 16 MiB a message:
    assert hist[150] == [0, 2, "y"]  # a larger reply drops the guest's connection and never arrives); of the
    # first 1,000 entries, the one that is not (session, line, input) was dropped
    msg_id = client.is_complete("x")
    reply = client.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"] == {"status": "incomplete", "indent": ""}


def test_input_reaches_a_frontend_that_allows_stdin(relayed) -> None:
    client, _relay, _guest = relayed
    outs: list[dict[str, Any]] = []
    prompts: list[str] = []

    def answer(msg: dict[str, Any]) -> None:
        prompts.append(msg["content"]["prompt"])
        client.input("alice")

    reply = client.execute_interactive("name = input('who? ')\nprint('hello', name)", allow_stdin=True,
                                       stdin_hook=answer, output_hook=outs.append, timeout=120)
    assert reply["content"]["status"] == "ok" and prompts == ["who? "]
    assert "hello alice\n" in [m["content"].get("text") for m in outs if m["msg_type"] == "stream"]


# ---- the whole sandboxed kernel, in a VM ---------------------------------------------------------------------
@pytest.mark.vm
def test_nbclient_runs_a_notebook_in_the_sandboxed_kernel(state_dir: Path, engine, python_image: Path,
                                                         tmp_path: Path, monkeypatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    ensure_entry_point(tmp_path / "ep")
    monkeypatch.setenv("JUPYTER_PATH", str(KERNELS))
    monkeypatch.setenv("MICROAGENT_STATE_DIR", str(state_dir))
    before = {i.name for i in engine.list()}
    # the kernel's cells run as IPython runs them: top-level await (found without compiling cells that lack
    # the word), a transformed magic, an error (python_zygote.quicken_kernel)
    cells = ["x = 41", "x + 1",
             "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()",
             "import pandas as pd\npd.DataFrame({'a': [1, 2]})", *HOSTILE_CELLS,
             "import asyncio\nawait asyncio.sleep(0)\nx * 2", "%time y = x\ny", "1/0", ORDERED_CELL]
    tail = len(cells) - 4
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(nb, kernel_name="microagent-python", timeout=600, startup_timeout=600,
                            allow_errors=True)
    client.execute()
    outs = [c.outputs for c in nb.cells]
    assert [o["data"]["text/plain"] for o in outs[tail] if o["output_type"] == "execute_result"] == ["82"]
    assert [o["data"]["text/plain"] for o in outs[tail + 1] if o["output_type"] == "execute_result"] == ["41"]
    assert any("Wall time" in o.get("text", "") for o in outs[tail + 1])
    assert [o["ename"] for o in outs[tail + 2] if o["output_type"] == "error"] == ["ZeroDivisionError"]
    _assert_in_order(outs[tail + 3])
    outs = outs[:tail]
    assert outs[1][0]["data"]["text/plain"] == "42"
    assert any("image/png" in o.get("data", {}) for o in outs[2])
    assert any("<table" in o.get("data", {}).get("text/html", "") for o in outs[3])
    assert_inert([o for cell in outs[4:] for o in cell])
    assert len([o for cell in outs[4:] for o in cell]) == 5
    after = {i.name for i in engine.list()}
    assert after <= before, f"workspaces left behind: {after - before}"
    assert not [i.name for i in engine.ps() if i.name.startswith("nbk-")]


#: output from the cell's thread, another thread and a display, in the order they were made: the kernel sends
#: IOPub messages from the thread that makes them unless something is queued ahead (python_zygote._send_directly)
ORDERED_CELL = """import threading
print("a")
t = threading.Thread(target=print, args=("t",))
t.start(); t.join()
display("d")
print("b", flush=True)
print("c")
7"""


def _assert_in_order(outs: list[dict[str, Any]]) -> None:
    shown: list[tuple[str, str]] = []
    for o in outs:  # consecutive stream messages read as one (a frontend shows them so)
        kind, text = o["output_type"], o.get("text") or o.get("data", {}).get("text/plain")
        if kind == "stream" and shown and shown[-1][0] == "stream":
            shown[-1] = (kind, shown[-1][1] + text)
        else:
            shown.append((kind, text))
    assert shown == [("stream", "a\nt\n"), ("display_data", "'d'"), ("stream", "b\nc\n"),
                     ("execute_result", "7")], shown


def _assert_owner_only(info: dict[str, Any]) -> None:
    """The frontend's channels to the relay are unix sockets that another local user cannot open."""
    from jupyter_conftest_helpers import connect_as_other_user

    assert info["transport"] == "ipc", info
    for name in PORTS:
        path = f"{info['ip']}-{info[name]}"
        assert os.path.exists(path) and connect_as_other_user(path) == "PermissionError", path


@pytest.mark.vm
def test_sandboxed_kernel_interrupt_restart_shutdown(state_dir: Path, engine, python_image: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    ensure_entry_point(tmp_path / "ep")
    monkeypatch.setenv("MICROAGENT_STATE_DIR", str(state_dir))
    ksm = KernelSpecManager(kernel_dirs=[str(KERNELS / "kernels")])
    km = KernelManager(kernel_name="microagent-python", kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=300)
        workspaces = [i.name for i in engine.ps() if i.name.startswith("nbk-")]
        assert len(workspaces) == 1
        _assert_owner_only(km.get_connection_info())
        reply, _ = _run(kc, "x = 41")
        assert reply["content"]["status"] == "ok"
        sleeping = threading.Event()

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                sleeping.set()

        def interrupt() -> None:  # the frontend's interrupt, once the guest is inside the sleep
            sleeping.wait(120)
            km.interrupt_kernel()

        t = threading.Thread(target=interrupt, daemon=True)
        t.start()
        reply = kc.execute_interactive("import time; print('sleeping', flush=True); time.sleep(60)",
                                       output_hook=hook, timeout=120)
        t.join()
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        reply, outs = _run(kc, "x + 1")
        assert [m["content"]["data"]["text/plain"] for m in outs if m["msg_type"] == "execute_result"] == ["42"]
        # a request that arrives while the kernel sends a reply is answered (a reply sent on the socket itself can
        # consume the edge of the socket's FD that the request raised): each execute_request below is sent as soon
        # as the kernel says it is busy with a kernel_info_request, so it lands while that one is answered
        for _ in range(20):
            asked = kc.kernel_info()
            while kc.get_iopub_msg(timeout=60)["parent_header"].get("msg_id") != asked:  # its "busy"
                pass
            sent = kc.execute("1", store_history=False)
            answered = {kc.get_shell_msg(timeout=60)["parent_header"]["msg_id"] for _ in range(2)}
            assert answered == {asked, sent}
        # interrupted while it sends messages from the cell's thread: none is cut in half (the next cell's are whole)
        shown = threading.Event()
        t = threading.Thread(target=lambda: (shown.wait(120), km.interrupt_kernel()), daemon=True)
        t.start()
        reply = kc.execute_interactive("while True: display(x)", timeout=120,
                                       output_hook=lambda m: m["msg_type"] == "display_data" and shown.set())
        t.join()
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        for _ in range(3):
            reply, outs = _run(kc, ORDERED_CELL)
            assert reply["content"]["status"] == "ok"
            assert [m["msg_type"] for m in outs][-1] == "status", outs
            _assert_in_order([{"output_type": m["msg_type"], **m["content"]} for m in outs
                              if m["msg_type"] in ("stream", "display_data", "execute_result")])
        km.restart_kernel()
        kc.wait_for_ready(timeout=300)
        assert [i.name for i in engine.ps() if i.name.startswith("nbk-")] == workspaces  # same VM, new kernel
        _assert_owner_only(km.get_connection_info())  # the relay bound its sockets afresh
        reply, _ = _run(kc, "x")
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "NameError"
        # the VM goes away under the kernel (Halt on its card in the panel): a restart gives a new VM
        engine.halt(workspaces[0])
        km.restart_kernel()
        kc.wait_for_ready(timeout=300)
        renewed = [i.name for i in engine.ps() if i.name.startswith("nbk-")]
        assert len(renewed) == 1 and renewed != workspaces, renewed
        reply, _ = _run(kc, "1 + 1")
        assert reply["content"]["status"] == "ok"
        assert workspaces[0] not in {i.name for i in engine.list()}  # the halted one was removed
        engine.kill(renewed[0])  # gone again: the shutdown below still works and leaves nothing
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert not [i.name for i in engine.list() if i.name.startswith("nbk-")]


def test_the_shipped_kernelspec_configures_the_provisioner() -> None:
    """Every key of the kernelspec's provisioner config is a setting of the provisioner (an unknown one would be
    ignored with only a DeprecationWarning), its workspace is a valid WorkspaceSpec, and it has its own logo."""
    import warnings

    from microagent_engine.workspace_spec import WorkspaceSpec
    from microagent_jupyter.provisioner import MicroagentProvisioner

    folder = KERNELS / "kernels" / "microagent-python"
    spec = json.loads((folder / "kernel.json").read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert set(config) <= set(MicroagentProvisioner.class_trait_names(config=True)), config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        provisioner = MicroagentProvisioner(kernel_id="k", kernel_spec=None, **config)
    ws = WorkspaceSpec.from_json(dict(provisioner.workspace_spec), what="the kernelspec")
    assert ws.network.mode == "isolated" and ws.image == "builtin:python"
    assert (folder / "logo-64x64.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "logo-svg.svg").read_text().startswith("<svg")


def test_the_kernels_packer_gives_jupyter_clients_bytes() -> None:
    """The guest kernel's JSON packer (one encoder made once) packs what jupyter_client's packs to the same bytes,
    and what that one cleans, warns about or refuses (NaN, a cycle, an unknown type) it leaves to it."""
    import datetime
    import warnings

    from jupyter_client import session

    from microagent_engine.guest.python_zygote import _json_packer

    stock = session.json_packer
    fast = _json_packer(stock, session.json_default)
    assert fast is not stock
    cycle: list[Any] = []
    cycle.append(cycle)
    now = datetime.datetime.now(datetime.timezone.utc)
    for obj in [{}, {"date": now, "naive": datetime.datetime(2026, 12, 4, 1, 2, 3)}, {"b": b"\x00\xff", "s": {1, 2}},
                {"u": "é\u2028\U0001f600\x00\"\\", "n": [0, -1, 2 ** 70, 1.5, 1e-300, True, None]},
                {"nan": float("nan")}, {"inf": [float("-inf")]}, {"k": object()}, cycle, {1: "int key"}, ("t",)]:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            try:
                expected: Any = stock(obj)
            except Exception as exc:  # noqa: BLE001
                expected = type(exc)
            try:
                got: Any = fast(obj)
            except Exception as exc:  # noqa: BLE001
                got = type(exc)
        assert got == expected, (obj, got, expected)


@pytest.mark.vm
def test_the_writable_folder_comes_back_and_hostile_names_do_not(state_dir: Path, engine, python_image: Path,
                                                                  tmp_path: Path, monkeypatch) -> None:
    """The kernel starts in a read-only copy of the notebook's folder; ``writable_folder`` is writable and its
    files come back on request and at shutdown, but no symlink, odd name or path through a host symlink does."""
    import shutil

    from jupyter_client.kernelspec import KernelSpecManager

    ensure_entry_point(tmp_path / "ep")
    monkeypatch.setenv("MICROAGENT_STATE_DIR", str(state_dir))
    kernels = tmp_path / "kernels"
    shutil.copytree(KERNELS / "kernels" / "microagent-python", kernels / "sbx")
    spec = json.loads((kernels / "sbx" / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["writable_folder"] = "results"
    (kernels / "sbx" / "kernel.json").write_text(json.dumps(spec))
    notebook_dir = tmp_path / "project"
    (notebook_dir / "results").mkdir(parents=True)
    (notebook_dir / "data.csv").write_text("a,b\n1,2\n")
    (notebook_dir / "results" / "kept.txt").write_text("the host's own\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (notebook_dir / "results" / "escape").symlink_to(outside)  # a host symlink the guest must not write through
    km = KernelManager(kernel_name="sbx", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    km.start_kernel(cwd=str(notebook_dir), env={**os.environ, "JPY_SESSION_NAME": str(notebook_dir / "a.ipynb")})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=300)
        reply, outs = _run(kc, "import os\nprint(os.getcwd(), open('data.csv').read().split()[1])\n"
                               "try:\n    open('new.txt', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)")
        text = "".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream")
        assert "/notebook 1,2" in text and "read-only 30" in text, text
        reply, outs = _run(kc, "os.makedirs('results/sub', exist_ok=True)\n"
                               "open('results/summary.csv', 'w').write('n\\n3\\n')\n"
                               "open('results/sub/deep.txt', 'w').write('deep')\n"
                               "open('results/bad\\nname.txt', 'w').write('x')\n"
                               "os.symlink('/etc/passwd', 'results/passwd')\n"
                               "import shutil; shutil.rmtree('results/escape', ignore_errors=True)\n"
                               "os.makedirs('results/escape', exist_ok=True); open('results/escape/evil', 'w')"
                               ".write('x')")
        assert reply["content"]["status"] == "ok", reply["content"]
        line = km.provisioner.sync_files()
        assert (notebook_dir / "results" / "summary.csv").read_text() == "n\n3\n"
        assert (notebook_dir / "results" / "sub" / "deep.txt").read_text() == "deep"
        assert (notebook_dir / "results" / "kept.txt").read_text() == "the host's own\n"  # nothing is deleted
        assert not (notebook_dir / "results" / "passwd").exists()
        assert not [p for p in (notebook_dir / "results").iterdir() if "\n" in p.name]
        assert list(outside.iterdir()) == [], "a file went through the host's symlink"
        assert "skipped" in line, line
        _run(kc, "open('results/late.txt', 'w').write('after the sync')")
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert (notebook_dir / "results" / "late.txt").read_text() == "after the sync"  # shutdown brought it back
    assert not [i.name for i in engine.list() if i.name.startswith("nbk-")]


def test_after_a_restart_the_relay_tells_each_new_subscriber_the_kernel_is_idle() -> None:
    """A restart the frontend did not ask for (Halt from the panel): JupyterLab ignores the status of the server's
    own kernel_info, so the relay tells each (re)connecting subscriber "idle", until the first execute."""
    from jupyter_client.session import Session

    from microagent_jupyter.relay import RELAY_SESSION

    km, guest = local_kernel()
    front = connection_info(uuid.uuid4().hex, free_ports())
    relay = Relay(front, guest, alive=km.is_alive, announce_idle=True)
    relay.start()
    session = Session(key=front["key"].encode(), signature_scheme="hmac-sha256")
    ctx = zmq.Context()

    def first_status() -> dict[str, Any] | None:
        """The relay's own status message to a new subscriber (None: none within 3 s; the kernel's messages,
        such as a start-up warning on stderr, are passed over)."""
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{front['iopub_port']}")
        deadline = time.monotonic() + 3
        try:
            while (left := deadline - time.monotonic()) > 0 and sub.poll(int(left * 1000)):
                _, parts = session.feed_identities(sub.recv_multipart())
                msg = session.deserialize(parts)  # raises on a bad signature
                if msg["header"]["session"] == RELAY_SESSION:
                    return msg
            return None
        finally:
            sub.close(0)

    try:
        assert first_status() is None  # not before the new kernel answered
        relay.kernel_ready()
        msg = first_status()
        assert msg is not None and msg["msg_type"] == "status" and msg["content"] == {"execution_state": "idle"}
        assert msg["parent_header"] == {} and msg["msg_type"] == "status"
        assert first_status() is not None  # a second frontend is told too
        client = BlockingKernelClient()
        client.load_connection_info(front)
        client.start_channels()
        client.wait_for_ready(timeout=120)
        reply, _ = _run(client, "1")
        assert reply["content"]["status"] == "ok"
        client.stop_channels()
        assert first_status() is None  # after an execute the kernel's own status is the truth
    finally:
        ctx.destroy(0)
        relay.stop()
        km.shutdown_kernel(now=True)


@pytest.mark.vm
def test_a_new_kernel_takes_a_vm_of_the_warm_pool(state_dir: Path, engine, python_image: Path, tmp_path: Path,
                                                  monkeypatch) -> None:
    """With a pool (pool_size 1) a kernel's start prepares the next kernel's VM behind it; the next kernel takes
    that VM (resumed already, with its own key and the notebook's files copied in then), and the pool refills."""
    from jupyter_client.kernelspec import KernelSpecManager

    from microagent_jupyter import kernel_pool
    from microagent_jupyter.session_owner import owner_of

    ensure_entry_point(tmp_path / "ep")
    monkeypatch.setenv("MICROAGENT_STATE_DIR", str(state_dir))
    monkeypatch.setenv("MICROAGENT_KERNEL_POOL", "1")
    ksm = KernelSpecManager(kernel_dirs=[str(KERNELS / "kernels")])
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "data.csv").write_text("a\n7\n")
    managers = []
    try:
        first = KernelManager(kernel_name="microagent-python", kernel_spec_manager=ksm)
        managers.append(first)
        first.start_kernel(cwd=str(tmp_path / "nb"))
        deadline = time.monotonic() + 600  # the pool's VM is resumed in the background
        while not kernel_pool.pooled(engine) and time.monotonic() < deadline:
            time.sleep(0.5)
        pooled = kernel_pool.pooled(engine)
        assert len(pooled) == 1 and owner_of(engine, pooled[0])["kind"] == "pool", pooled
        second = KernelManager(kernel_name="microagent-python", kernel_spec_manager=ksm)
        managers.append(second)
        second.start_kernel(cwd=str(tmp_path / "nb"))
        assert second.provisioner.workspace == pooled[0] and second.provisioner.warm_from == "pool"
        owner = owner_of(engine, pooled[0])
        assert owner["kind"] == "kernel" and owner["kernelId"] == second.kernel_id, owner
        kc = second.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=300)
        reply, outs = _run(kc, "import os; print(os.getcwd(), open('data.csv').read().split()[1])")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "/notebook 7" in "".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream")
        # the pool's silent warm-up cells (a plot, a formatted value, a traceback) left nothing a user could see
        assert reply["content"]["execution_count"] == 1, reply["content"]
        reply, outs = _run(kc, "import matplotlib.pyplot as plt\n"
                               "print([k for k in ('_p', '_s') if k in globals()], plt.get_fignums(), len(In))")
        kc.stop_channels()
        assert "".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream") == "[] [] 3\n"
    finally:
        for km in managers:
            km.shutdown_kernel(now=True)
        deadline = time.monotonic() + 600  # a refill under way ends before the pool is drained
        while any(t.name == "microagent-kernel-pool" for t in threading.enumerate()) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        kernel_pool.drain()
    assert not [i.name for i in engine.list() if i.name.startswith("nbk-")]
