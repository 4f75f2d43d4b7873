"""GUEST-SIDE program (the host imports it only for its path and RUN_STDIN_FD): a warm Python process that forks
workers on request.

:mod:`microagent_engine.engine.warm_python` copies this file into a build workspace and starts it detached
(``python3 python_zygote.py DIR``). It does the slow work once: ipykernel, IPython, zmq, numpy, pandas and
matplotlib (with ipykernel's inline backend, as a cold kernel would pick it) are imported; given a placeholder
connection info (the fixed kernel ports, a key no session has: ``python3 python_zygote.py DIR JSON``) it forks a
kernel that initializes on it and waits (:func:`waiting_kernel`); then it makes the request FIFO ``DIR/requests``,
writes ``DIR/ready`` and waits. The workspace is snapshotted in that state, so every clone resumes with this process
already warm and a kernel already bound.

A request is one line ``LAUNCHER_PID RC_FIFO WHAT`` written by a launcher shell script (the ``*_LAUNCHER``
scripts of :mod:`~microagent_engine.engine.warm_python`) that a host exec runs. The zygote forks; the child takes
the launcher's environment, working directory and stdio (``/proc/PID/environ``, ``/proc/PID/cwd``,
``/proc/PID/fd/N``: the exec's own pipes, no copying process) and reseeds every random generator a clone would
otherwise share. ``WHAT`` is then either

- a connection file: the child announces its pid and starts ipykernel with it (the host made the file, so each
  session has its own HMAC key and nothing secret is in the snapshot). The clone's first such request is offered
  to the prepared kernel instead, which takes the file's key, a new session id and the launcher's environment,
  directory and output, and starts without a fork or a set-up; it declines (and the zygote forks) when the
  file's endpoints or the environment its set-up read differ. Or
- ``run``: the child is the launcher's ``python3 ARGS…`` (from ``/proc/PID/cmdline``): ``-c CODE``, ``-m MODULE``,
  a script or the program on stdin run in this warm process, with ``-u``/``-B``; any other option, a terminal on
  stdin or a ``PYTHON*`` variable that would change the interpreter makes it ``exec`` the real ``python3`` instead
  (cold, exact). Its pid goes into ``RC_FIFO`` first (the launcher forwards INT/TERM/HUP to it), and it ends
  itself when the launcher dies (a SIGKILL of the exec).

When the child ends, the zygote writes its exit code into ``RC_FIFO``, and the launcher exits with it. What a fork
cannot renew: the str hash seed (``PYTHONHASHSEED``) is the snapshot's, shared by every clone.
"""

import os
import select
import signal
import sys
import time
import traceback

INLINE = "module://matplotlib_inline.backend_inline"


_WARM_MODULES: set[str] = set()


def warm_up() -> None:
    if sys.path and sys.path[0] in ("", os.path.dirname(os.path.abspath(__file__))):
        del sys.path[0]
    os.environ.setdefault("MPLBACKEND", INLINE)  # what ipykernel's init_gui_pylab sets in a cold kernel
    import IPython  # noqa: F401
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.zmqshell  # noqa: F401
    from ipykernel import kernelapp  # noqa: F401
    import zmq  # noqa: F401
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import matplotlib  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import matplotlib_inline.backend_inline  # noqa: F401
    _first_use()
    _WARM_MODULES.update(sys.modules)
    from jupyter_client import localinterfaces
    localinterfaces.localhost()  # runs `ip addr` once (a clone has the same interfaces)
    # the kernel's shell (the slowest part of a kernel's start-up) is made here, once: the forked kernel's
    # IPythonKernel then takes this singleton and is wired to it (see child); nothing of it is per session
    try:
        from ipykernel.compiler import XCachingCompiler
        from ipykernel.zmqshell import ZMQInteractiveShell
        shell = ZMQInteractiveShell.instance(config=kernel_config(), compiler_class=XCachingCompiler)
    except Exception:  # noqa: BLE001 (the fork then makes its shell itself)
        traceback.print_exc()
        _drop_shell()
    else:
        _first_traceback(shell)


def _first_traceback(shell) -> None:
    """Format a cell's KeyboardInterrupt once, through the frames a kernel's cell has (IPython's ``run_code`` and
    the cell), as the kernel will show the first interrupt or error: pygments' lexer tables and style, and
    stack_data's parse of every file in the traceback, interactiveshell.py's above all (a 3,900-line module: ~1.2 s of
    a clone's first interrupt under TCG, 0.2 s later ones). Nothing is shown, no name is left in the namespace and
    the cell's lines leave the line cache."""
    import linecache
    from IPython.core.async_helpers import _pseudo_sync_runner
    src = "raise KeyboardInterrupt\n"
    name = ""

    def quietly(exc_tuple=None, filename=None, tb_offset=None, exception_only=False, running_compiled_code=False):
        etype, value, tb = sys.exc_info()
        try:
            shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        except Exception:  # noqa: BLE001 (the first interrupt pays)
            traceback.print_exc()
    try:
        name = shell.compile.cache(src)
        shell.showtraceback = quietly  # (this instance only, for this one cell)
        try:
            _pseudo_sync_runner(shell.run_code(compile(src, name, "exec")))
        finally:
            del shell.showtraceback
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    linecache.cache.pop(name, None)


