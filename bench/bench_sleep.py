#!/usr/bin/env python3
"""Scale to zero: what idle Python workspaces cost the host awake and asleep, and how fast the next exec wakes one.

    PYTHONPATH=. python bench/bench_sleep.py [--sessions 20] [--state-dir DIR]

Each session is a clone of the warm Python snapshot (the zygote with pandas and matplotlib imported, as a notebook's
session or kernel starts from) that has run one pandas cell and then sits idle. In one run:

    (a) host memory of the idle sessions awake: PSS of each one's QEMU, supervisor and jail launcher
    (b) ``Engine.sleep`` of each: its memory saved to a file, QEMU ended, the supervisor (every stream and port)
        left; host memory after (processes left), the bytes each keeps on disk, the time each sleep took
    (c) the next exec (``python3 -c 'print(1)'`` through the zygote) on a sleeping session: wake + run, end to end,
        against the same exec on an awake session (the baseline, same run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from python_state import add_state_dir, prepared  # noqa: E402

CELL = "import pandas as pd; print(pd.DataFrame({'a': [1, 2, 3]}).a.sum())"


def stats(values: list[float]) -> str:
    v = sorted(values)
    return (f"n={len(v):<3} min {v[0]:.3f} s  median {statistics.median(v):.3f} s  "
            f"p95 {v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]:.3f} s  max {v[-1]:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    add_state_dir(ap)
    args = ap.parse_args()
    from bench_warm import pids, pss_kib
    from microagent_engine import Engine
    from microagent_engine.engine import warm_python

    state, snap = prepared(args.state_dir, "bench-sleep-")
    engine = Engine(state)
    names = [f"sleep-bench-{i}" for i in range(args.sessions)]
    run = warm_python.run_argv
    try:
        for name in names:
            engine.create(name, from_snapshot=snap)
            engine.start(name)
            r = engine.exec(name, run(["python3", "-c", CELL]))
            assert r.exit_code == 0 and r.stdout == b"6\n", r
        time.sleep(2)  # let each settle into idle
        awake = sum(pss_kib(p) for n in names for p in pids(engine, n))
        # the baseline: the same exec on an awake session (every one but the first, which wakes below)
        baseline = []
        for name in names[1:]:
            t0 = time.monotonic()
            engine.exec(name, run(["python3", "-c", "print(1)"]))
            baseline.append(time.monotonic() - t0)
        sleeps = []
        for name in names:
            t0 = time.monotonic()
            engine.sleep(name)
            sleeps.append(time.monotonic() - t0)
        left = [p for n in names for p in pids(engine, n)]
        asleep = sum(pss_kib(p) for p in left)
        on_disk = [(engine.status(n).dir.run_dir / "sleep-state").stat().st_size for n in names]
        wakes = []
        for name in names:
            t0 = time.monotonic()
            r = engine.exec(name, run(["python3", "-c", "print(1)"]))  # wakes it
            wakes.append(time.monotonic() - t0)
            assert r.stdout == b"1\n" and engine.status(name).state.state == "running", r
        print(f"\n{args.sessions} idle Python sessions (clones of {snap}, one pandas cell each):")
        print(f"(a) awake:  host memory {awake / 1024:.0f} MiB PSS, {awake / 1024 / len(names):.1f} MiB each")
        print(f"(b) asleep: host memory {asleep / 1024:.1f} MiB PSS ({len(left)} processes left: the supervisors, "
              f"{asleep / 1024 / len(names):.1f} MiB each); "
              f"{statistics.median(on_disk) / 2**20:.0f} MiB each on disk (median)")
        print(f"    sleep:  {stats(sleeps)}")
        print(f"(c) next exec, asleep (wake + run): {stats(wakes)}")
        print(f"    next exec, awake (baseline):    {stats(baseline)}")
        print(f"    ratio asleep/awake of medians: {statistics.median(wakes) / statistics.median(baseline):.2f}")
    finally:
        for name in names:
            try:
                engine.kill(name)
            except Exception:
                pass
            try:
                engine.delete(name)
            except Exception:
                pass


if __name__ == "__main__":
    main()
