"""Following a workspace's serial log as it grows: one follower (logfiles.follow), across rotations, for
Engine.logs and the notebook's log widget alike. No VM boots: the writer is the supervisor's RotatingLog."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from microagent_engine import Engine
from microagent_engine.logfiles import RotatingLog, follow
from microagent_jupyter._engine import tail_serial_log


def _collect(chunks: Iterator[bytes]) -> tuple[queue.Queue[bytes], threading.Thread]:
    got: queue.Queue[bytes] = queue.Queue()
    thread = threading.Thread(target=lambda: [got.put(c) for c in chunks], daemon=True)
    thread.start()
    return got, thread


def _until(got: queue.Queue[bytes], want: bytes) -> bytes:
    seen = b""
    while want not in seen:
        seen += got.get(timeout=60)  # a liveness bound: the follower must deliver it at all
    return seen


def _rotate_under(got: queue.Queue[bytes], path: Path) -> None:
    log = RotatingLog(path, max_bytes=16)
    log.write(b"one\n")
    _until(got, b"one\n")  # the follower has read the first file ...
    log.write(b"two after rotate")  # ... then the writer rotates: 4 + 16 bytes pass the 16-byte cap
    assert path.with_name(path.name + ".1").read_bytes() == b"one\n"
    assert b"two after rotate" in _until(got, b"two after rotate")
    log.close()


def test_follow_reads_on_in_the_new_file_after_a_rotation(tmp_path: Path) -> None:
    stop = threading.Event()
    got, thread = _collect(follow(tmp_path / "serial.log", lambda: not stop.is_set(), stop.wait, 0.01))
    _rotate_under(got, tmp_path / "serial.log")
    stop.set()
    thread.join(60)
    assert not thread.is_alive()


def test_follow_without_keep_going_reads_what_is_there_and_ends(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    assert list(follow(path, lambda: False, lambda _: None)) == []  # no file yet: nothing, no wait
    path.write_bytes(b"x" * 100_000)
    assert b"".join(follow(path, lambda: False, lambda _: None)) == b"x" * 100_000


def test_notebook_log_widget_follows_across_a_rotation(engine: Engine) -> None:
    """The widget's reader (tail_serial_log) used its own loop that stayed on the rotated-away file."""
    info = engine.create("follow-rot", profile="tiny")
    stop = threading.Event()
    try:
        got, thread = _collect(tail_serial_log(engine, info.name, stop, poll=0.01))
        _rotate_under(got, info.dir.serial_log)
        stop.set()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        stop.set()
        engine.delete(info.name)
