"""``%%microagent python``: cells in a persistent IPython kernel inside a microVM, with outputs as a local kernel's.

A session is a workspace (``--name NAME``, else one per notebook kernel, removed when that kernel exits) running a
:class:`~.guest_kernel.GuestKernel`, driven from the host with jupyter_client's ``BlockingKernelClient``. Every
message from the guest passes the :class:`~.output_policy.OutputPolicy` before it is shown: streams are written to
the cell's stdout/stderr as they arrive, display_data/execute_result become rich displays, an error prints the
guest's traceback and raises :class:`GuestPythonError` (unless ``--no-raise-error``). Ctrl-C / the notebook's
interrupt interrupts the guest kernel (its own interrupt_request) and keeps the session. ``--in``/``--out`` move
values with :mod:`.values` (never pickle).
"""

from __future__ import annotations

import atexit
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, MicroagentError, NotFound
from microagent_engine.textsafe import safe_text
from microagent_engine.spec_args import add_workspace_arguments, flags_spec
from microagent_engine.workspace_spec import WorkspaceSpec
from microagent_engine.states import allows, require

from . import values as V
from .egress_note import RefusalWatch
from .notebook_files import GUEST_NOTEBOOK_DIR, Background, copy_into
from .notebook_sync import check_folder, sync_back
from .guest_kernel import GuestKernel, bounded_client
from .idle_sleep import IdleSleeper
from .magic_errors import MicroagentInterrupted
from .output_policy import OutputPolicy
from .session_owner import remove_workspace, sweep
from .kernel_pool import default_size as pool_size
from .warm_python import find_warm, split_env, start_session_workspace, warm_enabled

INTERRUPT_GRACE = 8.0  # seconds to wait for the guest's reply after SIGINT
#: new session workspaces start from the warm Python snapshot (:mod:`.warm_python`); MICROAGENT_WARM_PYTHON=0: cold
WARM_ENABLED = warm_enabled()


class GuestPythonError(MicroagentError):
    """The cell raised in the guest; ``ename``/``evalue``/``traceback`` are the guest's."""

    def __init__(self, ename: str, evalue: str, traceback: list[str], session: str):
        super().__init__(f"{ename}: {evalue} (raised in the sandboxed session {session!r})")
        self.ename, self.evalue, self.traceback, self.session = ename, evalue, traceback, session


class SessionInterrupted(MicroagentInterrupted):
    """The cell was interrupted in the guest kernel; the session keeps its variables."""


