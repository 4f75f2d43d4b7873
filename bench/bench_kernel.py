#!/usr/bin/env python3
"""The sandboxed kernel ("Python 3 (microagent sandbox)", through its provisioner) against a local ipykernel, in
one run, as a notebook uses them (jupyter_client's KernelManager, the way jupyter_server starts kernels):

    (a) a fresh notebook's first result: kernel start until ``import pandas, matplotlib; 1+1`` gave ``2``
        (the sandbox from the warm Python snapshot, built first and not timed; with ``--pool`` (default 1) every
        kernel after the first takes a VM of the warm pool, once the pool holds it: its memory and idle CPU are
        printed)
    (b) a cell's round trip: ``1+1`` until its reply (after a warm-up cell): p50/p95
    (c) a plot cell: ``plt.plot(...); plt.show()`` until its reply (the PNG came back), a kernel's first one and
        (c') the two after it
    (d) interrupt: the frontend's interrupt during ``time.sleep(60)`` until the KeyboardInterrupt reply

Each side runs in a fresh process of its own (the client's process is part of what is measured). Prints each
figure and the ratio sandbox/local. Usage:
python bench/bench_kernel.py [--kernels N] [--cells N] [--interrupts N] [--pool N] [--breakdown] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from jupyter_client import KernelManager  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

from microagent_engine import Engine  # noqa: E402
from bench_python import line  # noqa: E402
from microagent_engine.config import STATE_DIR_ENV  # noqa: E402

FIRST_CELL = "import pandas, matplotlib\n1+1"
PLOT_CELL = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]); plt.show()"


def manager(sandbox: bool) -> KernelManager:
    if not sandbox:
        return KernelManager(kernel_name="python3")
    ksm = KernelSpecManager(kernel_dirs=[str(REPO / "share" / "jupyter" / "kernels")])
    return KernelManager(kernel_name="microagent-python", kernel_spec_manager=ksm)


@contextlib.contextmanager
def started(sandbox: bool) -> Iterator[tuple[KernelManager, Any]]:
    """A kernel started and answering, and its client; shut down on the way out."""
    km = manager(sandbox)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=600)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc, code: str) -> dict:
    reply = kc.execute_interactive(code, output_hook=lambda m: None, timeout=300)
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"cell failed: {code!r}: {reply['content']}")
    return reply


def interrupt_once(km: KernelManager, kc) -> float:
    """Seconds from the interrupt request (sent once the guest prints inside the sleep) to the error reply."""
    sleeping, sent = threading.Event(), [0.0]

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream" and "sleeping" in msg["content"].get("text", ""):
            sleeping.set()

    def interrupt() -> None:
        sleeping.wait(120)
        sent[0] = time.perf_counter()
        km.interrupt_kernel()

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    reply = kc.execute_interactive("import time; print('sleeping', flush=True); time.sleep(60)",
                                   output_hook=hook, timeout=300)
    done = time.perf_counter()
    t.join()
    if reply["content"].get("ename") != "KeyboardInterrupt":
        raise SystemExit(f"the interrupt did not interrupt: {reply['content']}")
    return done - sent[0]


_reported: list[bool] = []


def wait_for_pool(pool: int) -> None:
    """Until the warm pool holds its VM (not timed: a notebook opened later finds it ready, and the refill does not
    compete with what is measured); the first time, print what a pooled VM uses while it waits."""
    if pool <= 0:
        return
    from microagent_jupyter import kernel_pool

    engine = Engine(os.environ[STATE_DIR_ENV])
    deadline = time.monotonic() + 900
    while not kernel_pool.pooled(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = kernel_pool.pooled(engine)
    if not names:
        raise SystemExit("the warm pool did not fill within 900 s")
    if _reported:
        return
    _reported.append(True)
    before = engine.status(names[0]).to_json().get("usage") or {}
    time.sleep(10)
    after = engine.status(names[0]).to_json().get("usage") or {}
    cpu = (after.get("cpuSeconds", 0) - before.get("cpuSeconds", 0)) / 10 * 100
    print(f"  pooled VM {names[0]}: {after.get('rssMiB', 0):.0f} MiB resident, {cpu:.1f}% of a CPU while it waits",
          flush=True)


def round_trips(kc, cells: int) -> list[float]:
    """Seconds of ``cells`` ``1+1`` cells, each until its reply."""
    times = []
    for _ in range(cells):
        s = time.perf_counter()
        run(kc, "1+1")
        times.append(time.perf_counter() - s)
    return times


def bench(sandbox: bool, kernels: int, cells: int, interrupts: int, pool: int = 0) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first": [], "rt": [], "plot": [], "plot_later": [], "interrupt": []}
    for i in range(kernels):
        if sandbox and i > 0:
            wait_for_pool(pool)
        t0 = time.perf_counter()
        with started(sandbox) as (km, kc):
            run(kc, FIRST_CELL)
            out["first"].append(time.perf_counter() - t0)
            if sandbox:
                wait_for_pool(pool)
            run(kc, "1+1")  # warm-up
            out["rt"] += round_trips(kc, cells)
            for j in range(3):  # the kernel's first plot, then two more
                s = time.perf_counter()
                run(kc, PLOT_CELL)
                out["plot" if j == 0 else "plot_later"].append(time.perf_counter() - s)
            out["interrupt"] += [interrupt_once(km, kc) for _ in range(interrupts)]
    return out


GUEST_ROUND_TRIPS = r"""
import statistics, time
from jupyter_client import BlockingKernelClient
c = BlockingKernelClient()
c.load_connection_file(%r)
c.start_channels()
c.wait_for_ready(timeout=60)
def rt():
    t = time.perf_counter(); c.execute_interactive("1+1", output_hook=lambda m: None, timeout=60)
    return time.perf_counter() - t
