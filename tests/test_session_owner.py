"""The owner record of a session workspace: /proc/PID/stat is read by one function (records.process_start_time)."""

from __future__ import annotations

import os
import subprocess

from microagent_engine.records import process_start_time
from microagent_jupyter.session_owner import owner_alive


def test_an_exited_owner_not_yet_reaped_is_gone() -> None:
    """A notebook kernel killed hard is a zombie until its parent reaps it: its session must be swept anyway."""
    owner = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        record = {"pid": owner.pid, "start": process_start_time(owner.pid)}
        assert owner_alive(record)
        owner.stdin.close()  # type: ignore[union-attr]
        os.waitid(os.P_PID, owner.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and is left unreaped
        assert not owner_alive(record)
    finally:
        owner.wait()
    assert not owner_alive(record)
    assert not owner_alive({"pid": os.getpid(), "start": None}) and not owner_alive({"pid": 0, "start": 1})
    assert owner_alive({"pid": os.getpid(), "start": process_start_time(os.getpid())})
