"""An ipykernel running inside a workspace, reached from the host through published ports.

The host makes the HMAC key and the connection file, and starts the kernel with one exec that writes that file
from its stdin (``Engine.cp`` needs a stopped workspace) and then runs ``python3 -m ipykernel_launcher`` (or asks a
warm snapshot's zygote for a forked kernel, which says when its sockets are bound); a host thread holds the exec
for the kernel's life (so "is the kernel alive" costs nothing and its exit code is known), and
publishes the kernel's five ZMQ ports with :meth:`Engine.publish` (carried by the guest agent, so the workspace
can be ``--network isolated``). Used by ``%%microagent python`` (:mod:`.python_session`) and by the sandboxed
kernel's provisioner (:mod:`.provisioner`).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from microagent_engine import Engine, ExecResult
from microagent_engine.engine.warm_python import KERNEL_DIR, KERNEL_PORTS, connection_info, kernel_launcher
from microagent_engine.errors import GuestError, MicroagentError

GUEST_PORTS = KERNEL_PORTS  # fixed ports on the guest's own loopback (see warm_python.KERNEL_PORTS)
GUEST_DIR = KERNEL_DIR
CONNECTION_FILE = f"{GUEST_DIR}/kernel.json"
PID_FILE = f"{GUEST_DIR}/kernel.pid"
#: the start of the kernel's exec: its stdin is the connection file (private, in a subshell: the umask stays)
#: (shell builtins only when the directory exists, as in a warm clone: every exec costs under TCG; the file is
#: one JSON line without a newline, which ``read`` stores before it reports the end of input)
WRITE_CONNECTION_FILE = (f"(umask 077; [ -d {GUEST_DIR} ] || mkdir -p {GUEST_DIR} || exit 1; "
                         f"IFS= read -r c; [ -n \"$c\" ] && printf '%s\\n' \"$c\" > {CONNECTION_FILE}) || exit 1\n")
#: the held exec's script when the workspace has a live zygote (a clone of the engine's warm Python snapshot):
#: ask it for a kernel; without one the kernel is started cold, as ``python3 -m ipykernel_launcher``
ZYGOTE_LAUNCHER = kernel_launcher(CONNECTION_FILE)
READY_TIMEOUT = 300.0  # cold ipykernel + numpy/pandas imports under TCG take tens of seconds
LOG_LINES = 200
#: run silently in a kernel prepared ahead (the warm pool's, a notebook's prewarmed session) before anyone uses it:
#: under TCG code runs fast only once QEMU has translated it, which is per VM, so a notebook's first cells, plot and
#: traceback would otherwise pay for that translation while the user waits
WARM_UP_CELLS = (
    "import matplotlib.pyplot as _p\n_p.plot([1, 3, 2]); _p.show(); _p.close('all'); del _p",
    "get_ipython().display_formatter.format(2)",
    "import sys as _s\ntry:\n    raise KeyboardInterrupt\nexcept KeyboardInterrupt:\n"
    "    get_ipython().InteractiveTB.structured_traceback(*_s.exc_info())\ndel _s",
    *["1+1"] * 3,
)


class KernelDied(GuestError):
    """The guest kernel process ended (crash, OOM, killed)."""


def bounded_client(info: dict[str, Any]) -> Any:
    """A blocking Jupyter client on the guest kernel's ``info`` whose sockets hold a bounded number of bytes
    (:func:`.relay.bounded_context`): a guest that floods iopub between cells cannot grow this process."""
    from jupyter_client.blocking.client import BlockingKernelClient

    from .relay import bounded_context

    client = BlockingKernelClient(context=bounded_context())
    client.load_connection_info(info)
    return client


def _raw_session(info: dict[str, Any]) -> Any:
    """A jupyter_client Session signing with ``info``'s key (plain ZMQ use: no event loop, any thread)."""
    from jupyter_client.session import Session

    return Session(key=str(info["key"]).encode(), signature_scheme="hmac-sha256", username="microagent")