def _first_use() -> None:
    """What a first DataFrame and a first figure do once per process (lazy imports, the font cache, the PNG
    writer): done here, a clone's first cell does not pay it. Nothing of it stays visible (no pyplot figure)."""
    import io
    try:
        import pandas
        df = pandas.DataFrame({"a": [1, 2], "b": [0.5, 1.5]})
        repr(df), df._repr_html_(), df.sum(), df.describe(), df.to_csv()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot([1, 2])
        ax.set_title("warm")
        fig.savefig(io.BytesIO(), format="png")
    except Exception:  # noqa: BLE001 (an image without them: the first use pays)
        traceback.print_exc()


def kernel_config():  # -> traitlets Config
    """The kernel's configuration: history in memory (per session, as in a cold kernel, without creating and
    locking a sqlite file on disk)."""
    from traitlets.config import Config
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    return cfg


def _drop_shell() -> None:
    from ipykernel.zmqshell import ZMQInteractiveShell
    ZMQInteractiveShell.clear_instance()


def warm_kernel_class():  # -> type
    """IPythonKernel that adopts the zygote's pre-made shell (its ``instance()`` returns it, made without a
    kernel): point the shell at this kernel, as a shell made by the kernel would be."""
    from ipykernel.ipkernel import IPythonKernel

    class WarmKernel(IPythonKernel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.shell.parent = self
            self.shell.kernel = self
            self.shell.profile_dir = self.profile_dir or self.shell.profile_dir

    return WarmKernel


def quicken_kernel(app) -> None:  # app: IPKernelApp
    """Cut what ipykernel 6 does per message that TCG makes expensive (found with cProfile inside the guest's
    kernel, 30 ``1+1`` cells; each change leaves what the client receives as it was). Applied in the kernel's
    fork only; any of them whose target looks different in this ipykernel/IPython/jupyter_client is skipped.

    - ``OutStream.flush`` with nothing written and nothing pending returns at once: otherwise each of the six
      flushes per cell hands two events to the IOPub thread and waits for them (~3 ms each emulated). Anything
      flushed later still leaves through that thread's queue, ahead of the cell's "idle".
    - ``_accepts_cell_id`` (``inspect.signature`` of ``do_execute``/``run_cell`` twice per cell) is remembered.
    - A message header's date is parsed by ``datetime.fromisoformat``, not dateutil (~4 ms per cell).
    - The kernel's logger drops debug records before making them (its handler dropped them after).
    - IPython's formatters call their format-error guard directly, not through ``decorator``'s per-call
      ``inspect`` binding (12 formatters per displayed value).
    - No 0.5 ms sleep before each execute_reply (ipykernel's ``_execute_sleep``, a FIXME for flushes that did not
      arrive): the guest's timers tick every 4 ms, so it slept a tick per cell; output still leaves through the
      IOPub thread's queue ahead of "idle".
    - A cell is transformed once, not twice: ipykernel transforms it to decide how to run it and IPython's
      ``run_cell`` transforms the same string again (tokenizing it each time); the second call for the same string
      object takes the first one's result.
    - Whether a cell needs the event loop (top-level ``await``, ``async for``/``with``) is not found by compiling it
      (twice per cell) when neither word is in it: it cannot then be a coroutine. Measured in one kernel, 90
      interleaved ``1+1`` round trips each way: 28.2 -> 26.9 ms.
    - IOPub messages and shell replies leave from the thread that makes them (:func:`_send_directly`), and libzmq's
      I/O threads run on a vCPU of their own (:func:`_pin_zmq_threads`).
    - Messages are packed by one JSON encoder made once (:func:`_json_packer`)."""
    import datetime
    import functools
    import inspect
    try:
        from ipykernel import iostream
        stream = iostream.OutStream
        if all(hasattr(stream, a) for a in ("_flush", "_schedule_flush", "flush")):
            stock_flush = stream.flush

            def flush(self):
                try:
                    idle = self.echo is None and not self._flush_pending and not self._subprocess_flush_pending
                    if idle:
                        with self._buffer_lock:
                            idle = self._buffer.tell() == 0
                except (AttributeError, ValueError):  # another layout, or closed: as ipykernel does it
                    idle = False
                if not idle:
                    stock_flush(self)
            stream.flush = flush
    except Exception:  # noqa: BLE001 (stock behaviour)
        traceback.print_exc()
    try:
        from ipykernel import ipkernel, kernelbase
        stock_accepts = kernelbase._accepts_cell_id
        known: dict = {}

        def accepts(meth):
            fn = getattr(meth, "__func__", meth)
            if fn not in known:
                known[fn] = bool(stock_accepts(meth))
            return known[fn]
        for module in (kernelbase, ipkernel):
            if getattr(module, "_accepts_cell_id", None) is stock_accepts:
                module._accepts_cell_id = accepts
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    try:
        from jupyter_client import jsonutil
        stock_parse, pattern, tz = jsonutil.parse_date, jsonutil.ISO8601_PAT, jsonutil._ensure_tzinfo

        def parse_date(s):
            if isinstance(s, str) and pattern.match(s):
                try:
                    return tz(datetime.datetime.fromisoformat(s))
                except ValueError:
                    pass
            return stock_parse(s)
        jsonutil.parse_date = parse_date
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    try:
        if getattr(app.kernel, "_execute_sleep", None):
            app.kernel._execute_sleep = 0.0
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    try:
        app.log.setLevel(app.log_level)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    try:
        from IPython.core import interactiveshell
        stock_should, stock_transform = interactiveshell._should_be_async, interactiveshell.InteractiveShell.transform_cell
        if list(inspect.signature(stock_should).parameters) == ["cell"] and \
                list(inspect.signature(stock_transform).parameters) == ["self", "raw_cell"]:
            def should_be_async(cell):
                return ("await" in cell or "async" in cell) and stock_should(cell)
            last: list = [None, None]  # the raw cell last transformed (the same object), and its transform

            def transform_cell(self, raw_cell):
                if last[0] is raw_cell:
                    out, last[0], last[1] = last[1], None, None
                    return out
                out = stock_transform(self, raw_cell)
                last[0], last[1] = raw_cell, out
                return out
            interactiveshell._should_be_async = should_be_async
            interactiveshell.InteractiveShell.transform_cell = transform_cell
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    for trim in (_send_directly, _pin_zmq_threads, _pack_once):
        try:
            trim(app)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    try:
        from IPython.core import formatters
        guard = getattr(formatters.catch_format_error, "__wrapped__", None)
        for cls in vars(formatters).values():
            method = cls.__dict__.get("__call__") if isinstance(cls, type) else None
            inner = getattr(method, "__wrapped__", None)
            if guard is None or inner is None or list(inspect.signature(inner).parameters)[:2] != ["self", "obj"]:
                continue

            def direct(self, obj, *args, _inner=inner, **kwargs):
                return guard(_inner, self, obj, *args, **kwargs)
            cls.__call__ = functools.wraps(inner)(direct)
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def _send_frames(send):  # send: the compiled Socket.send, unbound
    """A multipart send made of C calls only: no Python bytecode runs between two frames, so a KeyboardInterrupt
    (an interrupt_request raises it in the main thread, at a bytecode boundary) cannot stop a message half sent and
    leave the socket's next message glued to its frames."""
    from collections import deque
    from itertools import chain, repeat

    from zmq import SNDMORE

    def send_frames(sock, frames) -> None:
        n = len(frames)
        deque(map(send, repeat(sock, n), frames, chain(repeat(SNDMORE, n - 1), (0,))), maxlen=0)
    return send_frames


def _send_directly(app) -> None:  # app: IPKernelApp, initialized
    """Send IOPub messages and shell replies from the thread that makes them, not through a thread or a stream.

    ipykernel 6 hands every IOPub message to its IOPub thread (a wake-up through an inproc socket, then that
    thread's tornado loop and ZMQStream machinery) and queues each shell reply on a ZMQStream that sends it at the
    next poll; under TCG each hop is emulated Python and a guest context switch. Here a message is sent on the
    socket at once when nothing is queued ahead of it; what is queued (a stream's scheduled flush, a message from
    another thread while one was pending) keeps its order, because the IOPub thread drains its queue under the same
    lock. That thread stays: streams' timed flushes, forked children's output and sends behind a pending queue
    still pass through it; a forked child (no IOPub thread) takes ipykernel's own path. Interleaved A/B in one
    kernel (90 ``1+1`` round trips each): 26.4 ms stock, 22.1 with direct IOPub sends, 20.4 with direct shell
    replies too."""
    import threading

    import ipykernel
    from zmq.backend import Socket as CSocket
    if ipykernel.version_info[0] != 6:  # the threads and streams described above are ipykernel 6's
        return
    thr, stream = app.iopub_thread, app.kernel.shell_stream
    required = ("_events", "_event_pipe", "_event_puller", "_really_send", "socket", "thread", "schedule")
    if not all(hasattr(thr, a) for a in required) \
            or not all(hasattr(stream, a) for a in ("sending", "_update_handler", "_state")) \
            or not callable(getattr(CSocket, "send", None)):
        return
    send_frames = _send_frames(CSocket.send)
    stock_send, stock_reply = type(thr).send_multipart, type(stream).send_multipart
    lock = threading.RLock()

    def handle_event(_msg, self=thr) -> None:  # on the IOPub thread: every pending event, in order, under the lock
        with lock:
            for _ in range(len(self._events)):
                self._events.popleft()()

    swapped = threading.Event()  # the IOPub thread's stream is its own: it rebinds the handler itself
    thr.schedule(lambda: (thr._event_puller.on_recv(handle_event), swapped.set()))
    if not swapped.wait(10):
        return

    def iopub_send(msg, *args, self=thr, **kwargs) -> None:
        if args or kwargs.keys() - {"copy"} or not kwargs.get("copy", True) or not self.thread.is_alive():
            return stock_send(self, msg, *args, **kwargs)
        with lock:
            if not self._events or self.thread.ident == threading.get_ident():
                if self.socket is not None:
                    send_frames(self.socket, msg)
                return
            self._events.append(lambda: self._really_send(msg, *args, **kwargs))
        self._event_pipe.send(b"")

    def reply_send(msg, flags=0, copy=True, track=False, callback=None, **kwargs) -> None:
        if flags or not copy or track or callback is not None or kwargs or stream.sending() or stream.socket is None:
            return stock_reply(stream, msg, flags=flags, copy=copy, track=track, callback=callback, **kwargs)
        send_frames(stream.socket, msg)
        # a send also reads the socket's pending commands, which can consume the edge of its (edge-triggered) FD
        # that a request arriving meanwhile raised: look for one, as the stream does after its own sends
        stream._update_handler(stream._state)
    thr.send_multipart = iopub_send
    stream.send_multipart = reply_send


def _pin_zmq_threads(_app=None) -> None:
    """Keep libzmq's background threads (``ZMQbg/…``: the I/O thread that writes every message to TCP, the reaper)
    on the last vCPU, when there are two or more. Each message wakes the I/O thread; on the sending thread's vCPU
    it preempted the kernel until the write was done. Only those threads are pinned: the kernel's and the user's
    threads and processes keep every vCPU. Interleaved A/B in one kernel (2 vCPUs, 90 ``1+1`` round trips each,
    direct sends in): 21.4 ms unpinned, 19.8 pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                if fh.read().startswith("ZMQbg/"):
                    os.sched_setaffinity(int(tid), {cpus[-1]})
        except OSError:  # the thread ended meanwhile
            pass


def _json_packer(stock, default):  # -> a packer giving the bytes stock gives, or stock itself
    """jupyter_client's ``json_packer`` as one C encoder made once: ``json.dumps`` with its arguments builds a
    JSONEncoder and then a C encoder for every call (four per message: header, parent, metadata, content), Python
    that TCG makes ~60 µs each. The same separators, ``default``, no ASCII escaping, no NaN; no circular check
    (a cycle ends in RecursionError, and then, as anything the fast path cannot pack, in ``stock``'s own
    handling). Used only if it packs a sample message to the same bytes as ``stock``. Interleaved A/B in one
    kernel (120 ``1+1`` round trips each): 19.9 -> 18.0 ms."""
    import datetime
    from json import encoder
    make = getattr(encoder, "c_make_encoder", None)
    if make is None:
        return stock
    encode = make(None, default, encoder.encode_basestring, None, ": ", ", ", False, False, False)

    def pack(obj) -> bytes:
        try:
            return "".join(encode(obj, 0)).encode("utf8", errors="surrogateescape")
        except Exception:  # noqa: BLE001 (what stock does with it: clean it, warn, or raise)
            return stock(obj)
    sample = {"msg_id": "0f", "date": datetime.datetime.now(datetime.timezone.utc), "n": [1, -2.5, None, True],
              "text": "é\u2028\"\\\n", "nested": {"k": ["v", {}], "x": 1e300}, "t": ("a", 2)}
    try:
        return pack if pack(sample) == stock(sample) else stock
    except Exception:  # noqa: BLE001
        return stock


def _pack_once(app) -> None:  # app: IPKernelApp, initialized
    from jupyter_client import session
    if app.session.pack is session.json_packer:
        app.session.pack = _json_packer(session.json_packer, session.json_default)


_MARK_FD = 2  # a private copy of the exec's stderr once ipykernel redirects fd 2 (see child)


def mark(what: str) -> None:
    """A timestamped step on the exec's stderr (the host's :class:`GuestKernel` keeps them in ``steps``)."""
    os.write(_MARK_FD, f"microagent-kernel-step {what} {time.time():.4f}\n".encode())


#: the launcher's descriptor that holds its stdin (a shell's ``read x <&3`` lends fd 0 to the FIFO meanwhile)
RUN_STDIN_FD = 4


def _forked_signals() -> None:
    """A forked child's signals as a fresh python3 has them (not the zygote's wake-up descriptor and handlers)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _launcher_env(launcher: int) -> dict[bytes, bytes]:
    with open(f"/proc/{launcher}/environ", "rb") as fh:
        return dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)


