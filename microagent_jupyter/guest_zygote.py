"""GUEST-SIDE program (never imported on the host): a warm Python process that forks ipykernels on request.

:mod:`.warm_python` copies this file into a template workspace and starts it detached
(``python3 guest_zygote.py DIR``). It does the slow work once: ipykernel, IPython, zmq, numpy, pandas and matplotlib
(with ipykernel's inline backend, as a cold kernel would pick it) are imported; then it makes the request FIFO
``DIR/requests``, writes ``DIR/ready`` and waits. The workspace is snapshotted in that state, so every clone resumes
with this process already warm.

A request is one line ``LAUNCHER_PID RC_FIFO CONNECTION_FILE`` written by the launcher shell script
(:data:`microagent_jupyter.guest_kernel.ZYGOTE_LAUNCHER`) that the host's held exec runs. The zygote forks; the
child takes the launcher's environment, working directory and output pipes (``/proc/PID/environ``,
``/proc/PID/cwd``, ``/proc/PID/fd/1`` and ``2``: the exec's own stdout/stderr, no copying process), reseeds every
random generator a clone would otherwise share, announces its pid and starts ipykernel with
the host-made connection file (so each session has its own HMAC key and nothing secret is in the snapshot). When the
child ends, the zygote writes its exit code into ``RC_FIFO``, and the launcher exits with it.
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
    _WARM_MODULES.update(sys.modules)
    from jupyter_client import localinterfaces
    localinterfaces.localhost()  # runs `ip addr` once (a clone has the same interfaces)
    # the kernel's shell (the slowest part of a kernel's start-up) is made here, once: the forked kernel's
    # IPythonKernel then takes this singleton and is wired to it (see child); nothing of it is per session
    try:
        from ipykernel.compiler import XCachingCompiler
        from ipykernel.zmqshell import ZMQInteractiveShell
        ZMQInteractiveShell.instance(config=kernel_config(), compiler_class=XCachingCompiler)
    except Exception:  # noqa: BLE001 (the fork then makes its shell itself)
        traceback.print_exc()
        _drop_shell()


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


_MARK_FD = 2  # a private copy of the exec's stderr once ipykernel redirects fd 2 (see child)


def mark(what: str) -> None:
    """A timestamped step on the exec's stderr (the host's :class:`GuestKernel` keeps them in ``steps``)."""
    os.write(_MARK_FD, f"microagent-kernel-step {what} {time.time():.4f}\n".encode())


def child(launcher: int, conn: str) -> None:
    """In the forked child: become the launcher's kernel (never returns)."""
    global _MARK_FD
    code = 1
    forked = time.time()
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with open(f"/proc/{launcher}/environ", "rb") as fh:
            env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        cwd = os.readlink(f"/proc/{launcher}/cwd")
        out = os.open(f"/proc/{launcher}/fd/1", os.O_WRONLY)
        err = os.open(f"/proc/{launcher}/fd/2", os.O_WRONLY)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        os.setsid()
        os.environ.clear()
        os.environ.update({k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape")
                           for k, v in env.items()})
        os.environ.setdefault("MPLBACKEND", INLINE)
        os.chdir(cwd)
        # every clone of the snapshot resumes the same generator states: draw fresh ones from the (reseeded) kernel
        import random
        random.seed()
        import numpy
        numpy.random.seed()
        pid_file = os.path.join(os.path.dirname(conn), "kernel.pid")
        with open(pid_file, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        # "forked" first: when the host sees the pid it knows this kernel will also say "ready"
        sys.stderr.write(f"microagent-kernel-step forked {forked:.4f}\n")
        sys.stderr.write(f"microagent-kernel-pid {os.getpid()}\n")
        sys.stderr.flush()
        _MARK_FD = os.dup(2)
        os.set_inheritable(_MARK_FD, False)
        mark("setup")
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
        mark("initialized")
        if os.environ.get("MICROAGENT_KERNEL_TRACE"):
            new = sorted(set(sys.modules) - _WARM_MODULES)
            os.write(_MARK_FD, f"microagent-kernel-newmods {len(new)} {' '.join(new)}\n".encode())
        # the inline backend hooks into the shell when it is imported; it was imported before there was one
        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is not None:
            inline._enable_matplotlib_integration()
        mark("ready")  # sockets bound: the host may send kernel_info now
        app.start()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 (reported on the kernel's stderr)
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(d: str) -> None:
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
                pid = os.fork()
                if pid == 0:
                    os.close(requests)
                    os.close(wake_r)
                    os.close(wake_w)
                    child(int(parts[0]), parts[2])
                children[pid] = parts[1]
        while children:  # reap
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            req = children.pop(pid, None)
            if req is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            try:
                fd = os.open(req, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, f"{code}\n".encode())
                os.close(fd)
            except OSError:  # the launcher is gone
                pass


if __name__ == "__main__":
    warm_up()
    serve(sys.argv[1])
