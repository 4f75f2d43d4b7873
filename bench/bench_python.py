#!/usr/bin/env python3
"""Python-session benchmark: a sandboxed session (``%%microagent python``'s machinery) against a local ipykernel.

    (a) cold time to a ready session: create + boot the workspace (built-in Python image, cached) + start the
        guest ipykernel + first kernel_info reply through the published ports; vs a local ipykernel's start
    (b) a cell's round trip (execute ``1+1`` until its execute_result and idle): p50/p95, both sides
    (c) first result on a fresh notebook: ``%%microagent python`` (no session yet) running
        ``import pandas, matplotlib; 1+1`` through a real IPython shell, until ``2`` is displayed: cold (a cold
        boot + imports) vs warm (a clone of the warm Python snapshot, built first and not timed); the shell runs
        in a folder holding only its notebook (a session copies the notebook's folder in: not this checkout)

Prints each figure and the ratios sandbox/local. The Python image is built first if it is not cached (not
timed). Usage: python bench/bench_python.py [--sessions N] [--cells N] [--state-dir DIR]
[--only-first [--warm-only] [--first N] [--trace]]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jupyter_client import KernelManager

from microagent_engine import Engine
from microagent_engine.config import STATE_DIR_ENV
from microagent_jupyter import python_session as PS
from microagent_jupyter.kernel_pool import POOL_ENV


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def line(label: str, values: list[float]) -> str:
    return (f"{label:<40} n={len(values):<4} p50={statistics.median(values) * 1000:9.1f} ms  "
            f"p95={pct(values, 0.95) * 1000:9.1f} ms  max={max(values) * 1000:9.1f} ms")


def roundtrip(client, code: str = "1+1") -> float:
    start = time.perf_counter()
    client.execute_interactive(code, output_hook=lambda m: None, timeout=120)
    return time.perf_counter() - start


def bench_local(sessions: int, cells: int) -> tuple[list[float], list[float]]:
    starts, rts = [], []
    for _ in range(sessions):
        t0 = time.perf_counter()
        km = KernelManager(kernel_name="python3")
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        starts.append(time.perf_counter() - t0)
        roundtrip(kc)  # warm-up
        rts += [roundtrip(kc) for _ in range(cells)]
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return starts, rts


def bench_sandbox(engine: Engine, sessions: int, cells: int) -> tuple[list[float], list[float]]:
    starts, rts = [], []
    PS.WARM_ENABLED = False  # (a) is the cold start; (c) compares it with the warm one
    for i in range(sessions):
        name = f"bench-py-{i}"
        t0 = time.perf_counter()
        sess = PS.get_session(engine, name)
        starts.append(time.perf_counter() - t0)
        try:
            roundtrip(sess.client)  # warm-up (TCG translates the code path once)
            rts += [roundtrip(sess.client) for _ in range(cells)]
        finally:
            sess.stop()
            PS._sessions.pop(PS._key(engine, name), None)
            PS._remove_workspace(engine, name)
    return starts, rts


FIRST_CELL = "import pandas, matplotlib\n1+1"


class Trace:
    """Wall-clock marks of one warm first result's steps (host side, plus the guest kernel's own marks)."""

    def __init__(self, engine: Engine) -> None:
        from microagent_engine.engine import warm_python

        self.marks: list[tuple[str, float]] = []
        orig_create, orig_start = warm_python.create_warm, Engine.start

        def create_warm(*a, **kw):
            self.mark("create from snapshot: begin")
            orig_create(*a, **kw)
            self.mark("create from snapshot: done")

        def start(eng, *a, **kw):
            out = orig_start(eng, *a, **kw)
            self.mark("workspace started/resumed")
            return out

        warm_python.create_warm = create_warm
        Engine.start = start  # the magic's own engine (same state dir) does the start

    def mark(self, what: str, at: float | None = None) -> None:
        self.marks.append((what, time.time() if at is None else at))

    def report(self, t0: float, kernel) -> str:
        marks = list(self.marks)
        for name, (guest, host) in kernel.steps.items():
            marks.append((f"kernel {name}" + (f" (guest clock {(guest - t0) * 1000:+.0f} ms)" if guest else ""),
                          host))
        marks.sort(key=lambda m: m[1])
        self.marks.clear()
        for log_line in kernel.log:
            if log_line.startswith("microagent-kernel-newmods"):
                marks.append((log_line[:3000], time.time()))
        return "\n".join(f"    {(at - t0) * 1000:8.0f} ms  {what}" for what, at in marks)


def first_result(engine: Engine, warm: bool, n: int, trace: bool = False) -> list[float]:
    """Seconds from ``%%microagent python`` on a notebook without a session to the cell's displayed result."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    # each cell starts its own session (no default session prepared at load_ext: that would make the first cell a
    # different measure, and a cold one warm)
    pool = os.environ.get(POOL_ENV)
    os.environ[POOL_ENV] = "0"
    PS.WARM_ENABLED = warm
    shell.run_line_magic("load_ext", "microagent_jupyter")
    times = []
    tracer = Trace(engine) if trace else None
    here = os.getcwd()
    folder = tempfile.mkdtemp(prefix="ma-bench-nb-")
    Path(folder, "fresh.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n')
    os.chdir(folder)
    try:
        for _ in range(n):
            PS._default_names.clear()  # a fresh notebook kernel: no session yet
            wall0 = time.time()
            t0 = time.perf_counter()
            with capture_output() as cap:
                shell.run_cell_magic("microagent", "python", FIRST_CELL)
            times.append(time.perf_counter() - t0)
            assert cap.outputs[-1].data["text/plain"] == "2", cap.outputs
            sess = next(iter(PS._sessions.values()))
            if tracer is not None:
                tracer.mark("first result displayed")
                print(f"  {'warm' if warm else 'cold'} first result {times[-1] * 1000:.0f} ms:\n"
                      + tracer.report(wall0, sess.kernel), flush=True)
            assert (sess.warm_from is not None) == warm, sess.cold_reason
            PS.stop_all()
    finally:
        os.chdir(here)
        shutil.rmtree(folder, ignore_errors=True)
        PS.WARM_ENABLED = True
        shell.run_line_magic("unload_ext", "microagent_jupyter")
        if pool is None:
            os.environ.pop(POOL_ENV, None)
        else:
            os.environ[POOL_ENV] = pool
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--state-dir", help="reuse this state dir (and its cached Python image)")
    ap.add_argument("--first", type=int, default=3, help="fresh-notebook first results per mode (cold, warm)")
    ap.add_argument("--only-first", action="store_true", help="measure (c) only")
    ap.add_argument("--warm-only", action="store_true", help="(c) for the warm start only (no cold runs)")
    ap.add_argument("--trace", action="store_true", help="print each first result's steps with timestamps")
    args = ap.parse_args()
    if args.trace:
        os.environ["MICROAGENT_KERNEL_TRACE"] = "1"
    engine = Engine(args.state_dir or tempfile.mkdtemp(prefix="ma-bench-py-", dir="/tmp"))
    os.environ[STATE_DIR_ENV] = str(engine.state_dir)  # the magic in (c) makes its own engine: the same state dir
    print("preparing the built-in Python image (cached after the first build) ...", flush=True)
    warm = PS.get_session(engine, "bench-py-warm")  # builds the image if needed; not timed
    warm.stop()
    PS._sessions.clear()
    PS._remove_workspace(engine, "bench-py-warm")

    from microagent_jupyter import warm_python
    print("preparing the warm Python snapshot (built once per image and shape) ...", flush=True)
    snap, why = warm_python.warm_snapshot(engine, warm_python.session_spec())
    if snap is None:
        sys.exit(f"no warm snapshot: {why}")
    cold = [] if args.warm_only else first_result(engine, False, args.first, args.trace)
    warm_t = first_result(engine, True, args.first, args.trace)
    if cold:
        print(line("fresh notebook, first result: cold", cold))
    print(line("fresh notebook, first result: warm", warm_t))
    if cold:
        print(f"ratio first result cold/warm: p50 {statistics.median(cold) / statistics.median(warm_t):.1f}x")
    if args.only_first:
        return
    l_start, l_rt = bench_local(args.sessions, args.cells)
    s_start, s_rt = bench_sandbox(engine, args.sessions, args.cells)
    print(line("local ipykernel: start to ready", l_start))
    print(line("sandbox session: cold start to ready", s_start))
    print(line("local ipykernel: cell round trip (1+1)", l_rt))
    print(line("sandbox session: cell round trip (1+1)", s_rt))
    print(f"ratio cold start sandbox/local: p50 {statistics.median(s_start) / statistics.median(l_start):.1f}x")
    print(f"ratio round trip sandbox/local: p50 {statistics.median(s_rt) / statistics.median(l_rt):.1f}x, "
          f"p95 {pct(s_rt, 0.95) / pct(l_rt, 0.95):.1f}x")


if __name__ == "__main__":
    main()