def _adopt(launcher: int, stdin_fd: int | None, targets: tuple[int, int, int] = (0, 1, 2)) -> None:
    """In a forked child: take the launcher's environment, working directory and stdio (its stdin from
    ``stdin_fd``; None: /dev/null) onto the descriptors ``targets``; reseed what a clone shares."""
    env = _launcher_env(launcher)
    cwd = os.readlink(f"/proc/{launcher}/cwd")
    stdin = os.open("/dev/null", os.O_RDONLY)
    if stdin_fd is not None:
        try:  # non-blocking: reopening a pipe whose writer has already closed it would wait for a writer forever
            piped = os.open(f"/proc/{launcher}/fd/{stdin_fd}", os.O_RDONLY | os.O_NONBLOCK)
            os.set_blocking(piped, True)
            os.close(stdin)
            stdin = piped
        except OSError:  # not a file, FIFO or terminal (a socket cannot be reopened): /dev/null
            pass
    fds = [stdin, os.open(f"/proc/{launcher}/fd/1", os.O_WRONLY), os.open(f"/proc/{launcher}/fd/2", os.O_WRONLY)]
    for target, fd in zip(targets, fds):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()
    os.environ.clear()
    os.environ.update({k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape")
                       for k, v in env.items()})
    os.chdir(cwd)
    # every clone of the snapshot resumes the same generator states: draw fresh ones from the (reseeded) kernel
    import random
    random.seed()
    import numpy
    numpy.random.seed()