def _receive(session: Any, sock: Any) -> dict[str, Any] | None:
    """The next message on ``sock``, verified and parsed (None: not a valid signed message, which is ignored)."""
    try:
        _idents, parts = session.feed_identities(sock.recv_multipart())
        return session.deserialize(parts)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 (the guest sends what it likes)
        return None


class GuestKernel:
    """One ipykernel process in a running workspace and the published host ports that reach it.

    ``host_info`` is the connection info a host-side client uses: ``ipc`` endpoints, unix sockets in the
    workspace's private run directory that only this user can open (:meth:`Engine.publish_socket`), and the
    host-made key."""

    def __init__(self, engine: Engine, workspace: str, *, python: str = "python3",
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.engine, self.workspace, self.python, self.env = engine, workspace, python, dict(env or {})
        self.cwd = cwd  # the kernel's working directory in the guest (a warm kernel takes its launcher's)
        self.key = secrets.token_hex(32)
        self.host_base: str | None = None  # the published sockets are HOST_BASE-GUEST_PORT
        self.pid: int | None = None
        self.result: ExecResult | None = None
        self.error: BaseException | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self._thread: threading.Thread | None = None
        self._pid_seen = threading.Event()
        self._ready_seen = threading.Event()  # a warm (forked) kernel said its sockets are bound
        #: guest steps of the last launch (``forked``, ``setup``, ``initialized``, ``ready``): name -> (guest
        #: wall-clock time, host wall-clock time the line arrived); plus host ``launch``/``launched`` times
        self.steps: dict[str, tuple[float, float]] = {}

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def host_info(self) -> dict[str, Any]:
        return connection_info(self.key, GUEST_PORTS, self.host_base or "", "ipc")

    def launch(self) -> None:
        """Write the connection file, start the kernel process, publish its ports (once per workspace start).
        Returns at once; :meth:`wait_ready` (or a client's kernel_info) tells when it answers."""
        self.steps = {"launch": (0.0, time.time())}
        self._ready_seen.clear()
        self._pid_seen.clear()
        self.result = self.error = None
        guest_info = connection_info(self.key, GUEST_PORTS)
        self._thread = threading.Thread(target=self._run, args=(json.dumps(guest_info).encode(),),
                                        name=f"guest-kernel-{self.workspace}", daemon=True)
        self._thread.start()
        if self.host_base is None:
            bases = {self.engine.publish_socket(self.workspace, port)[:-len(f"-{port}")]
                     for port in GUEST_PORTS.values()}
            assert len(bases) == 1, bases  # the supervisor names them <run dir>/ports/p-GUEST_PORT
            self.host_base = bases.pop()
        self.steps["launched"] = (0.0, time.time())

    def _run(self, connection: bytes) -> None:
        # one exec does it all: the connection file comes on its stdin, then the kernel starts (warm or cold)
        script = (WRITE_CONNECTION_FILE + ZYGOTE_LAUNCHER + f"echo $$ > {PID_FILE}; echo microagent-kernel-pid $$ >&2; "
                  f"exec {self.python} -m ipykernel_launcher -f {CONNECTION_FILE}")
        # MPLBACKEND stays unset: ipykernel then installs its inline backend (figures as image/png display_data)
        env = {"PYTHONUNBUFFERED": "1", **self.env}
        if os.environ.get("MICROAGENT_KERNEL_TRACE"):  # the warm kernel lists the modules its start-up imported
            env["MICROAGENT_KERNEL_TRACE"] = "1"
        try:
            self.result = self.engine.exec(self.workspace, ["/bin/sh", "-c", script], env=env, stdin=connection,
                                           on_stdout=self._log, on_stderr=self._log, capture=False, cwd=self.cwd)
        except BaseException as exc:  # noqa: BLE001 (reported by alive()/wait_ready)
            self.error = exc
        finally:
            self._pid_seen.set()

    def _log(self, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("microagent-kernel-pid "):
                try:
                    self.pid = int(line.split()[1])
                except ValueError:
                    pass
                self._pid_seen.set()
                continue
            if line.startswith("microagent-kernel-step "):
                parts = line.split()
                try:
                    self.steps[parts[1]] = (float(parts[2]), time.time())
                except (IndexError, ValueError):
                    pass
                if parts[1:2] == ["ready"]:
                    self._ready_seen.set()
                continue
            self.log.append(line)

    @property
    def alive(self) -> bool:
        """True while the guest kernel process runs (its exec has not returned)."""
        return self._thread is not None and self._thread.is_alive()

    def exit_code(self) -> int | None:
        """The kernel process's exit code once it ended (None while it runs)."""
        if self.alive:
            return None
        return self.result.exit_code if self.result is not None else 1

    def died_error(self) -> KernelDied:
        """Why the kernel is gone, with the tail of its log."""
        what = (f"exited with code {self.result.exit_code}" if self.result is not None
                else f"could not run ({self.error})" if self.error else "is not running")
        tail = "\n".join(list(self.log)[-15:])
        return KernelDied(f"the Python kernel in workspace {self.workspace!r} {what}"
                          + (f"; its last output:\n{tail}" if tail else "")
                          + "\nRestart it with %microagent session restart " + self.workspace)

    def wait_bound(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the kernel process announced itself and, for a warm (forked) kernel, bound its sockets: a client
        connected after that gets through at once (one connected earlier waits out ZMQ's reconnect interval).
        Returns early when the process ends (:meth:`wait_ready` then reports it)."""
        deadline = time.monotonic() + timeout
        self._pid_seen.wait(timeout)
        if "forked" not in self.steps:
            return  # a cold kernel does not say when it is bound: wait_ready polls it
        while not self._ready_seen.wait(0.05):
            if not self.alive or time.monotonic() > deadline:
                return

    def wait_ready(self, client: Any, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Send kernel_info_request until the kernel answers (returns the reply content); raises
        :class:`KernelDied` when the process ends first, :class:`GuestError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        sent: set[str] = set()
        while time.monotonic() < deadline:
            if not self.alive:
                raise self.died_error()
            ready = self._ready_seen.is_set()
            sent.add(client.kernel_info())
            # a warm kernel says when its sockets are bound: ask again soon after that; a cold one is polled
            end = time.monotonic() + (0.5 if ready else 2.0)
            while time.monotonic() < end:
                if not ready and self._ready_seen.is_set():
                    break  # it just bound its sockets: ask now (an earlier request may have hit a closed port)
                try:
                    reply = client.get_shell_msg(timeout=0.05)
                except queue.Empty:  # no answer yet
                    continue
                if reply["parent_header"].get("msg_id") in sent:
                    # the kernel answers; wait until iopub delivers too (its SUB connects asynchronously)
                    self.steps["shell"] = (0.0, time.time())
                    self._wait_iopub(client, deadline)
                    self.steps["iopub"] = (0.0, time.time())
                    return reply["content"]
        raise GuestError(f"the Python kernel in workspace {self.workspace!r} did not answer within {timeout:.0f} s")

    @staticmethod
    def _wait_iopub(client: Any, deadline: float) -> None:
        while time.monotonic() < deadline:
            client.kernel_info()
            try:
                while True:
                    msg = client.get_iopub_msg(timeout=0.1)
                    if msg["msg_type"] == "status":
                        return
            except queue.Empty:
                continue

    def wait_ready_raw(self, info: dict[str, Any], timeout: float = READY_TIMEOUT) -> None:
        """Like :meth:`wait_ready`, with plain ZMQ sockets on ``info`` (usable from any thread: no event loop);
        returns once a kernel_info reply came back on shell and a status message on iopub."""
        import zmq

        from .relay import RELAY_SESSION, bounded_context, endpoint

        self.wait_bound(timeout)  # a warm kernel: connect once its sockets are bound (no reconnect backoff)
        session = _raw_session(info)
        ctx = bounded_context()
        shell, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.SUB)
        for sock in (shell, sub):
            sock.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        shell.connect(endpoint(info, "shell"))
        sub.connect(endpoint(info, "iopub"))
        poller = zmq.Poller()
        poller.register(shell, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        shell_ok = iopub_ok = False
        deadline = time.monotonic() + timeout
        try:
            while not (shell_ok and iopub_ok):
                if time.monotonic() > deadline:
                    raise GuestError(f"the Python kernel in workspace {self.workspace!r} did not answer within "
                                     f"{timeout:.0f} s")
                if not self.alive:
                    raise self.died_error()
                msg = session.msg("kernel_info_request", {})
                try:
                    shell.send_multipart(session.serialize(msg), flags=zmq.NOBLOCK)
                except zmq.Again:  # not connected yet
                    pass
                # once a warm kernel is bound, a request lost on a connection made before is soon asked again
                end = time.monotonic() + (1.0 if shell_ok else 0.3 if self._ready_seen.is_set() else 2.0)
                while time.monotonic() < end and not (shell_ok and iopub_ok):
                    for sock, _ in poller.poll(200):
                        got = _receive(session, sock)
                        if got is None:
                            continue
                        if sock is shell and got["msg_type"] == "kernel_info_reply":
                            shell_ok = True
                        elif sock is sub and got["msg_type"] == "status" and \
                                got["header"].get("session") != RELAY_SESSION:  # the guest's, not the relay's
                            iopub_ok = True
        finally:
            shell.close(0)
            sub.close(0)
            ctx.term()

    def run_quietly(self, code: str, timeout: float = 60.0) -> None:
        """Run ``code`` in the kernel before any frontend uses it: silent (no output, history or execution count),
        with plain ZMQ sockets (usable from any thread: no event loop); GuestError when it fails or does not answer
        within ``timeout``."""
        import zmq

        from .relay import bounded_context, endpoint

        info = self.host_info
        session = _raw_session(info)
        ctx = bounded_context()
        shell = ctx.socket(zmq.DEALER)
        shell.linger = 0
        try:
            shell.connect(endpoint(info, "shell"))
            msg = session.msg("execute_request", {"code": code, "silent": True, "store_history": False,
                                                  "user_expressions": {}, "allow_stdin": False,
                                                  "stop_on_error": False})
            shell.send_multipart(session.serialize(msg))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not shell.poll(int(left * 1000)):
                    break
                reply = _receive(session, shell)
                if reply is None:
                    continue
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    if reply["content"].get("status") != "ok":
                        raise GuestError(f"the kernel in {self.workspace} could not run {code!r}")
                    return
            raise GuestError(f"the kernel in {self.workspace} did not answer within {timeout:.0f} s")
        finally:
            shell.close(0)
            ctx.term()

    def move_to(self, cwd: str) -> None:
        """Change the running kernel's working directory to ``cwd`` (quietly, before a frontend uses it); a restart
        starts it there too."""
        self.run_quietly(f"import os; os.chdir({cwd!r})")
        self.cwd = cwd

    def warm_up(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Run :data:`WARM_UP_CELLS` quietly (no output, history or execution count), before ``stop()`` says
        someone wants the kernel now (checked between cells)."""
        for code in WARM_UP_CELLS:
            if stop():
                return
            self.run_quietly(code)

    def interrupt(self) -> None:
        """SIGINT to the guest kernel process (what a local kernel's interrupt does; nothing when the VM is gone:
        a restart then starts the kernel in a new one)."""
        self.signal(2)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the guest kernel process (no-op when it is gone)."""
        if not self.alive:
            return
        target = str(self.pid) if self.pid else f"$(cat {PID_FILE})"
        try:
            self.engine.exec(self.workspace, ["/bin/sh", "-c", f"kill -{int(signum)} {target}"], capture=True,
                             timeout=30)
        except MicroagentError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the guest kernel process (TERM, then KILL) and wait for its exec to end."""
        if self.alive:
            self.signal(15)
            if self._thread is not None:
                self._thread.join(timeout)
            if self.alive:
                self.signal(9)
                if self._thread is not None:
                    self._thread.join(timeout)

    def unpublish(self) -> None:
        """Close the published host ports (quietly, e.g. when the workspace is already gone)."""
        if self.host_base is not None:
            for port in GUEST_PORTS.values():
                try:
                    self.engine.unpublish_socket(self.workspace, f"{self.host_base}-{port}")
                except MicroagentError:
                    pass
        self.host_base = None