class PythonSession:
    """A workspace with a guest kernel and the host client that talks to it."""

    def __init__(self, engine: Engine, name: str, owned: bool) -> None:
        self.engine, self.name, self.owned = engine, name, owned
        self.kernel = GuestKernel(engine, name)
        self.client: Any = None
        self.policy = OutputPolicy()
        self.lock = threading.Lock()
        self.warm_from: str | None = None  # the warm snapshot this session's workspace resumed
        self.cold_reason = ""  # why it booted cold instead
        self.writable: tuple[str, Path] | None = None  # (folder, the host directory its files come back to)
        self.sleeper: IdleSleeper | None = None  # puts the workspace to sleep when no cell ran for a while

    # ---- start / stop ----------------------------------------------------------------------------
    def start(self, moved_in: Callable[[], str] | None = None) -> None:
        """Launch the guest kernel, connect a client, install the value helpers; returns when it answers. With
        ``moved_in``, the kernel starts where the workspace left it and, once it answers, moves into the directory
        ``moved_in()`` returns (called then: the notebook's folder is copied in meanwhile), where a restart starts
        it too."""
        self.kernel.launch()
        # connected at once: a clone's first kernel was bound in the snapshot, so the connections are made while
        # it takes this session's key (a forked or cold kernel binds later; ZMQ then retries every 0.1 s)
        client = bounded_client(self.kernel.host_info)
        client.start_channels()
        self.client = client
        self.kernel.wait_bound()
        self.sleeper = IdleSleeper(self.engine, self.name)
        try:
            self.kernel.wait_ready(client)
            cwd = moved_in() if moved_in is not None else None
            if cwd is not None:
                self.kernel.cwd = cwd  # where a restart starts it
            self._run_hidden(V.GUEST_CODE + (f"\n__import__('os').chdir({cwd!r})" if cwd else ""))
        except BaseException:
            self.close_client()
            raise

    def close_client(self) -> None:
        if self.sleeper is not None:
            self.sleeper.close()
            self.sleeper = None
        if self.client is not None:
            try:
                self.client.stop_channels()
                self.client.context.destroy(linger=0)
            except Exception:  # noqa: BLE001 (closing anyway)
                pass
            self.client = None

    def restart(self) -> None:
        """A fresh kernel in the same workspace (variables are lost)."""
        self.close_client()
        self.kernel.stop()
        self.start()

    def sync(self) -> str:
        """Bring the writable folder back into the notebook's directory now; a line saying what came back."""
        if self.writable is None:
            raise InvalidArgument(f"the Python session in {self.name} has no writable folder: start it with "
                                  f"%%microagent python --writable FOLDER")
        folder, dest = self.writable
        return sync_back(self.engine, self.name, folder, dest).line(dest)

    def stop(self, fast: bool = False) -> None:
        """Stop the kernel (its writable folder comes back first); an owned (per-notebook) session's workspace is
        killed and deleted. ``fast`` (at interpreter exit, where a kernel manager allows a few seconds) kills an
        owned workspace outright."""
        if self.writable is not None and not fast and self.kernel.alive:
            try:
                sys.stderr.write(f"microagent: {self.sync()}\n")
            except (MicroagentError, OSError) as exc:
                sys.stderr.write(f"microagent: the writable folder of {self.name} did not come back: {exc}\n")
        self.close_client()
        if fast and self.owned:
            _remove_workspace(self.engine, self.name)
            return
        try:
            self.kernel.stop()
        except MicroagentError:
            pass
        self.kernel.unpublish()
        if self.owned:
            _remove_workspace(self.engine, self.name)

    # ---- running code ----------------------------------------------------------------------------
    def _run_hidden(self, code: str) -> list[dict[str, Any]]:
        """Run code silently (no history, no display): returns the iopub messages it caused; raises on error."""
        msgs: list[dict[str, Any]] = []
        reply = self._execute(code, msgs.append, store_history=False)
        if reply.get("status") != "ok":
            raise GuestPythonError(str(reply.get("ename")), str(reply.get("evalue")), [], self.name)
        return msgs

    def _execute(self, code: str, on_msg: Any, **kwargs: Any) -> dict[str, Any]:
        """Run one request in the kernel (see :meth:`_request`); the idle timer (:mod:`.idle_sleep`) waits."""
        sleeper = self.sleeper
        if sleeper is not None:
            sleeper.busy()
        try:
            return self._request(code, on_msg, **kwargs)
        finally:
            if sleeper is not None:
                sleeper.idle()

    def _request(self, code: str, on_msg: Any, *, store_history: bool = True, timeout: float | None = None,
                 ask: Any = None) -> dict[str, Any]:
        if not self.kernel.alive:
            raise self.kernel.died_error()
        client = self.client
        # stop_on_error=False: each cell is the user's own request; with True, ipykernel aborts (does not run) the
        # requests that reach it just after an error, e.g. the next cell right after an interrupted one
        msg_id = client.execute(code, store_history=store_history, allow_stdin=ask is not None, stop_on_error=False)
        interrupted_at: float | None = None
        reply: dict[str, Any] | None = None
        idle = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while reply is None or not idle:
            try:
                try:
                    msg = client.get_iopub_msg(timeout=0.1)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                            idle = True
                        else:
                            on_msg(msg)
                except queue.Empty:
                    pass
                if ask is not None:
                    try:
                        request = client.get_stdin_msg(timeout=0)
                        if request["msg_type"] == "input_request" and \
                                request["parent_header"].get("msg_id") == msg_id:
                            content = request["content"]
                            client.input(ask(safe_text(str(content.get("prompt", "")), MAX_PROMPT),
                                             bool(content.get("password"))))
                    except queue.Empty:
                        pass
                if reply is None:
                    try:
                        shell = client.get_shell_msg(timeout=0)
                        if shell["parent_header"].get("msg_id") == msg_id:
                            reply = shell["content"]
                    except queue.Empty:
                        pass
                if not self.kernel.alive:
                    raise self.kernel.died_error()
                if interrupted_at is not None and time.monotonic() - interrupted_at > INTERRUPT_GRACE:
                    raise SessionInterrupted(f"interrupted; the sandboxed session {self.name!r} did not answer "
                                             f"yet (it may still be busy)")
                if deadline is not None and time.monotonic() > deadline and interrupted_at is None:
                    self._interrupt()
                    interrupted_at = time.monotonic()
            except KeyboardInterrupt:
                if interrupted_at is not None:
                    raise SessionInterrupted(f"interrupted; session {self.name!r} keeps running") from None
                self._interrupt()
                interrupted_at = time.monotonic()
        if interrupted_at is not None and reply.get("status") == "error" and \
                reply.get("ename") == "KeyboardInterrupt":
            raise SessionInterrupted(f"the cell was interrupted in the guest; session {self.name!r} keeps its "
                                     f"variables")
        return reply

    def _interrupt(self) -> None:
        """The kernel's own interrupt: an ``interrupt_request`` on its control channel (it signals its process
        group, as a local kernel's interrupt does, and no process is started in the guest); SIGINT through the
        agent when that cannot be sent."""
        try:
            self.client.control_channel.send(self.client.session.msg("interrupt_request", {}))
        except Exception:  # noqa: BLE001 (the channel is gone: signal instead)
            self.kernel.interrupt()

    def run_cell(self, code: str, *, raise_error: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Run ``code`` as a cell: outputs are shown (after the output policy) as they arrive."""
        from IPython.display import clear_output, display

        self.policy.new_cell()
        error: dict[str, Any] = {}

        def show(msg: dict[str, Any]) -> None:
            kind = msg["msg_type"]
            content = self.policy.filter_content(kind, msg["content"])
            if content is None:
                return
            if kind == "stream":
                out = sys.stdout if content["name"] == "stdout" else sys.stderr
                out.write(content["text"])
                out.flush()
            elif kind in ("display_data", "execute_result", "update_display_data"):
                display_id = content.get("transient", {}).get("display_id")
                kwargs: dict[str, Any] = {"raw": True, "metadata": content["metadata"] or None}
                if display_id:
                    kwargs.update(display_id=f"microagent-{self.name}-{display_id}",
                                  update=kind == "update_display_data")
                if content["data"]:
                    display(content["data"], **kwargs)
            elif kind == "error":
                error.update(content)
                sys.stderr.write("\n".join(content["traceback"]) + "\n")
                sys.stderr.flush()
            elif kind == "clear_output":
                clear_output(wait=content["wait"])

        watch = RefusalWatch(self.engine, self.name)
        with self.lock:
            reply = self._execute(code, show, timeout=timeout, ask=ask_user)
        watch.report()  # what the sandbox refused during the cell, and how to allow it
        if reply.get("status") == "aborted":
            raise MicroagentError(f"the sandboxed session {self.name!r} did not run this cell (the kernel aborted "
                                  f"it); run the cell again")
        if reply.get("status") == "error" and not error:
            # the guest's iopub error can trail its idle status (ipykernel publishes it from another path):
            # the execute_reply carries the same traceback, so show that one
            show({"msg_type": "error", "content": reply})
        if reply.get("status") == "error" and raise_error:
            raise GuestPythonError(str(error.get("ename", reply.get("ename"))),
                                   str(error.get("evalue", reply.get("evalue"))),
                                   list(error.get("traceback", [])), self.name)
        return reply

    def put(self, name: str, value: Any) -> None:
        """Bind ``name`` in the guest session to a host value (sent in a safe format)."""
        with self.lock:
            self._run_hidden(V.put_code(name, value))

    def get(self, name: str) -> Any:
        """A guest variable's value on the host, decoded without pickle/eval (:func:`values.decode`)."""
        with self.lock:
            msgs = self._run_hidden(V.get_code(name))
        for msg in msgs:
            if msg["msg_type"] == "display_data":
                data = msg["content"].get("data") or {}
                if V.VALUE_MIME in data:
                    return V.decode(data[V.VALUE_MIME])
                raise V.ValueRefused(f"the guest answered --out {name} with {sorted(data)[:5]} instead of a "
                                     f"value transfer; refused")
        raise V.ValueRefused(f"the guest sent nothing for --out {name}")


#: the longest prompt a guest's input() may show (its text is the guest's: escaped and cut)
MAX_PROMPT = 1000


def ask_user(prompt: str, password: bool) -> str:
    """Answer a guest ``input()``/``getpass()`` the way a local kernel would: the frontend's prompt box when it
    takes input (ipykernel's own ``input``/``getpass``), else an empty answer and a note."""
    import getpass

    try:
        return getpass.getpass(prompt) if password else input(prompt)
    except (EOFError, OSError, RuntimeError) as exc:  # StdinNotImplementedError is a RuntimeError
        sys.stderr.write(f"microagent: the guest asked for input ({prompt!r}) but this frontend takes none "
                         f"({type(exc).__name__}); it got an empty line\n")
        return ""


# ---- registry of this process's sessions --------------------------------------------------------
_sessions: dict[tuple[str, str], PythonSession] = {}
_default_names: dict[str, str] = {}
_atexit_installed: list[bool] = []


def _key(engine: Engine, name: str) -> tuple[str, str]:
    return (str(engine.state_dir), name)


def default_session_name(engine: Engine) -> str:
    """The per-notebook-kernel session's workspace name (one per host process and state dir)."""
    sd = str(engine.state_dir)
    if sd not in _default_names:
        _default_names[sd] = f"py-{os.getpid()}-{secrets.token_hex(3)}"
    return _default_names[sd]


_remove_workspace = remove_workspace


def stop_all() -> None:
    """Stop every session of this process (per-notebook ones are deleted). Runs at interpreter exit."""
    for key in list(_sessions):
        sess = _sessions.pop(key)
        try:
            sess.stop(fast=True)
        except Exception:  # noqa: BLE001 (exiting: best effort, next one)
            pass


def get_session(engine: Engine, name: str | None, spec: WorkspaceSpec | None = None,
                env: dict[str, str] | None = None, progress: Any = None, writable: str | None = None
                ) -> PythonSession:
    """The running session ``name`` (default: this kernel's own), created/booted/started as needed: a new workspace
    is ``spec`` over the sessions' defaults, with ``env`` in its guest; ``writable``: a folder of the notebook's
    directory the new session may write (:mod:`.notebook_sync`)."""
    owned = name is None
    name = name or default_session_name(engine)
    if writable is not None:
        check_folder(writable)
    if owned:
        _take_prewarmed(engine, name, (spec or WorkspaceSpec(), env or {}, writable))
    sess = _sessions.get(_key(engine, name))
    if sess is not None and sess.kernel.alive and sess.client is not None:
        if writable is not None and (sess.writable is None or sess.writable[0] != writable):
            raise UsageError(f"--writable applies when a session starts; the session in {name} is running without "
                             f"it: %microagent session stop first (its variables are lost)")
        return sess
    if sess is not None:  # its kernel (or its VM) is gone: say so, then start a new one
        sess.close_client()
        _sessions.pop(_key(engine, name), None)
        sys.stderr.write(f"microagent: the Python session in {name} had stopped (its kernel or VM is gone), so this "
                         f"cell runs in a new session: variables from earlier cells are gone\n")
        sys.stderr.flush()
    sweep(engine)  # sessions of notebook kernels that were killed hard
    created = False
    warm_from: str | None = None
    cold_reason = "the workspace existed"
    try:
        try:
            state = engine.status(name).state.state
        except NotFound:
            created = True
            warm_from, cold_reason = start_session_workspace(
                engine, name, spec or WorkspaceSpec(), env, owned=owned,
                progress=progress, warm=WARM_ENABLED)
            state = "running"
        if allows("start", state):
            if progress:
                progress(f"Booting {name}")
            engine.start(name)
        else:
            require("exec", state, name)
        copying = None
        if created and Path.cwd() != Path("/"):  # the notebook's directory, read-only, where the kernel works
            if progress:
                progress(f"Copying {Path.cwd()} into {name} while its Python kernel starts")
            # one guest exec beside the kernel's launch
            copying = Background(copy_into, engine, name, Path.cwd(), writable=writable)

        def moved_in() -> str:
            line = copying.result()
            if progress:
                progress(line)
            return GUEST_NOTEBOOK_DIR
        sess = PythonSession(engine, name, owned)
        if writable is not None and copying is not None:
            sess.writable = (writable, Path.cwd() / writable)
        sess.warm_from, sess.cold_reason = warm_from, cold_reason if warm_from is None else ""
        sess.start(moved_in if copying is not None else None)
    except BaseException:
        if created or owned:
            _remove_workspace(engine, name)
        raise
    _sessions[_key(engine, name)] = sess
    if not _atexit_installed:
        atexit.register(stop_all)
        _atexit_installed.append(True)
    return sess


# ---- the default session, prepared when the extension loads ----------------------------------------
_prewarm_lock = threading.Lock()
#: (state dir, session name) -> the thread preparing it, what it was asked for, and set once a cell wants it
_prewarming: dict[tuple[str, str], tuple[threading.Thread, tuple[WorkspaceSpec, dict[str, str], None],
                                         threading.Event]] = {}


def prewarm(state_dir: str | None = None) -> threading.Thread | None:
    """Prepare this notebook kernel's default session in a background thread, so that the first
    ``%%microagent python`` takes one already resumed from the warm snapshot, with the notebook's files and its
    kernel answering. Only when that snapshot is already built (``microagent prepare python`` or an earlier session:
    loading the extension never builds one) and the warm pool is on (``MICROAGENT_KERNEL_POOL``, default 1).
    A first cell asking for something else (options, ``--writable``) gets a new session, this one removed."""
    if pool_size() == 0 or not WARM_ENABLED:
        return None
    engine = Engine(state_dir)  # its own: the magic's engine shows its progress in the cell
    flags = flags_spec(python_args.parser.parse_args([]))
    request = (*split_env(flags), None)
    try:
        if find_warm(engine, request[0]) is None:
            return None
    except MicroagentError:
        return None
    key = _key(engine, default_session_name(engine))
    with _prewarm_lock:
        if key in _sessions or key in _prewarming:
            return None
        wanted = threading.Event()
        thread = threading.Thread(target=_prewarm_run, args=(engine, request, wanted),
                                  name="microagent-session-prewarm", daemon=True)
        _prewarming[key] = (thread, request, wanted)
    thread.start()
    return thread


def _prewarm_run(engine: Engine, request: tuple[WorkspaceSpec, dict[str, str], None],
                 wanted: threading.Event) -> None:
    try:
        get_session(engine, None, request[0], request[1]).kernel.warm_up(stop=wanted.is_set)
    except BaseException:  # noqa: BLE001 (the first cell starts a session itself and reports what fails)
        pass


def _take_prewarmed(engine: Engine, name: str, request: tuple[WorkspaceSpec, dict[str, str], str | None]) -> None:
    """Before the default session is used: wait for its preparation (when under way); keep what it made when
    ``request`` matches, else remove it (the caller then starts the session asked for)."""
    key = _key(engine, name)
    with _prewarm_lock:
        entry = _prewarming.get(key)
        if entry is None or entry[0] is threading.current_thread():
            return
        del _prewarming[key]
    thread, asked, wanted = entry
    wanted.set()  # the warm-up cells still to run are skipped: this cell is waiting
    thread.join()
    if request != asked and key in _sessions:
        sess = _sessions.pop(key)
        sess.stop()
        _remove_workspace(engine, name)


# ---- the magics -----------------------------------------------------------------------------------
@magic_arguments()
@argument("--name", help="run in this persistent workspace's session (created with the Python image if missing, "
                         "left running); default: this notebook kernel's own session, removed when it exits")
@argument("--in", dest="inputs", nargs="+", default=[], metavar="NAME",
          help="send these host variables into the session first (plain data, numpy arrays, DataFrames)")
@argument("--out", dest="outputs", nargs="+", default=[], metavar="NAME",
          help="bring these session variables back into the notebook afterwards (never pickled)")
@argument("--writable", metavar="FOLDER", help="a folder of the notebook's directory the new session may write "
                                               "(/notebook/FOLDER); its files come back with %%microagent session "
                                               "sync and when the session stops")
@argument("--timeout", type=float, metavar="SECONDS", help="interrupt the cell after this")
@argument("--no-raise-error", action="store_true", help="show the guest's traceback without raising")
def python_args(line: str) -> None:
    """%%microagent python [options]

    Run the cell in a persistent IPython kernel inside a microVM. Variables persist across cells; stdout/stderr
    stream live; display() and the last expression show as rich output (after the host's output policy: HTML,
    SVG and Markdown sanitized, JavaScript dropped). An exception shows the guest's traceback and raises
    GuestPythonError. Interrupt stops the running cell and keeps the session.
    """


add_workspace_arguments(python_args.parser, only=("image", "resources", "env", "network", "storage"),
                        network_default="isolated")


@magic_arguments()
@argument("action", choices=["restart", "stop", "sync", "list"])
@argument("name", nargs="?", help="session workspace (default: this notebook kernel's own session)")
def session_args(line: str) -> None:
    """%microagent session restart|stop|sync [NAME] | list"""


def python_magic(shell: Any, engine: Engine, argv: list[str], cell: str | None, progress: Any = None) -> None:
    """``%%microagent python``: see :func:`python_args`."""
    args = python_args.parser.parse_args(argv)
    if cell is None or not cell.strip():
        if not args.inputs and not args.outputs:
            raise UsageError("%%microagent python runs the cell's code: put it below the magic line")
    V.check_names(args.inputs + args.outputs)
    missing = [n for n in args.inputs if n not in shell.user_ns]
    if missing:
        raise UsageError(f"--in names host variables that do not exist: {', '.join(missing)}")
    for n in args.inputs:  # refuse before any VM boots
        V.encode(shell.user_ns[n])
    spec = flags_spec(args)  # a new session workspace: these flags over the sessions' defaults
    if progress is not None:
        engine.progress = progress  # image build, boot: shown in the cell as `run` shows them
    try:
        sess = get_session(engine, args.name, *split_env(spec), progress, writable=args.writable)
    finally:
        if progress is not None:
            progress.done()
    for n in args.inputs:
        sess.put(n, shell.user_ns[n])
    if cell is not None and cell.strip():
        sess.run_cell(cell, raise_error=not args.no_raise_error, timeout=args.timeout)
    for n in args.outputs:
        shell.user_ns[n] = sess.get(n)


def session_magic(engine: Engine, argv: list[str]) -> str:
    """``%microagent session restart|stop [NAME] | list``."""
    args = session_args.parser.parse_args(argv)
    if args.action == "list":
        swept = sweep(engine)
        names = [n for (sd, n), s in _sessions.items() if sd == str(engine.state_dir)]
        text = "\n".join(names) if names else "(no Python sessions in this kernel)"
        if swept:
            text += f"\n(removed {len(swept)} session(s) whose notebook kernel is gone: {', '.join(swept)})"
        return text
    name = args.name or _default_names.get(str(engine.state_dir))
    sess = _sessions.get(_key(engine, name)) if name else None
    if sess is None:
        raise NotFound(f"no Python session {name or '(default)'} in this notebook kernel; "
                       f"%microagent session list shows them")
    if args.action == "sync":
        return sess.sync()
    if args.action == "restart":
        sess.restart()
        return f"Restarted the Python session in {name} (its variables are gone)"
    _sessions.pop(_key(engine, name), None)
    sess.stop()
    if sess.owned:
        return f"Stopped the Python session {name} and removed its workspace"
    return f"Stopped the Python session in {name}; the workspace still runs (%microagent halt {name} stops it)"


__all__ = ["GuestPythonError", "PythonSession", "SessionInterrupted", "get_session", "python_magic",
           "session_magic", "stop_all"]