def child(launcher: int, conn: str) -> None:
    """In the forked child: become the launcher's kernel (never returns)."""
    forked = time.time()

    def prepare():  # -> IPKernelApp
        global _MARK_FD
        _forked_signals()
        _adopt(launcher, None)
        os.environ.setdefault("MPLBACKEND", INLINE)
        _announce(conn, forked, sys.stderr.fileno())
        _MARK_FD = os.dup(2)
        os.set_inheritable(_MARK_FD, False)
        mark("setup")
        app = _kernel_app(conn)
        if os.environ.get("MICROAGENT_KERNEL_TRACE"):
            new = sorted(set(sys.modules) - _WARM_MODULES)
            os.write(_MARK_FD, f"microagent-kernel-newmods {len(new)} {' '.join(new)}\n".encode())
        return app
    _run_kernel(prepare)


def _run_kernel(prepare) -> None:  # prepare: () -> IPKernelApp
    """Run the kernel ``prepare()`` makes until it ends, then end this process with its exit code (never
    returns)."""
    code = 1
    try:
        app = prepare()
        mark("ready")  # sockets bound: the host may send kernel_info now
        app.start()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 (reported on the kernel's stderr)
        traceback.print_exc()
    finally:
        _exit_now(code)


def _announce(conn: str, forked: float, fd: int, step: str = "forked") -> None:
    """The kernel's pid into ``kernel.pid`` beside ``conn`` and on the launcher's stderr (``fd``), after its
    "forked" step (and ``step``, when another): when the host sees the pid it knows this kernel will also say
    "ready"."""
    with open(os.path.join(os.path.dirname(conn), "kernel.pid"), "w") as fh:
        fh.write(f"{os.getpid()}\n")
    steps = "".join(f"microagent-kernel-step {name} {forked:.4f}\n" for name in dict.fromkeys(("forked", step)))
    os.write(fd, f"{steps}microagent-kernel-pid {os.getpid()}\n".encode())


def _kernel_app(conn: str):  # -> IPKernelApp
    """This process's IPKernelApp on connection file ``conn``, initialized (sockets bound, its threads started)
    with the zygote's pre-made shell and the fork's trims (:func:`quicken_kernel`); not started."""
    sys.argv = ["ipykernel_launcher", "-f", conn]
    from ipykernel import kernelapp
    from ipykernel.zmqshell import ZMQInteractiveShell
    app = kernelapp.IPKernelApp.instance()
    cfg = kernel_config()
    cfg.IPKernelApp.connection_file = conn
    app.update_config(cfg)
    if ZMQInteractiveShell.initialized():
        ZMQInteractiveShell.instance().init_environment()  # on this session's environment (PAGER, TERM...)
        app.kernel_class = warm_kernel_class()
    # set above instead: parsing builds an argparse parser over every configurable class (~0.4 s under TCG)
    app.parse_command_line = lambda argv=None: None
    if os.environ.get("MICROAGENT_KERNEL_PROFILE"):
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        prof.runcall(app.initialize, [])
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
        with open("/tmp/.microagent-kernel/profile.txt", "w") as fh:
            fh.write(buf.getvalue())
    else:
        app.initialize([])
    quicken_kernel(app)
    mark("initialized")
    # the inline backend hooks into the shell when it is imported; it was imported before there was one
    inline = sys.modules.get("matplotlib_inline.backend_inline")
    if inline is not None:
        inline._enable_matplotlib_integration()
    return app


#: what a kernel prepared before the snapshot must share with a session's connection file to become its kernel
_ENDPOINT_KEYS = ("ip", "transport", "signature_scheme", "shell_port", "iopub_port", "stdin_port", "control_port",
                  "hb_port")
#: environment a kernel's set-up read (config and profile paths, matplotlib's backend, the interpreter): a launcher
#: whose values differ from the zygote's gets a freshly forked kernel instead of the prepared one
_INIT_ENV = ("HOME", "IPYTHONDIR", "MPLBACKEND", "MPLCONFIGDIR")
_INIT_ENV_PREFIXES = ("JUPYTER", "PYTHON")


def _same_setup(info: dict, placeholder: dict, env: dict[bytes, bytes]) -> bool:
    """Whether the kernel prepared on ``placeholder`` can serve connection ``info`` for a launcher with ``env``."""
    if any(info.get(k) != placeholder.get(k) for k in _ENDPOINT_KEYS) or not isinstance(info.get("key"), str):
        return False
    mine = {k.encode(): v.encode(errors="surrogateescape") for k, v in os.environ.items()}

    def relevant(name: bytes) -> bool:
        text = name.decode(errors="replace")
        return (text in _INIT_ENV or text.startswith(_INIT_ENV_PREFIXES)) and text not in _RUN_ENV_OK
    return all(env.get(k) == mine.get(k) for k in {*filter(relevant, env), *filter(relevant, mine)})


def waiting_kernel(placeholder: str, go: int, ack: int) -> None:
    """In a child the zygote forks before the snapshot: a kernel initialized on the snapshot's ``placeholder``
    connection file (the fixed ports, a key no session has) that says "prepared" on ``ack`` and waits on ``go``.
    Given ``LAUNCHER_PID CONNECTION_FILE``, it answers "taken" and becomes that launcher's kernel: the session's key
    and a new session id, the launcher's environment, working directory and output, fresh random generators; or
    "no" (ports, key or set-up environment differ) and ends, and the zygote forks a kernel instead. Never returns.
    Each clone's first kernel so skips the fork and the kernel's set-up (sockets, threads, streams)."""
    global _MARK_FD
    import json
    _forked_signals()
    try:
        with open(placeholder) as fh:
            prepared = json.load(fh)
        _MARK_FD = os.dup(2)
        os.set_inheritable(_MARK_FD, False)
        app = _kernel_app(placeholder)
    except BaseException:  # noqa: BLE001 (no prepared kernel: every kernel is forked)
        traceback.print_exc()
        os._exit(1)
    # ipykernel ignores SIGINT outside a cell, as its set-up left it
    os.write(ack, b"prepared\n")
    line = _read_line(go)
    taken = time.time()
    try:
        launcher_s, conn = line.split()
        launcher = int(launcher_s)
        with open(conn) as fh:
            info = json.load(fh)
        ok = isinstance(info, dict) and _same_setup(info, prepared,
                                                    {b"MPLBACKEND": INLINE.encode(), **_launcher_env(launcher)})
    except (OSError, ValueError):
        ok = False
    if not ok:
        os.write(ack, b"no\n")
        os._exit(0)
    os.write(ack, b"taken\n")

    def take():  # -> IPKernelApp
        # ipykernel's streams copied the zygote's stdout and stderr before they redirected fds 1 and 2 into
        # themselves: the launcher's output goes where those copies are
        outs = tuple(getattr(stream, "_original_stdstream_copy", None) or n
                     for stream, n in ((sys.stdout, 1), (sys.stderr, 2)))
        _adopt(launcher, None, (0, *outs))
        os.environ.setdefault("MPLBACKEND", INLINE)
        os.dup2(outs[1], _MARK_FD)
        _announce(conn, taken, _MARK_FD, "prepared")
        from jupyter_client.session import new_id
        app.session.key = info["key"].encode()
        app.session.session = new_id()
        app.connection_file = conn
        app.shell.init_environment()
        return app
    _run_kernel(take)


def _read_line(fd: int, timeout: float | None = None) -> str:
    """One line from ``fd`` ("" at its end, or after ``timeout`` seconds)."""
    buf = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        if deadline is not None:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return ""
        try:
            chunk = os.read(fd, 256)
        except InterruptedError:
            continue
        if not chunk:
            return ""
        buf += chunk
    return buf.decode(errors="replace").strip()


def prepare_kernel(d: str, placeholder: str) -> tuple[int, int, int] | None:
    """Fork :func:`waiting_kernel` on the connection info ``placeholder`` (JSON) and wait until it is prepared:
    its (pid, go, ack) descriptors, or None when it could not be."""
    path = f"{d}/waiting-kernel.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, placeholder.encode())
    os.close(fd)
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:  # never back into the zygote's code: a write to a zygote that closed its end raises
            os.close(go_w)
            os.close(ack_r)
            waiting_kernel(path, go_r, ack_w)
        finally:
            os._exit(1)
    os.close(go_r)
    os.close(ack_w)
    if _read_line(ack_r) == "prepared":
        return pid, go_w, ack_r
    os.close(go_w)
    os.close(ack_r)
    os.waitpid(pid, 0)
    return None


def _hand_over(waiter: tuple[int, int, int], launcher: str, conn: str) -> bool:
    """Offer the prepared kernel to a kernel request; whether it took it (then it is that request's child). One
    that did not answer "taken" in time is killed, so that it cannot become a second kernel beside the forked one."""
    pid, go, ack = waiter
    try:
        os.write(go, f"{launcher} {conn}\n".encode())
        taken = _read_line(ack, 30.0) == "taken"
    except OSError:
        taken = False
    os.close(go)
    os.close(ack)
    if not taken:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # it ended already (it declined)
            pass
    return taken


def _exit_code(exc: SystemExit) -> int:
    """The exit status python3 gives ``exc`` (a message goes to stderr, status 1)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _exit_now(code: int) -> None:
    """Flush what Python buffered and end this forked child (never the zygote's atexit and finalizers)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


#: ``PYTHON*`` variables a warm run honours (any other one changes the interpreter: the real python3 runs instead)
_RUN_ENV_OK = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


def _python_args(launcher: int) -> tuple[str, list[str]]:
    """The launcher's ``python3 ARGS…``: it runs ``sh -c SCRIPT PYTHON ARGS…``."""
    with open(f"/proc/{launcher}/cmdline", "rb") as fh:
        words = [w.decode(errors="surrogateescape") for w in fh.read().split(b"\0")[:-1]]
    return words[3], words[4:]


def _parse(args: list[str]) -> tuple[set[str], str, str, list[str]] | None:
    """``python3 ARGS`` as (flags, mode, target, argv tail), mode one of c, m, script, stdin; None: not one a
    warm run reproduces exactly."""
    flags: set[str] = set()
    while args and args[0].startswith("-") and args[0] != "-":
        opt, args = args[0], args[1:]
        if opt in ("-u", "-B"):
            flags.add(opt)
        elif opt in ("-c", "-m") and args:
            return flags, opt[1], args[0], args[1:]
        else:
            return None
    if not args or args[0] == "-":
        return flags, "stdin", "-" if args else "", args[1:]
    return flags, "script", args[0], args[1:]


def _stdio(unbuffered: bool) -> None:
    """New sys.std* objects on the adopted descriptors, buffered as a fresh python3's would be."""
    import io
    enc, err = sys.__stdout__.encoding, sys.__stdout__.errors

    def out(fd: int, errors: str, line: bool) -> io.TextIOWrapper:
        raw = io.open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding=enc, errors=errors, line_buffering=line or os.isatty(fd),
                                write_through=unbuffered)

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding=enc, errors=err)
    sys.stdout = sys.__stdout__ = out(1, err, False)
    sys.stderr = sys.__stderr__ = out(2, "backslashreplace", True)


