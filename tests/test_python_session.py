"""``%%microagent python``: a persistent IPython kernel in a VM (built-in Python image), through a real IPython
shell and, for the per-notebook session and what reaches a frontend, a real notebook kernel."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from jupyter_client import KernelManager
from jupyter_conftest_helpers import kernel_env
from kernel_helpers import HOSTILE_CELLS, assert_inert

from microagent_engine import Engine
from microagent_jupyter import python_session as PS
from microagent_jupyter.values import ValueRefused

pytestmark = pytest.mark.vm
NAME = "pyt"


@pytest.fixture(scope="module")
def ip(ip: InteractiveShell, python_image: Path) -> Iterator[InteractiveShell]:
    """conftest's shell, with the Python image at hand; the sessions stop after the module."""
    yield ip
    PS.stop_all()


def py(ip: InteractiveShell, code: str, opts: str = "") -> Any:
    with capture_output() as cap:
        ip.run_cell_magic("microagent", f"python --name {NAME} {opts}".strip(), code)
    return cap


def bundles(cap: Any) -> list[dict[str, Any]]:
    return [o.data for o in cap.outputs]


def test_variables_persist_and_last_expression_is_displayed(ip: InteractiveShell) -> None:
    py(ip, "x = 41")
    cap = py(ip, "print('hello'); x + 1")
    assert cap.stdout == "hello\n"
    assert bundles(cap) == [{"text/plain": "42"}]


def test_matplotlib_png_and_dataframe_html(ip: InteractiveShell) -> None:
    cap = py(ip, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert any("image/png" in b for b in bundles(cap)), bundles(cap)
    cap = py(ip, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2], 'b': ['<script>x</script>', 'y']})\ndf")
    html = bundles(cap)[-1]["text/html"]
    assert '<table border="1">' in html and "class=" not in html and "<script" not in html and "<style" not in html


def test_exception_shows_guest_traceback_and_raises(ip: InteractiveShell) -> None:
    with capture_output() as cap, pytest.raises(PS.GuestPythonError) as err:
        ip.run_cell_magic("microagent", f"python --name {NAME}", "def f():\n    return 1 / 0\nf()")
    assert err.value.ename == "ZeroDivisionError"
    tb = re.sub(r"\x1b\[[0-9;]*m", "", cap.stderr)  # the guest's traceback, colored as a local kernel's
    assert "ZeroDivisionError" in tb and "return 1 / 0" in tb and "f()" in tb
    cap = py(ip, "1 / 0", "--no-raise-error")
    assert "ZeroDivisionError" in cap.stderr
    assert bundles(py(ip, "x"))[0]["text/plain"] == "41"  # the session is intact


def test_interrupt_keeps_the_session(ip: InteractiveShell) -> None:
    got_output = threading.Event()

    class Watch:
        def write(self, text: str) -> int:
            if "sleeping" in text:
                got_output.set()
            return len(text)

        def flush(self) -> None:
            pass

    def interrupter() -> None:  # Ctrl-C / the notebook's interrupt, once the guest is inside the sleep
        got_output.wait(300)
        os.kill(os.getpid(), signal.SIGINT)

    old = sys.stdout
    sys.stdout = Watch()  # type: ignore[assignment]
    t = threading.Thread(target=interrupter, daemon=True)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt) as err:
            ip.run_cell_magic("microagent", f"python --name {NAME}",
                              "import time\nslept = False\nprint('sleeping')\ntime.sleep(600)\nslept = True")
    finally:
        sys.stdout = old
    assert got_output.is_set()
    assert isinstance(err.value, PS.SessionInterrupted)
    assert "keeps" in str(err.value)
    t.join()
    assert bundles(py(ip, "(slept, x)"))[0]["text/plain"] == "(False, 41)"  # the sleep never ran to its end


def test_timeout_interrupts_the_cell_and_keeps_the_session(ip: InteractiveShell) -> None:
    with pytest.raises(PS.SessionInterrupted):
        py(ip, "import time\nslept = False\ntime.sleep(600)\nslept = True", "--timeout 2")
    # ordering, not timing: the sleep never finished (the interrupt cut it), and the session kept its variables
    assert bundles(py(ip, "(slept, x + 1)"))[0]["text/plain"] == "(False, 42)"


