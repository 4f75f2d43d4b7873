"""Host memory against a guest that floods its kernel's channels: the ``%%microagent python`` client and the
sandboxed kernel's relay hold a bounded number of bytes, between cells and with a frontend that does not read.

A real ipykernel on this host stands in for the guest kernel (the client and the relay speak ZMQ to whatever is at
the other end; the VM path is covered in test_python_session.py / test_sandboxed_kernel.py). Peak memory is read
from /proc/self/status (VmHWM) after resetting it, so the measure is what this process held, not a timing."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent_jupyter.guest_kernel import connection_info
from microagent_jupyter.output_policy import OutputPolicy
from microagent_jupyter.guest_kernel import bounded_client
from microagent_jupyter.relay import Relay
from kernel_helpers import free_ports, local_kernel

MiB = 1024 * 1024
FLOOD_MESSAGES, FLOOD_MIB = 100, 4  # 400 MiB in signed iopub messages, sent after the cell that starts it ends


def _flood_code(done: Path) -> str:
    return ("import threading, pathlib\n"
            "k = get_ipython().kernel\n"
            "def flood(parent=k.get_parent('shell')):\n"
            f"    blob = 'x' * ({FLOOD_MIB} * 1024 * 1024)\n"
            f"    for _ in range({FLOOD_MESSAGES}):\n"
            "        k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': blob}, parent=parent)\n"
            f"    pathlib.Path({str(done)!r}).write_text('sent')\n"
            "threading.Thread(target=flood).start()\n")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _wait_for(predicate: Any, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def guest_kernel() -> Iterator[dict[str, Any]]:
    km, info = local_kernel()
    yield info
    km.shutdown_kernel(now=True)


def test_session_client_holds_bounded_bytes_between_cells(guest_kernel: dict[str, Any], tmp_path: Path) -> None:
    client = bounded_client(guest_kernel)
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        base = _reset_peak()
        done = tmp_path / "done"
        assert client.execute_interactive(_flood_code(done), timeout=120, output_hook=lambda m: None)[
            "content"]["status"] == "ok"
        _wait_for(done.exists, "the guest to finish sending")  # nobody reads iopub meanwhile
        grown = _status("VmHWM") - base
        # the next cell still works (the guest's publisher dropped what the bounded queue refused)
        outs: list[str] = []
        reply = client.execute_interactive("print('next cell')", timeout=120,
                                           output_hook=lambda m: outs.append(m["content"].get("text", "")))
        assert reply["content"]["status"] == "ok" and "next cell\n" in outs
    finally:
        client.stop_channels()
        client.context.destroy(linger=0)
    print(f"client peak growth while {FLOOD_MESSAGES} x {FLOOD_MIB} MiB arrived unread: {grown / MiB:.0f} MiB")
    assert grown < 120 * MiB, f"{grown / MiB:.0f} MiB held for a guest that sent {FLOOD_MESSAGES * FLOOD_MIB} MiB"


def test_relay_holds_bounded_bytes_for_a_frontend_that_does_not_read(guest_kernel: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    from jupyter_client.blocking.client import BlockingKernelClient

    front = connection_info(uuid.uuid4().hex, free_ports())
    # a cell budget too large to matter: what is measured is the queue towards the frontend, not the policy's cap
    relay = Relay(front, guest_kernel, alive=lambda: True, policy=OutputPolicy(max_cell_bytes=1 << 40))
    relay.start()
    # a frontend that subscribes to iopub and never reads it (its own queue holds one message)
    stalled = subprocess.Popen(
        [sys.executable, "-c", "import sys, zmq\ns = zmq.Context().socket(zmq.SUB)\ns.setsockopt(zmq.RCVHWM, 1)\n"
         "s.setsockopt(zmq.SUBSCRIBE, b'')\ns.connect(sys.argv[1])\nprint('subscribed', flush=True)\nsys.stdin.read()",
         f"tcp://127.0.0.1:{front['iopub_port']}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = BlockingKernelClient()
    client.load_connection_info(front)
    client.start_channels(iopub=False, stdin=False, hb=False)
    try:
        assert stalled.stdout is not None and stalled.stdout.readline().strip() == "subscribed"
        client.kernel_info(reply=True, timeout=120)
        base = _reset_peak()
        done = tmp_path / "done"
        msg_id = client.execute(_flood_code(done))
        reply = client.get_shell_msg(timeout=120)
        assert reply["parent_header"]["msg_id"] == msg_id
        _wait_for(done.exists, "the guest to finish sending")
        _wait_for(lambda: relay.guest_messages >= FLOOD_MESSAGES, "the relay to take every flood message")
        grown = _status("VmHWM") - base
        assert relay.running and relay.dropped > 0  # what the stalled frontend could not take was dropped, counted
    finally:
        client.stop_channels()
        relay.stop()
        stalled.kill()
        stalled.wait()
    print(f"relay peak growth with a frontend that does not read: {grown / MiB:.0f} MiB")
    assert grown < 200 * MiB, f"{grown / MiB:.0f} MiB held for a guest that sent {FLOOD_MESSAGES * FLOOD_MIB} MiB"