def _watch(launcher: int) -> None:
    """End this process when the launcher dies first (the exec was killed: its signal cannot be forwarded)."""
    import threading

    def wait() -> None:
        try:
            fd = os.pidfd_open(launcher)
            select.select([fd], [], [])
        except OSError:
            while os.path.exists(f"/proc/{launcher}"):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, daemon=True).start()


def _python_main(flags: set[str], mode: str, target: str, tail: list[str]) -> None:
    """What ``python3 [FLAGS] (-c CODE | -m MODULE | SCRIPT | -) TAIL`` does, in this process."""
    import builtins
    import runpy
    import types
    if "-B" in flags:
        sys.dont_write_bytecode = True
    if mode == "script":
        sys.argv = [target, *tail]
        sys.path.insert(0, os.path.dirname(os.path.realpath(target)))
        runpy.run_path(target, run_name="__main__")
        return
    sys.path.insert(0, "" if mode != "m" else os.getcwd())
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    if mode == "m":
        sys.argv = ["-m", *tail]
        runpy._run_module_as_main(target)  # as python3 -m does (its errors worded the same)
        return
    if mode == "c":
        sys.argv = ["-c", *tail]
        source, filename = target, "<string>"
    else:
        sys.argv = [target, *tail]
        source, filename = sys.stdin.read(), "<stdin>"
    exec(compile(source, filename, "exec"), main.__dict__)


