#!/usr/bin/env python3
"""One-shot Python runs: `microagent run builtin:python python3 -c CELL` warm against the same run without the warm
snapshot and against the host's own python3, interleaved in one process.

    (a) host: `python3 -c CELL` on this machine (this venv's python3, with the same packages), as a reference
    (b) `microagent run --delete --network isolated builtin:python python3 -c CELL`, MICROAGENT_WARM_PYTHON=0: the
        workspace restored from the machine-shape template, then a fresh python3 importing what CELL imports
    (c) the same run warm (the default): a clone of the warm Python snapshot, CELL run in a fork of the process
        that already imported pandas and matplotlib
    (c') warm runs back to back, none of (b) between them: (b) builds a 1.2 GiB root disk from the image each time
        and reads the guest's files anew, which the run after it pays for in the host's page cache

End to end through the CLI (create, jail, restore, exec, kill, delete). The warm snapshot is prepared before the
timed runs (its one-off build time is printed). Usage: python bench/bench_oneshot.py [--runs N] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from python_state import add_state_dir, prepared  # noqa: E402

CELLS = {
    "pandas": "import pandas as pd; print(pd.DataFrame({'a': [1, 2, 3]}).describe().loc['mean', 'a'])",
    "print": "print(1)",
}


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}… failed ({r.returncode}): {r.stderr.decode()[-800:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    add_state_dir(ap)
    args = ap.parse_args()
    from microagent_engine.engine import warm_python

    state, _snap = prepared(args.state_dir, "bench-oneshot-")
    cli = [sys.executable, "-m", "microagent_engine", "--state-dir", str(state), "run", "--delete",
           "--network", "isolated", "builtin:python", "python3", "-c"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cold_env = {**env, warm_python.ENABLED_ENV: "0"}
    for label, cell in CELLS.items():
        host, cold, warm = [], [], []
        timed(cli + [cell], env)  # one untimed warm run (the first restore maps the snapshot's files)
        for _ in range(args.runs):
            host.append(timed([sys.executable, "-c", cell], env))
            cold.append(timed(cli + [cell], cold_env))
            warm.append(timed(cli + [cell], env))
        series = [timed(cli + [cell], env) for _ in range(args.runs)]
        m = {k: statistics.median(v) for k, v in (("host", host), ("cold", cold), ("warm", warm), ("series", series))}
        print(f"\n{label}: {cell}")
        for key, what, values in (("host", "(a) host python3", host), ("cold", "(b) run, no warm snapshot", cold),
                                  ("warm", "(c) run, warm snapshot", warm),
                                  ("series", "(c') warm, back to back", series)):
            print(f"  {what:<30} min {min(values):6.2f} s  median {m[key]:6.2f} s  max {max(values):6.2f} s")
        print(f"  ratio (b)/(c): warm is {m['cold'] / m['warm']:.1f}x faster ((b)/(c'): {m['cold'] / m['series']:.1f}x); "
              f"(c)/(a): {m['warm'] / m['host']:.1f}x the host's python3")


if __name__ == "__main__":
    main()
