"""%microagent / %%microagent through a real IPython shell and a real kernel, against real VMs.

Boots are few: most checks exec in the session's ``shared`` workspace (``--name shared`` reuses it).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from IPython.core.error import UsageError
from jupyter_client import KernelManager

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, InvalidState, MicroagentError, NotFound
from microagent_jupyter.magics import MicroagentCellError
from microagent_jupyter.widgets import SerialLogWidget, WorkspaceStatusWidget

from jupyter_conftest_helpers import kernel_env, run_names

pytestmark = pytest.mark.vm


class Recorder:
    """A text stream that records when each write arrives (stands in for a kernel's OutStream)."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


@pytest.fixture
def captured(monkeypatch):
    """Recorders for sys.stdout/sys.stderr, installed lazily: pytest re-installs its own capture streams at
    the start of the call phase, after fixtures ran."""
    out, err = Recorder(), Recorder()

    class Lazy:
        def __iter__(self):
            monkeypatch.setattr(sys, "stdout", out)
            monkeypatch.setattr(sys, "stderr", err)
            return iter((out, err))

    return Lazy()


def _release_when(seen: Callable[[], bool], engine: Engine, ws: str, flag: str) -> threading.Thread:
    """Create ``flag`` in the guest once ``seen()`` is true: a cell waiting for it ends only if its first
    output reached us while it was still running."""
    def run() -> None:
        deadline = time.monotonic() + 120
        while not seen() and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.exec(ws, ["touch", flag])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_run_streams_output_live_in_named_workspace(ip, engine, shared_ws, captured):
    out, err = captured
    engine.exec(shared_ws, ["rm", "-f", "/tmp/go-ipy"])
    _release_when(lambda: "a" in out.text, engine, shared_ws, "/tmp/go-ipy")
    ip.run_cell_magic("microagent", f"run --name {shared_ws} --timeout 150",
                      "echo a; echo e >&2; while [ ! -e /tmp/go-ipy ]; do sleep 0.05; done; echo b\n")
    assert out.text == "a\nb\n" and err.text == "e\n"
    assert [text for _, text in out.writes if text.strip()][0] == "a\n"


def test_run_python_style_command_gets_cell_as_stdin(ip, shared_ws, captured):
    out, _ = captured
    # the command reads the cell body on stdin, as `%%microagent run python3` would with a python image
    ip.run_cell_magic("microagent", f"run --name {shared_ws} sh -s -- x y", 'echo "args:$1,$2 env:$WS_ENV"\n')
    assert out.text == "args:x,y env:from-create\n"


def test_exit_codes_raise_unless_no_raise_error(ip, shared_ws, captured):
    with pytest.raises(MicroagentCellError) as info:
        ip.run_cell_magic("microagent", f"run --name {shared_ws}", "echo partial; exit 3\n")
    assert info.value.exit_code == 3 and info.value.returncode == 3
    assert info.value.result.stdout == b"partial\n"
    assert "exited with code 3" in str(info.value)

    ip.run_cell_magic("microagent", f"run --name {shared_ws} --no-raise-error --result res", "exit 5\n")
    assert ip.user_ns["res"].exit_code == 5

    with pytest.raises(MicroagentCellError) as info:
        ip.run_cell_magic("microagent", f"run --name {shared_ws} --timeout 0.5", "sleep 5\n")
    assert info.value.result.status == "timed_out"

    with pytest.raises(MicroagentCellError) as info:
        ip.run_line_magic("microagent", f"run --name {shared_ws} no-such-command-xyz")
    assert info.value.exit_code == 127


def test_out_and_err_variables(ip, shared_ws, captured):
    out, err = captured
    ip.run_cell_magic("microagent", f"run --name {shared_ws} --out o --err e -e GREETING=hello",
                      'echo "$GREETING out"; echo "to err" >&2\n')
    assert ip.user_ns["o"] == "hello out\n" and ip.user_ns["e"] == "to err\n"
    assert out.text == "" and err.text == ""


def test_exec_line_and_cell(ip, shared_ws, captured):
    out, _ = captured
    ip.run_line_magic("microagent", f"exec {shared_ws} -- echo from-line")
    ip.run_cell_magic("microagent", f"exec {shared_ws} --cwd /tmp", "pwd\n")
    assert out.text == "from-line\n/tmp\n"


def test_one_shot_run_exit_code_and_delete(ip, engine: Engine, captured):
    out, _ = captured
    before = {i.name for i in engine.list()}
    with pytest.raises(MicroagentCellError) as info:
        ip.run_cell_magic("microagent", "run --profile tiny --delete", "echo one-shot; exit 7\n")
    assert info.value.exit_code == 7 and out.text == "one-shot\n"
    assert {i.name for i in engine.list()} == before  # deleted
    assert run_names(engine) == []  # and nothing left running


def test_help_and_usage_errors(ip):
    assert "%%microagent run" in repr(ip.run_line_magic("microagent", ""))
    assert "--no-raise-error" in repr(ip.run_line_magic("microagent", "run --help"))
    assert "--size-mib" in repr(ip.run_line_magic("microagent", "volume -h"))
    with pytest.raises(UsageError):
        ip.run_line_magic("microagent", "frobnicate")
    with pytest.raises(UsageError):
        ip.run_line_magic("microagent", "run --memory lots")
    with pytest.raises(NotFound):
        ip.run_line_magic("microagent", "status no-such-ws")


def test_query_line_magics_render_html_and_text(ip, shared_ws):
    ps = ip.run_line_magic("microagent", "ps")
    assert shared_ws in repr(ps) and "running" in repr(ps)
    html = ps._repr_html_()
    assert "<table" in html and shared_ws in html and "microagent-state-running" in html
    listing = ip.run_line_magic("microagent", "list")
    assert shared_ws in [d["name"] for d in listing]
    status = ip.run_line_magic("microagent", f"status {shared_ws}")  # no kernel: a static record
    assert "State:" in repr(status) and status["state"] == "running" and status["execReady"]["ready"]
    assert "<table" in status._repr_html_()
    logs = ip.run_line_magic("microagent", f"logs {shared_ws}")
    assert "microagent-agent" in repr(logs)


def test_lifecycle_line_magics_and_live_widgets(ip, engine: Engine):
    name = "mg-life"
    rec = ip.run_line_magic("microagent", f"create {name} --profile tiny")
    assert rec["state"] == "prepared"
    status = WorkspaceStatusWidget(engine, name, interval=0.2)
    logw = SerialLogWidget(engine, name)
    try:
        assert status.state == "prepared" and not status._buttons["start"].disabled
        msg = ip.run_line_magic("microagent", f"start {name}")
        assert repr(msg) == f"Workspace {name}: running"
        status.wait_for(lambda s: s == "running", 10)
        assert status._buttons["start"].disabled and not status._buttons["halt"].disabled
        assert "execReady" in repr(status) and "uptime" in repr(status)
        assert "mediationReady: – not configured" in repr(status) and "✓" in repr(status)
        assert status.click("kill") is None and status.state == "running"  # the first press only asks
        assert status._buttons["kill"].description == "Really kill?" and "confirm" in status._message.value
        deadline = time.monotonic() + 10
        while "microagent-agent" not in logw.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "microagent-agent" in logw.text and logw.line_count > 0
        # pause freezes the view but not the buffer
        logw.paused = True
        frozen = logw._view.value
        engine.exec(name, ["sh", "-c", "echo marker-from-guest > /dev/console"])
        deadline = time.monotonic() + 10
        while "marker-from-guest" not in logw.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "marker-from-guest" in logw.text
        time.sleep(0.6)
        assert logw._view.value == frozen
        logw.paused = False
        deadline = time.monotonic() + 5
        while "marker-from-guest" not in logw._view.value and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "marker-from-guest" in logw._view.value

        polls = status.polls
        engine.halt(name)  # changed behind the widget's back: the poller notices
        assert status.wait_for(lambda s: s == "halted", 10) == "halted"
        assert status.polls > polls
        # the record says halted a moment before the supervisor has exited; start is offered once it has
        deadline = time.monotonic() + 10
        while status._buttons["start"].disabled and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not status._buttons["start"].disabled and status._buttons["halt"].disabled
        assert status._rows["uptime"][0].layout.display == "none"
        # a button whose action fails shows the engine's message in the widget
        status.action("halt", wait=True)
        assert "halt failed" in status._message.value and "not running" in status._message.value

        with pytest.raises(InvalidState):
            ip.run_line_magic("microagent", f"halt {name}")
    finally:
        status.close()
        logw.close()
    deadline = time.monotonic() + 30  # closing stops their threads: wait for that, not for a fixed time
    while status.polling or logw.following:
        assert time.monotonic() < deadline, "the closed widgets kept polling"
        time.sleep(0.05)
    assert repr(ip.run_line_magic("microagent", f"delete {name}")) == f"Deleted workspace {name}"
    with pytest.raises(NotFound):
        engine.status(name)


def test_volume_line_magics(ip, engine: Engine):
    created = ip.run_line_magic("microagent", "volume create mgvol --size-mib 64")
    assert created["name"] == "mgvol"
    assert "mgvol" in repr(ip.run_line_magic("microagent", "volume list"))
    assert ip.run_line_magic("microagent", "volume status mgvol")["name"] == "mgvol"
    assert "Deleted volume mgvol" in repr(ip.run_line_magic("microagent", "volume delete mgvol"))
    assert "mgvol" not in repr(ip.run_line_magic("microagent", "volume list"))


# ---- a real kernel -----------------------------------------------------------------------------


class Kernel:
    def __init__(self, state_dir: Path):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=kernel_env(state_dir))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 120, on_msg=None) -> tuple[dict, list[dict]]:
        msg_id = self.kc.execute(code)
        msgs: list[dict] = []
        deadline = time.monotonic() + timeout
        reply = None
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no idle from the kernel within {timeout} s; got {msgs}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msgs.append(msg)
            if on_msg:
                on_msg(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        return reply, msgs

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(state_dir: Path):
    k = Kernel(state_dir)
    reply, _ = k.execute("%load_ext microagent_jupyter")
    assert reply["content"]["status"] == "ok"
    yield k
    k.close()


def _stream_text(msgs: list[dict], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == name)


def test_kernel_streams_before_the_command_ends(kernel, engine, shared_ws):
    """The guest waits for a file the test creates only after an iopub stream message carried "a"."""
    engine.exec(shared_ws, ["rm", "-f", "/tmp/go-kernel"])
    got_a = threading.Event()

    def watch(msg: dict) -> None:
        if msg["msg_type"] == "stream" and "a" in msg["content"].get("text", ""):
            got_a.set()

    _release_when(got_a.is_set, engine, shared_ws, "/tmp/go-kernel")
    reply, msgs = kernel.execute(f"%%microagent run --name {shared_ws} --timeout 150\n"
                                 "echo a; while [ ! -e /tmp/go-kernel ]; do sleep 0.05; done; echo b", on_msg=watch)
    assert reply["content"]["status"] == "ok"
    assert _stream_text(msgs) == "a\nb\n"
    first_a = next(m for m in msgs if m["msg_type"] == "stream" and "a" in m["content"]["text"])
    assert "b" not in first_a["content"]["text"], "a and b arrived together: output was not streamed"


def test_kernel_error_shows_exit_code_without_engine_traceback(kernel, shared_ws):
    reply, msgs = kernel.execute(f"%%microagent run --name {shared_ws}\nexit 9")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "MicroagentCellError"
    errors = [m for m in msgs if m["msg_type"] == "error"]
    assert errors and "exited with code 9" in "".join(errors[0]["content"]["traceback"])
    reply, _ = kernel.execute(f"%%microagent run --name {shared_ws} --no-raise-error --out captured\nexit 9")
    assert reply["content"]["status"] == "ok"
    reply, msgs = kernel.execute("%microagent status no-such-ws")
    assert reply["content"]["ename"] == "NotFound"
    assert len(reply["content"]["traceback"]) == 1  # the message, not a trace through the engine


def test_kernel_tables_are_html_with_a_text_fallback(kernel, shared_ws):
    reply, msgs = kernel.execute("%microagent ps")
    data = next(m["content"]["data"] for m in msgs if m["msg_type"] == "execute_result")
    assert "<table" in data["text/html"] and shared_ws in data["text/html"]
    assert data["text/plain"].startswith("NAME") and shared_ws in data["text/plain"]


def test_kernel_status_magic_renders_a_live_widget(kernel, shared_ws):
    reply, msgs = kernel.execute(f"w = %microagent status {shared_ws}\nw")
    assert reply["content"]["status"] == "ok"
    bundles = [m["content"]["data"] for m in msgs if m["msg_type"] == "execute_result"]
    assert bundles and "application/vnd.jupyter.widget-view+json" in bundles[0]
    assert f"Workspace {shared_ws}: running" in bundles[0]["text/plain"]
    reply, msgs = kernel.execute("import time; n = w.polls; time.sleep(2); print(w.polls > n, w.polling)\n"
                                 "w.close(); time.sleep(1.2); print(w.polling)")
    assert _stream_text(msgs) == "True True\nFalse\n"
    reply, msgs = kernel.execute(f"lw = %microagent logs {shared_ws}\nimport time; time.sleep(1); "
                                 f"print('microagent-agent' in lw.text); lw.close()")
    assert _stream_text(msgs) == "True\n"


def test_kernel_interrupt_leaves_no_vm_running(kernel, engine: Engine):
    started = threading.Event()

    def watch(msg: dict) -> None:
        if msg["msg_type"] == "stream" and "started" in msg["content"].get("text", ""):
            started.set()

    def interrupt() -> None:
        if started.wait(180):
            time.sleep(0.5)
            kernel.km.interrupt_kernel()

    threading.Thread(target=interrupt, daemon=True).start()
    before = {i.name for i in engine.list()}
    # the command ignores INT and TERM and keeps printing: only the KILL step ends it
    reply, msgs = kernel.execute("%%microagent run --profile tiny\n"
                                 "trap '' INT TERM; echo started; while true; do echo x; sleep 0.1; done",
                                 on_msg=watch, timeout=240)
    assert started.is_set()
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "MicroagentInterrupted"  # a KeyboardInterrupt
    assert len(content["traceback"]) == 1 and "KeyboardInterrupt" in content["traceback"][0]
    assert len(content["traceback"]) == 1 and "no VM is left running" in content["traceback"][0]
    assert run_names(engine) == []
    assert {i.name for i in engine.list()} == before  # the one-shot's record is gone too
    # the kernel is still usable
    reply, msgs = kernel.execute("print('alive')")
    assert _stream_text(msgs) == "alive\n"


# ---- notebook polish (issue 11) ------------------------------------------------------------------


def test_magic_lines_split_like_a_shell(ip, shared_ws, captured):
    out, _ = captured
    ip.user_ns["who"] = "you there"
    ip.run_line_magic("microagent", f'exec {shared_ws} -- sh -c "echo hi there"')
    ip.run_line_magic("microagent", f"exec {shared_ws} -- echo \"a  b\" 'c d'")
    ip.run_cell_magic("microagent", f'run --name {shared_ws} -e "K=a b"', 'echo "[$K]"\n')
    ip.run_line_magic("microagent", f'exec {shared_ws} -- echo "hey $who"')  # IPython expands $who first
    assert out.text == "hi there\na  b c d\n[a b]\nhey you there\n"
    with pytest.raises(UsageError, match="quot"):
        ip.run_line_magic("microagent", f'exec {shared_ws} -- echo "unclosed')


def _complete(ip, line: str) -> list[str]:
    from IPython.core.completer import provisionalcompleter

    with provisionalcompleter():
        return [c.text for c in ip.Completer.completions(line, len(line))]


def test_completion_of_subcommands_options_and_names(ip, shared_ws, engine: Engine):
    engine.volumes.create("compvol", size_mib=16) if "compvol" not in [v.name for v in engine.volumes.list()] \
        else None
    assert set(_complete(ip, "%microagent st")) == {"status", "start", "stop"}  # not %store
    assert _complete(ip, "%%microagent run --pro") == ["--profile"]
    assert _complete(ip, "%%microagent run --profile ti") == ["tiny"]
    assert _complete(ip, "%%microagent run --network i") == ["isolated"]  # the parser's own choices
    assert _complete(ip, "%%microagent python --network u") == ["user"]
    assert _complete(ip, f"%microagent status {shared_ws[:3]}") == [shared_ws]
    assert _complete(ip, f"%microagent exec {shared_ws[:3]}") == [shared_ws]
    assert _complete(ip, "%%microagent run -v compv") == ["compvol:"]
    assert "builtin" in _complete(ip, "%%microagent run --image bu")


def test_completion_offers_every_subcommand_of_the_table_and_nothing_else(ip):
    from microagent_jupyter.magic_table import COMMANDS

    offered = _complete(ip, "%microagent ")
    assert offered == [c.name for c in COMMANDS]  # the table's order; no `%%`, `-`, `image` or other stray words
    assert {"python", "session", "pause", "snapshot"} <= set(offered)
    assert _complete(ip, "%%microagent ") == offered
    for entry in COMMANDS:  # every entry completes from its own prefix, and its options from its parser
        assert entry.name in _complete(ip, f"%microagent {entry.name[:2]}")
        parser = entry.parser() if entry.parser is not None else None
        options = {o for o in (parser._option_string_actions if parser else ()) if o.startswith("--")}
        assert set(_complete(ip, f"%microagent {entry.name} --")) == options | {"--help"}
    assert _complete(ip, "%microagent session ") == ["restart", "stop", "sync", "list"]
    assert _complete(ip, "%microagent ps ") == ["--help"]  # nothing positional: options, never Python names
    assert "--in" in _complete(ip, "%%microagent python ")
    assert _complete(ip, "%microagent snapshot l") == ["list"]


def test_unknown_subcommand_lists_the_subcommands(ip):
    from microagent_jupyter.magic_table import COMMANDS

    with pytest.raises(UsageError) as err:
        ip.run_line_magic("microagent", "frobnicate")
    message = str(err.value)
    assert "'frobnicate'" in message and "%microagent help" in message
    assert all(c.name in message for c in COMMANDS)
    with pytest.raises(UsageError, match="unknown subcommand 'frob'"):
        ip.run_line_magic("microagent", "frob --help")
    help_text = repr(ip.run_line_magic("microagent", "help"))
    assert all(f"microagent {c.name}" in help_text for c in COMMANDS)
    assert "usage: %microagent pause NAME" in repr(ip.run_line_magic("microagent", "pause --help"))


def test_help_reads_well_and_works_from_an_empty_cell(ip):
    text = repr(ip.run_line_magic("microagent", "exec --help"))
    assert text.startswith("usage: %microagent exec") and "::" not in text
    result = ip.run_cell("%%microagent run --help\n")
    assert result.success and "--no-raise-error" in repr(result.result)


def test_one_shot_runs_are_removed_unless_kept_and_prune_removes_kept_ones(ip, engine: Engine, captured):
    out, _ = captured
    before = {i.name for i in engine.list()}
    ip.run_cell_magic("microagent", "run --profile tiny", "echo gone\n")
    assert {i.name for i in engine.list()} == before
    ip.run_cell_magic("microagent", "run --profile tiny --keep", "echo kept\n")
    kept = [i for i in engine.list() if i.name not in before]
    assert len(kept) == 1 and kept[0].state.state == "halted" and kept[0].to_json()["oneShot"] is True
    assert out.text == "gone\nkept\n"
    one_shots_before = {i.name for i in engine.list() if i.config.one_shot}  # other tests' kept runs count too
    removed = ip.run_line_magic("microagent", "prune")
    assert kept[0].name in removed.data["removed"] and set(removed.data["removed"]) <= one_shots_before
    assert not any(i.config.one_shot and not i.running for i in engine.list())


def test_refused_run_leaves_no_record(ip, engine: Engine):
    engine.volumes.create("mg-busy", size_mib=16)
    from microagent_engine.model import parse_attachment_flags

    engine.create("mg-holder", profile="tiny", attachments=parse_attachment_flags(["mg-busy:/data"], [], []))
    engine.start("mg-holder")
    try:
        before = {i.name for i in engine.list()}
        from microagent_engine.errors import VolumeInUse

        with pytest.raises(VolumeInUse):
            ip.run_cell_magic("microagent", "run --profile tiny -v mg-busy:/data", "echo never\n")
        with pytest.raises(VolumeInUse):
            ip.run_cell_magic("microagent", "run --profile tiny --name mg-refused -v mg-busy:/data", "echo never\n")
        assert {i.name for i in engine.list()} == before
    finally:
        engine.kill("mg-holder")
        engine.delete("mg-holder")


def test_failed_boot_error_quotes_the_boot_log(ip, engine: Engine):
    before = {i.name for i in engine.list()}
    with pytest.raises(MicroagentError) as info:
        ip.run_cell_magic("microagent", "run --memory 40 --delete", "echo never\n")
    message = str(info.value)
    assert "failed to start" in message and "Last lines of the boot log" in message
    assert "microagent: boot at" in message  # a line of the (deleted) workspace's console log
    assert "microagent logs run-" not in message and "vm.log" not in message
    assert {i.name for i in engine.list()} == before


def test_python_commands_run_unbuffered(ip, engine: Engine, shared_ws, captured):
    out, _ = captured
    fake_python = ("mkdir -p /tmp/py && printf '#!/bin/sh\\necho \"[$PYTHONUNBUFFERED]\"\\n' > /tmp/py/python3 "
                   "&& chmod +x /tmp/py/python3")  # prints what a real interpreter would see
    engine.exec(shared_ws, ["sh", "-c", fake_python])
    ip.run_cell_magic("microagent", f"run --name {shared_ws} /tmp/py/python3", "print(1)\n")
    ip.run_cell_magic("microagent", f"run --name {shared_ws} -e PYTHONUNBUFFERED=0 /tmp/py/python3", "print(1)\n")
    ip.run_cell_magic("microagent", f"exec {shared_ws} /tmp/py/python3", "print(1)\n")
    ip.run_cell_magic("microagent", f"exec {shared_ws} sh", "echo \"[$PYTHONUNBUFFERED]\"\n")
    assert out.text == "[1]\n[0]\n[1]\n[]\n"


def test_cp_both_ways_and_output_without_dest(ip, engine: Engine, tmp_path: Path, monkeypatch):
    from IPython.display import Image

    from microagent_engine.model import parse_output_flag

    engine.create("mg-files", profile="tiny", outputs=[parse_output_flag(o) for o in
                                                       ("pic=/out/pic.png", "notes=/out/notes.txt", "blob=/out/b.bin")])
    try:
        png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
        for name, data in (("pic.png", png), ("notes.txt", b"hello notes\n"), ("b.bin", b"\x00\x01\xfe\xff")):
            (tmp_path / name).write_bytes(data)
            msg = ip.run_line_magic("microagent", f"cp {tmp_path / name} mg-files:/out/{name}")
            assert repr(msg).startswith("Copied")
        back = ip.run_line_magic("microagent", f"cp mg-files:/out/notes.txt {tmp_path}/back.txt")
        assert repr(back).startswith("Copied") and (tmp_path / "back.txt").read_bytes() == b"hello notes\n"
        shown = ip.run_line_magic("microagent", "output mg-files pic")
        assert isinstance(shown, Image) and shown.data == png
        assert repr(ip.run_line_magic("microagent", "output mg-files notes")) == "hello notes\n"
        monkeypatch.chdir(tmp_path)
        written = ip.run_line_magic("microagent", "output mg-files blob")
        assert "written to" in repr(written) and (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xfe\xff"
        for line in (f"cp --max-size 4 mg-files:/out/notes.txt {tmp_path}/capped.txt",
                     f"output --max-size=4 mg-files notes {tmp_path}/capped.txt"):  # a copy over the cap: refused
            result = ip.run_cell(f"%microagent {line}")
            assert isinstance(result.error_in_exec, InvalidArgument), result.error_in_exec
            assert "over the copy cap of 4 bytes; nothing was copied" in str(result.error_in_exec)
            assert not (tmp_path / "capped.txt").exists()
        back = ip.run_line_magic("microagent", f"cp --max-size 12 mg-files:/out/notes.txt {tmp_path}/capped.txt")
        assert (tmp_path / "capped.txt").read_bytes() == b"hello notes\n"
    finally:
        engine.delete("mg-files")


def test_notebook_errors_suggest_magics(ip, captured):
    out, _ = captured
    result = ip.run_cell("%microagent status no-such-ws")
    assert isinstance(result.error_in_exec, NotFound)
    assert "'%microagent list'" in out.text and "Traceback" not in out.text


def test_kernel_shows_preparation_in_place_then_collapses_it(kernel, engine: Engine):
    reply, msgs = kernel.execute("%%microagent run --profile tiny\necho command-output")
    assert reply["content"]["status"] == "ok"
    kinds = [(m["msg_type"], m["content"]) for m in msgs
             if m["msg_type"] in ("display_data", "update_display_data", "stream")]
    shown = [c["data"]["text/html"] for t, c in kinds if t in ("display_data", "update_display_data")]
    assert [t for t, _ in kinds].count("display_data") == 1  # one display, updated in place
    assert "Building rootfs" in shown[0] and any("Booting" in h for h in shown)
    first_output = next(i for i, (t, c) in enumerate(kinds) if t == "stream" and "command-output" in c["text"])
    last_update = max(i for i, (t, _) in enumerate(kinds) if t == "update_display_data")
    assert last_update < first_output  # collapsed before the command's output
    collapsed = kinds[last_update][1]["data"]["text/html"]
    assert collapsed == "" or collapsed.startswith("<details")


def test_a_notebook_workspace_has_no_network_unless_asked(ip, engine: Engine) -> None:
    """In a notebook (run and create, like sessions and the sandboxed kernel) the default is isolated; the CLI keeps
    the seeds' default."""
    try:
        ip.run_line_magic("microagent", "create nb-net-default --profile tiny")
        ip.run_line_magic("microagent", "create nb-net-user --profile tiny --network user")
        assert engine.status("nb-net-default").config.network_policy.mode == "isolated"
        assert engine.status("nb-net-user").config.network_policy.mode == "user"
    finally:
        for name in ("nb-net-default", "nb-net-user"):
            if name in {i.name for i in engine.list()}:
                engine.delete(name)