def run_child(launcher: int) -> None:
    """In the forked child: be the launcher's ``python3 ARGS…`` (never returns)."""
    code = 1
    try:
        _forked_signals()
        _adopt(launcher, RUN_STDIN_FD)
        python, args = _python_args(launcher)
        parsed = _parse(list(args))
        import shutil
        exact = (parsed is not None and not (parsed[1] == "stdin" and os.isatty(0))
                 and not (parsed[1] == "script" and not os.path.isfile(parsed[2]))
                 and not any(k.startswith("PYTHON") and k not in _RUN_ENV_OK for k in os.environ)
                 and os.path.realpath(shutil.which(python) or python) == os.path.realpath(sys.executable))
        if not exact:
            os.execvp(python, [python, *args])
        _watch(launcher)
        _drop_shell()  # a fresh python3 has no IPython shell (get_ipython() is None)
        import atexit
        import logging
        atexit._clear()
        atexit.register(logging.shutdown)
        _stdio("-u" in parsed[0] or bool(os.environ.get("PYTHONUNBUFFERED")))
        import matplotlib.pyplot
        matplotlib.pyplot.switch_backend(os.environ.get("MPLBACKEND") or "agg")
        try:
            _python_main(*parsed)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:  # noqa: BLE001 (as python3 reports an uncaught exception)
            sys.excepthook(*sys.exc_info())
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        _exit_now(code)