[rt() for _ in range(3)]
print(statistics.median([rt() for _ in range(%d)]))
"""


def breakdown(cells: int) -> None:
    """Where a round trip goes: the same kernel from the host (relay, published ports) and from inside the guest."""
    from microagent_jupyter.guest_kernel import CONNECTION_FILE

    with started(True) as (km, kc):
        round_trips(kc, 3)  # warm-up
        host = round_trips(kc, cells)
        engine = Engine(os.environ[STATE_DIR_ENV])
        ws = km.provisioner.workspace
        pings = [engine.ping(ws) for _ in range(cells)]
        result = engine.exec(ws, ["python3", "-c", GUEST_ROUND_TRIPS % (CONNECTION_FILE, cells)], timeout=600)
        guest = float(result.stdout.decode().strip().splitlines()[-1])
    print(f"round trip breakdown, p50: host through the relay {statistics.median(host) * 1000:.1f} ms; a client "
          f"inside the guest {guest * 1000:.1f} ms; agent ping {statistics.median(pings) * 1000:.2f} ms")

def side(which: str, args: argparse.Namespace, out: str) -> None:
    """One side's kernels, in this process (a child of :func:`main`); the figures into ``out`` as JSON."""
    if which == "local":
        result = bench(False, args.kernels, args.cells, args.interrupts)
    else:
        os.environ["MICROAGENT_KERNEL_POOL"] = str(args.pool)
        result = bench(True, args.kernels, args.cells, args.interrupts, args.pool)
        from microagent_jupyter import kernel_pool

        kernel_pool.drain()
        if args.breakdown:
            os.environ["MICROAGENT_KERNEL_POOL"] = "0"
            breakdown(args.cells)
    Path(out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, default=3, help="fresh kernels per side")
    ap.add_argument("--cells", type=int, default=30, help="1+1 round trips per kernel")
    ap.add_argument("--interrupts", type=int, default=2, help="interrupts per kernel")
    ap.add_argument("--state-dir", help="reuse this state dir (and its cached Python image and warm snapshot)")
    ap.add_argument("--breakdown", action="store_true", help="also: a round trip from the host vs from inside the "
                    "guest against the same kernel, and the agent's ping")
    ap.add_argument("--pool", type=int, default=1, help="the sandboxed kernels' warm pool (0: none); the first "
                    "kernel starts without one, each later one when the pool holds its VM")
    ap.add_argument("--side", choices=("local", "sandbox"), help=argparse.SUPPRESS)  # a child's: one side
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        if not args.out:
            ap.error("--side (a child's option) needs --out FILE for its figures")
        return side(args.side, args, args.out)
    state = args.state_dir or tempfile.mkdtemp(prefix="ma-bench-kernel-")
    os.environ[STATE_DIR_ENV] = state
    from microagent_jupyter.warm_python import prepare

    print(f"state dir {state}; preparing the Python image and warm snapshot (not timed)", flush=True)
    print("  " + prepare(Engine(state), progress=lambda m: print("  " + m, flush=True)), flush=True)
    # each side in a fresh process of its own: the client's process is part of a round trip, and one that has run
    # the other side's kernels first was slower (the sandbox's round trip 19.5-20.2 ms after the local kernels in
    # the same process, 15.9 after them in another process, 14.8-17.1 in a fresh one)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ma-bench-kernel-out-") as tmp:
        for which in ("local", "sandbox"):
            out = os.path.join(tmp, f"{which}.json")
            argv = [sys.executable, __file__, "--side", which, "--out", out, "--kernels", str(args.kernels),
                    "--cells", str(args.cells), "--interrupts", str(args.interrupts), "--pool", str(args.pool)]
            subprocess.run(argv + (["--breakdown"] if args.breakdown else []), check=True)
            results[which] = json.loads(Path(out).read_text())
    local, sandbox = results["local"], results["sandbox"]
    if args.pool > 0 and len(sandbox["first"]) > 1:  # the first sandboxed kernel had no pool yet
        print(line("(a) first result, no pool yet (1st)", sandbox["first"][:1]))
        sandbox["first"] = sandbox["first"][1:]
    labels = {"first": "(a) fresh notebook -> first result", "rt": "(b) round trip 1+1",
              "plot": "(c) plot cell, a kernel's first", "plot_later": "(c') plot cell, later ones",
              "interrupt": "(d) interrupt -> reply"}
    for key, label in labels.items():
        print(line(f"{label}, local", local[key]))
        print(line(f"{label}, sandbox", sandbox[key]))
        print(f"{'':<34} ratio sandbox/local p50 = "
              f"{statistics.median(sandbox[key]) / statistics.median(local[key]):.2f}x", flush=True)


if __name__ == "__main__":
    main()
