"""Cold vs warm start, and what idle tiny workspaces cost the host (real VMs; TCG here).

    PYTHONPATH=. python bench/bench_warm.py [--runs 5] [--idle 20] [--state-dir DIR]

Prints, in one run: ``run -- true`` end to end cold and warm (median), start to exec-ready cold and warm, host
memory (PSS of QEMU + supervisor + jail launcher) of one idle tiny workspace and per workspace with ``--idle`` of
them running at once (each answering an exec), and the CPU they use while idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from microagent_engine import Engine


def pss_kib(pid: int | None) -> int:
    if not pid:
        return 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int | None) -> int:
    if not pid:
        return 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def parent(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def pids(engine: Engine, name: str) -> list[int]:
    st = engine.status(name).state
    return [p for p in (st.vm_pid, st.supervisor_pid, parent(st.vm_pid)) if p]


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=int, default=20, help="idle tiny workspaces at once")
    ap.add_argument("--state-dir")
    args = ap.parse_args()
    engine = Engine(Path(args.state_dir or tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp")))
    tiny = {"profile": "tiny", "network": "none"}
    engine.run(["true"], delete=True, **tiny)  # builds the image, kernel, initramfs and the template

    runs: dict[str, list[float]] = {"cold": [], "warm": []}
    starts: dict[str, list[float]] = {"cold": [], "warm": []}
    for i in range(args.runs):
        for mode in ("cold", "warm"):
            runs[mode].append(timed(lambda: engine.run(["true"], delete=True, cold=mode == "cold", **tiny)))
            name = f"b-{mode}-{i}"
            engine.create(name, **tiny)
            starts[mode].append(timed(lambda: (engine.start(name, cold=mode == "cold"), engine.exec(name, ["true"]))))
            engine.kill(name)
            engine.delete(name)
    med = {k: statistics.median(v) for k, v in runs.items()}
    smed = {k: statistics.median(v) for k, v in starts.items()}
    print(f"run -- true        cold {med['cold']:.2f} s  warm {med['warm']:.2f} s  ({med['cold'] / med['warm']:.1f}x)")
    ratio = smed["cold"] / smed["warm"]
    print(f"start to exec      cold {smed['cold']:.2f} s  warm {smed['warm']:.2f} s  ({ratio:.1f}x)")

    for mode in ("cold", "warm"):
        engine.create(f"one-{mode}", **tiny)
        engine.start(f"one-{mode}", cold=mode == "cold")
        engine.exec(f"one-{mode}", ["true"])
    time.sleep(3)
    one = {m: sum(pss_kib(p) for p in pids(engine, f"one-{m}")) / 1024 for m in ("cold", "warm")}
    print(f"one idle tiny ws   cold {one['cold']:.0f} MiB PSS  warm {one['warm']:.0f} MiB PSS "
          f"({one['cold'] / one['warm']:.1f}x)")
    for m in ("cold", "warm"):
        engine.kill(f"one-{m}")
        engine.delete(f"one-{m}")

    names = [f"idle-{i}" for i in range(args.idle)]
    t0 = time.monotonic()
    for name in names:
        engine.create(name, **tiny)
        engine.start(name)
    boot_all = time.monotonic() - t0
    time.sleep(5)
    all_pids = [p for n in names for p in pids(engine, n)]
    ticks0, w0 = sum(cpu_ticks(p) for p in all_pids), time.monotonic()
    time.sleep(10)
    ticks1, w1 = sum(cpu_ticks(p) for p in all_pids), time.monotonic()
    total = sum(pss_kib(p) for p in all_pids) / 1024
    cpu = (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / (w1 - w0) * 100
    ok = sum(engine.exec(n, ["true"]).exit_code == 0 for n in names)
    print(f"{args.idle} idle tiny ws  started in {boot_all:.1f} s; {total:.0f} MiB PSS total, "
          f"{total / args.idle:.0f} MiB each; idle CPU {cpu:.1f} % of one core ({cpu / args.idle:.2f} % each); "
          f"{ok}/{args.idle} answered an exec")
    for name in names:
        engine.kill(name)
        engine.delete(name)


if __name__ == "__main__":
    main()