def serve(d: str, waiter: tuple[int, int, int] | None = None) -> None:
    """Answer requests (see the module's docstring) until the VM ends; the first kernel request is offered the
    kernel :func:`prepare_kernel` made (``waiter``), later ones (and one it declines) get a forked kernel."""
    fifo = f"{d}/requests"
    if not os.path.exists(fifo):
        os.mkfifo(fifo, 0o600)
    requests = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # RDWR: never EOF when a launcher closes it
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    with open(f"{d}/pid", "w") as fh:
        fh.write(f"{os.getpid()}\n")
    with open(f"{d}/ready", "w") as fh:
        fh.write("ready\n")
    children: dict[int, str] = {}
    buf = b""
    while True:
        try:
            ready, _, _ = select.select([requests, wake_r], [], [], 5.0)
        except InterruptedError:
            ready = []
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        if requests in ready:
            try:
                buf += os.read(requests, 4096)
            except BlockingIOError:
                pass
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                parts = line.decode(errors="replace").split()
                if len(parts) != 3 or not parts[0].isdigit():
                    continue
                if waiter is not None and parts[2] != "run":
                    prepared, waiter = waiter, None
                    if _hand_over(prepared, parts[0], parts[2]):
                        children[prepared[0]] = parts[1]
                        continue
                pid = os.fork()
                if pid == 0:
                    for fd in (requests, wake_r, wake_w, *(waiter[1:] if waiter else ())):
                        os.close(fd)
                    if parts[2] == "run":
                        run_child(int(parts[0]))
                    child(int(parts[0]), parts[2])
                children[pid] = parts[1]
                if parts[2] == "run":  # the launcher forwards its signals to this pid
                    _tell(parts[1], f"{pid}\n")
        while children:  # reap
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            req = children.pop(pid, None)
            if waiter is not None and pid == waiter[0]:  # the prepared kernel died waiting
                for fd in waiter[1:]:
                    os.close(fd)
                waiter = None
            if req is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            _tell(req, f"{128 - code if code < 0 else code}\n")


def _tell(fifo: str, line: str) -> None:
    """One line into a launcher's FIFO (nothing when the launcher is gone)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, line.encode())
        os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    warm_up()
    serve(sys.argv[1], prepare_kernel(sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else None)