def test_values_in_and_out(ip: InteractiveShell) -> None:
    import numpy as np
    import pandas as pd

    ip.user_ns.update(d={"a": [1, 2.5, None, True, "s"], "n": {"k": "v"}},
                      arr=np.arange(12, dtype="float32").reshape(3, 4),
                      df=pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}))
    py(ip, "d2 = dict(d, b=2)\narr2 = arr * 2\ndf2 = df.assign(c=df.a * 10)",
       "--in d arr df --out d2 arr2 df2")
    assert ip.user_ns["d2"] == {"a": [1, 2.5, None, True, "s"], "n": {"k": "v"}, "b": 2}
    np.testing.assert_array_equal(ip.user_ns["arr2"], np.arange(12, dtype="float32").reshape(3, 4) * 2)
    assert ip.user_ns["arr2"].dtype == np.float32
    pd.testing.assert_frame_equal(ip.user_ns["df2"], pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"],
                                                                   "c": [10, 20, 30]}), check_dtype=False)
    with pytest.raises(ValueRefused, match="set"):
        py(ip, "s = {1, 2}", "--out s")


def test_guest_that_lies_about_the_format_is_refused(ip: InteractiveShell) -> None:
    """A guest that answers --out with a pickle (declared as such, or dressed up as npy/json) is refused; the
    host never unpickles."""
    py(ip, "import base64, pickle, io, numpy as np, _microagent_values as m\n"
           "class Boom:\n    def __reduce__(self):\n        return (print, ('UNPICKLED ON HOST',))\n"
           "m.encode = lambda name, v: {'name': name, 'format': 'pickle', "
           "'data': base64.b64encode(pickle.dumps(Boom())).decode()}")
    with pytest.raises(ValueRefused, match="pickle"):
        ip.run_line_magic("microagent", f"python --name {NAME} --out x")  # the line form: values only
    py(ip, "def lie(name, v):\n    buf = io.BytesIO()\n    np.save(buf, np.array([Boom()], dtype=object), "
           "allow_pickle=True)\n    return {'name': name, 'format': 'npy', 'data': base64.b64encode(buf.getvalue())"
           ".decode()}\nm.encode = lie")
    with capture_output() as cap, pytest.raises(ValueRefused, match="not valid npy"):
        ip.run_line_magic("microagent", f"python --name {NAME} --out x")
    py(ip, "m.encode = lambda name, v: {'name': name, 'format': 'json', 'data': pickle.dumps(1).hex()}")
    with pytest.raises(ValueRefused, match="not valid json"):
        ip.run_line_magic("microagent", f"python --name {NAME} --out x")  # the line form: values only
    assert "UNPICKLED" not in cap.stdout
    PS.get_session(Engine(os.environ["MICROAGENT_STATE_DIR"]), NAME).restart()  # clean helpers again
    py(ip, "x = 41")


def test_input_and_getpass_in_the_guest_ask_the_frontend(ip: InteractiveShell, monkeypatch) -> None:
    """A guest input()/getpass() reaches the host's own input (the notebook's prompt box in a kernel); its prompt is
    the guest's text, escaped; a frontend that takes no input gives an empty line and a note."""
    import getpass

    prompts: list[tuple[str, str]] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompts.append(("input", prompt)) or "alice")
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": prompts.append(("getpass", prompt)) or "s3cret")
    cap = py(ip, "import getpass\nname = input('who?\\x1b[31m ')\npw = getpass.getpass('pw: ')\n"
                 "print('hello', name, len(pw))")
    assert cap.stdout == "hello alice 6\n"
    assert prompts == [("input", "who?\\x1b[31m "), ("getpass", "pw: ")]  # the escape sequence shown as text

    def no_stdin(prompt: str = "") -> str:
        raise RuntimeError("stdin not implemented")  # what ipykernel raises when the frontend takes no input

    monkeypatch.setattr("builtins.input", no_stdin)
    cap = py(ip, "print(repr(input('again? ')))")
    assert cap.stdout == "''\n" and "takes none" in cap.stderr


def test_session_restart_and_stop(ip: InteractiveShell, engine: Engine) -> None:
    py(ip, "y = 1")
    ip.run_line_magic("microagent", f"session restart {NAME}")
    with pytest.raises(PS.GuestPythonError, match="NameError"):
        py(ip, "y")
    engine.kill(NAME)  # the session's VM goes away under it: the next cell says so before it starts anew
    cap = py(ip, "z = 2")
    assert "variables from earlier cells are gone" in cap.stderr, cap.stderr
    ip.run_line_magic("microagent", f"session stop {NAME}")
    assert engine.status(NAME).running  # a named session's workspace stays; only its kernel stopped
    engine.kill(NAME)
    engine.delete(NAME)


