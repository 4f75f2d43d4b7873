"""Spawning a workspace's detached supervisor, and the CLI's standby for it.

A single-threaded caller (the CLI) forks the supervisor, saving an interpreter start-up; a threaded one (a Jupyter
kernel) runs a fresh interpreter, as fork is unsafe there. A command that will start a VM (``run``, ``start``)
calls :func:`prefork` first thing, before its own imports: the forked *standby* imports the supervisor's side
(asyncio, the jail, the network sandbox, the supervisor: ~85 ms here) on the other core while the CLI imports the
engine and makes the workspace, then takes the workspace over a socket (its descriptors by SCM_RIGHTS) and becomes
its supervisor. Unused, it ends when the CLI does (its socket closes).

Light on purpose: the CLI's entry imports this module before anything else of the engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..timeline import mark

if TYPE_CHECKING:
    from ..records import WorkspaceDir

#: set (to anything): always start the supervisor as a fresh interpreter (no fork, no standby)
SUPERVISOR_EXEC_ENV = "MICROAGENT_SUPERVISOR_EXEC"
#: one request: the workspace and its log path (JSON), with the ready pipe and, optionally, the secrets pipe
_REQUEST_MAX = 65536

_standby: tuple[int, int, socket.socket] | None = None  # (its pid, our pid, our end of its socket)


def _may_fork() -> bool:
    return threading.active_count() == 1 and not os.environ.get(SUPERVISOR_EXEC_ENV)


def prefork() -> None:
    """Fork the standby now (once; only in a single-threaded process). :func:`spawn_supervisor` hands it the
    workspace; a process that never starts one just exits, and the standby with it."""
    global _standby
    if _standby is not None or not _may_fork():
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        ours.close()
        _standby_main(theirs)
    theirs.close()
    _standby = (pid, os.getpid(), ours)


def _supervisor_argv(ws_path: str, ready_fd: int, secrets_fd: int | None) -> list[str]:
    return [ws_path, "--ready-fd", str(ready_fd), *(["--secrets-fd", str(secrets_fd)] if secrets_fd is not None
                                                      else [])]


def _detach() -> None:
    """Not the CLI's signal handlers nor its terminal's process group (a Ctrl-C in the terminal is the CLI's)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()


def _become_supervisor(log_path: str, keep: list[int], argv: list[str], error: str = "") -> NoReturn:
    """In a child forked for it: stdio to /dev/null and the supervisor's log, every other descriptor but ``keep``
    closed, then the supervisor's ``main`` (which detaches and returns in this process). ``error``: the
    supervisor's import failed earlier (its traceback goes to the log)."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        low = 3
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if error:
            sys.stderr.write(error)
        else:
            from ..supervisor import main

            code = main(argv)
    finally:
        os._exit(code)


def _standby_main(sock: socket.socket) -> NoReturn:
    """The standby: import the supervisor's side, wait for a workspace, become its supervisor."""
    try:
        _detach()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # a pipe the CLI writes to must not wait for this process
            os.dup2(null, fd)
        os.close(null)
        error = ""
        try:
            import importlib  # the point of the standby: the supervisor's side imported before it is needed

            importlib.import_module("..supervisor", __package__)
        except BaseException:  # noqa: BLE001 (reported in the supervisor's log once there is one)
            import traceback

            error = traceback.format_exc()
        mark("standby: supervisor imported")
        msg, fds, _flags, _addr = socket.recv_fds(sock, _REQUEST_MAX, 2)
        if not msg or not fds:  # the CLI ended without starting a VM
            mark("standby: unused")
            os._exit(0)
        mark("standby: took the workspace")
        for fd in fds:
            os.set_inheritable(fd, False)  # as the CLI's own pipes are: nothing the supervisor spawns gets them
        request = json.loads(msg)
        argv = _supervisor_argv(str(request["workspace"]), fds[0], fds[1] if len(fds) > 1 else None)
    except BaseException:  # noqa: BLE001 (nothing to report to: the CLI sees the ready pipe close)
        os._exit(1)
    sock.close()
    _become_supervisor(str(request["log"]), list(fds), argv, error)


def _hand_to_standby(ws: WorkspaceDir, fds: list[int]) -> bool:
    """Give the workspace and its pipes ``fds`` (ready, then secrets) to this process's standby and wait until it
    detached the supervisor (False: there is none, or it is gone)."""
    global _standby
    if _standby is None:
        return False
    pid, owner, sock = _standby
    _standby = None
    if owner != os.getpid():  # a child of the process that forked it: not ours
        sock.close()
        return False
    try:
        socket.send_fds(sock, [json.dumps({"workspace": str(ws.path), "log": str(ws.supervisor_log)}).encode()], fds)
    except OSError:  # it died (it never does by itself): reap it, fork instead
        sock.close()
        os.waitpid(pid, 0)
        return False
    sock.close()
    os.waitpid(pid, 0)
    return True


def spawn_supervisor(ws: WorkspaceDir, ready_fd: int, secrets_fd: int | None = None) -> None:
    """Start the detached supervisor of ``ws`` (its standby, a fork, or a fresh interpreter; see the module).
    ``ready_fd``: the pipe it writes its one-line verdict to; ``secrets_fd``: a pipe holding the secrets' values,
    handed over (never on disk)."""
    keep = [ready_fd] + ([secrets_fd] if secrets_fd is not None else [])
    if _hand_to_standby(ws, keep):
        return
    argv = _supervisor_argv(str(ws.path), ready_fd, secrets_fd)
    if _may_fork():
        pid = os.fork()
        if pid == 0:  # child: become the supervisor's parent, detached from our stdio
            try:
                _detach()
            except BaseException:  # noqa: BLE001 (the engine sees the ready pipe close)
                os._exit(1)
            _become_supervisor(str(ws.supervisor_log), keep, argv)
        os.waitpid(pid, 0)
        return
    import subprocess

    from ..fsutil import open_private

    with open_private(ws.supervisor_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "microagent_engine.supervisor", *argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=tuple(keep), start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                str(Path(__file__).resolve().parent.parent.parent), os.environ.get("PYTHONPATH")]))})
    proc.wait()