def _kernel_outputs(kc: Any, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    outs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, output_hook=outs.append, timeout=600)
    return reply["content"], outs


def test_notebook_kernel_session_outputs_inert_and_removed_at_shutdown(state_dir: Path, engine: Engine,
                                                                       python_image: Path) -> None:
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=kernel_env(state_dir))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        _kernel_outputs(kc, "%load_ext microagent_jupyter")
        reply, outs = _kernel_outputs(kc, "%%microagent python\nimport os\nos.getpid()")
        assert reply["status"] == "ok", outs
        shown = [m["content"] for m in outs if m["msg_type"] in ("display_data", "execute_result")]
        names = {i.name for i in engine.ps() if i.name.startswith("py-")}
        assert len(names) == 1
        hostile: list[dict[str, Any]] = []
        for cell in HOSTILE_CELLS:
            reply, outs = _kernel_outputs(kc, "%%microagent python\n" + cell)
            assert reply["status"] == "ok", outs
            hostile += [m["content"] for m in outs if m["msg_type"] == "display_data"]
        assert len(hostile) >= 5 and shown
        assert_inert(hostile)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)  # a polite shutdown, as the notebook's "Shut Down Kernel" does
    assert not [i.name for i in engine.list() if i.name in names], "the notebook's session workspace is left"


def test_session_channels_reachable_only_by_their_owner(ip: InteractiveShell, engine) -> None:
    """The guest kernel's channels reach the host as unix sockets in the workspace's private run directory: no
    TCP port of the supervisor listens, and another local user cannot connect (it could subscribe to iopub)."""
    from jupyter_conftest_helpers import connect_as_other_user, tcp_listeners

    from microagent_jupyter.guest_kernel import GUEST_PORTS

    py(ip, "1")
    sess = PS._sessions[PS._key(engine, NAME)]
    info = sess.kernel.host_info
    assert info["transport"] == "ipc"
    supervisor = engine.status(NAME).to_json()["supervisorPid"]
    assert tcp_listeners(supervisor) == []
    for port in GUEST_PORTS.values():
        path = f"{info['ip']}-{port}"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600" and oct(os.stat(os.path.dirname(path)).st_mode
                                                                     & 0o777) == "0o700"
        assert connect_as_other_user(path) == "PermissionError", path
    assert bundles(py(ip, "21 * 2"))[0]["text/plain"] == "42"  # the owner's session still works


def test_a_new_session_starts_in_a_read_only_copy_of_the_notebook_directory(engine: Engine, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """The magic's session gets the notebook's directory (the host kernel's working directory) copied in, read-only,
    and starts there: read_csv("data.csv") beside the notebook works; symlinks and checkpoints stay out."""
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("nested\n")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "old.ipynb").write_text("{}")
    (tmp_path / "secret-link").symlink_to("/etc/shadow")
    monkeypatch.chdir(tmp_path)
    sess = PS.get_session(engine, "nb-files", writable="results")  # ... but for one writable folder
    try:
        with capture_output() as cap:
            sess.run_cell("import os, pandas as pd\nprint(os.getcwd(), pd.read_csv('data.csv').b[0], "
                          "open('sub/x.txt').read().strip(), sorted(os.listdir('.')))\n"
                          "try:\n    open('new.txt', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)")
        assert cap.stdout == "/notebook 2 nested ['data.csv', 'results', 'sub']\nread-only 30\n", cap.stdout
        sess.run_cell("pd.DataFrame({'n': [3]}).to_csv('results/summary.csv', index=False)")
        assert "1 file(s) back" in sess.sync()  # %microagent session sync
        assert (tmp_path / "results" / "summary.csv").read_text() == "n\n3\n"
        sess.restart()  # (the folder was copied in while the first kernel started; a restart starts in it)
        with capture_output() as cap:
            sess.run_cell("import os\nprint(os.getcwd())")
        assert cap.stdout == "/notebook\n", cap.stdout
        sess.run_cell("open('results/late.txt', 'w').write('at stop')")
        sess.stop()  # brings the folder back once more
        assert (tmp_path / "results" / "late.txt").read_text() == "at stop"
    finally:
        sess.stop()
        if engine.status("nb-files").running:
            engine.kill("nb-files")
        engine.delete("nb-files")
