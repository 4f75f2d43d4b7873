#!/usr/bin/env python3
"""Engine-core benchmark: our `run` against raw QEMU booting the same kernel + initramfs, in one process.

    (a) raw QEMU: same argv the backend builds, a bare socket server doing HELLO -> CONFIG -> READY -> HALT
    (b) `microagent run --cold -- true` end to end (CLI subprocess: create, cold boot, exec, halt, delete), the
        same work as (a) plus everything the engine adds (jail, network namespace, supervisor, records)
    (b') the same run warm (restored from a template snapshot, the default)
    (c) exec round trip on a running workspace: `true` (fork+exec in the guest) and a PING (no process)
    (d) halt and start latency
    (e) with --trace: where a warm CLI run's time goes, from the marks the CLI, the engine and the supervisor write
        to $MICROAGENT_TRACE (microagent_engine/timeline.py): each step's median offset from the CLI's spawn

Prints min/median/max for each and the ratio (b)/(a).
Usage: python bench/bench_core.py [--boots N] [--execs N] [--trace]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from microagent_engine import Engine  # noqa: E402
from microagent_engine.backends.base import DiskSpec, VMSpec  # noqa: E402
from microagent_engine.guest.initramfs import build_initramfs  # noqa: E402
from microagent_engine.guest.kernel import resolve_kernel  # noqa: E402
from microagent_engine.hostinfo import choose_accel  # noqa: E402
from microagent_engine.protocol import FrameDecoder, FrameType, encode_entries, encode_frame  # noqa: E402
from microagent_engine.timeline import TRACE_ENV, read as read_marks  # noqa: E402


def summary(label: str, values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    v = sorted(x * scale for x in values)
    p95 = v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]
    return (f"{label:<44} n={len(v):<4} min={v[0]:.3f}{unit} median={statistics.median(v):.3f}{unit} "
            f"p95={p95:.3f}{unit} max={v[-1]:.3f}{unit}")


def raw_qemu_boot(engine: Engine, rootfs: Path, workdir: Path) -> float:
    """Spawn QEMU exactly as the backend would, answer the agent ourselves, power off; seconds spawn->exit."""
    accel = choose_accel()
    cfg_kernel = resolve_kernel(engine.state_dir, engine.status("bench").config.kernel)
    initramfs = build_initramfs(engine.state_dir, cfg_kernel, engine.backend.guest_modules())
    socks = {n: workdir / f"{n}.sock" for n in ("agent", "serial", "qmp")}
    listeners = {}
    for n in ("agent", "serial"):
        socks[n].unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(socks[n]))
        s.listen(1)
        listeners[n] = s
    spec = VMSpec(kernel=cfg_kernel.path, initramfs=initramfs,
                  cmdline=" ".join(engine.backend.kernel_args(accel) + ["microagent.root=/dev/vda"]),
                  memory_mib=512, cpus=2, disks=[DiskSpec(rootfs)], agent_socket=socks["agent"],
                  serial_socket=socks["serial"], control_socket=socks["qmp"], network="user", accel=accel)
    t0 = time.perf_counter()
    proc = subprocess.Popen(engine.backend.command(spec), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    serial, _ = listeners["serial"].accept()
    agent, _ = listeners["agent"].accept()
    dec = FrameDecoder()
    done = False
    while not done:
        data = agent.recv(65536)
        if not data:
            break
        for f in dec.feed(data):
            if f.type == FrameType.HELLO:
                agent.sendall(encode_frame(FrameType.CONFIG, 0, encode_entries(
                    [("h", "raw"), ("n", "user"), ("s", "/bin/sh")])))
            elif f.type == FrameType.READY:
                agent.sendall(encode_frame(FrameType.HALT, 0, b"poweroff"))
                done = True
    while proc.poll() is None:  # keep draining the console so QEMU never blocks on it
        serial.settimeout(0.05)
        try:
            serial.recv(65536)
        except OSError:
            pass
    elapsed = time.perf_counter() - t0
    for s in (serial, agent, *listeners.values()):
        s.close()
    return elapsed


def trace_warm_runs(cli: list[str], env: dict[str, str], runs: int, state: Path) -> None:
    """(e): ``runs`` warm ``run -- true`` with the steps' marks on; each step's median offset from the spawn."""
    offsets: dict[str, list[float]] = {}
    order: list[str] = []
    for i in range(runs):
        path = state / f"trace-{i}.txt"
        t0 = time.time()
        subprocess.run(cli + ["run", "--delete", "--", "true"], env={**env, TRACE_ENV: str(path)}, check=True,
                       capture_output=True)
        marks = [(at, label) for at, _pid, label in read_marks(path)] + [(time.time(), "CLI exited")]
        for at, label in marks:
            if label not in offsets:
                order.append(label)
            offsets.setdefault(label, []).append(at - t0)
    print(f"(e) a warm `run -- true`, {runs} runs: median offset from the CLI's spawn, and the step before it")
    previous = 0.0
    for label in order:
        at = statistics.median(offsets[label])
        print(f"    {at * 1000:7.1f} ms  (+{(at - previous) * 1000:6.1f})  {label}")
        previous = at


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=5, help="boots per boot measurement (default 5)")
    ap.add_argument("--execs", type=int, default=200, help="exec round trips (default 200)")
    ap.add_argument("--trace", action="store_true", help="also: where a warm run's time goes (--boots more runs)")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp"))
    env = {**os.environ, "MICROAGENT_STATE_DIR": str(state)}
    engine = Engine(state)
    cli = [sys.executable, "-m", "microagent_engine"]
    try:
        engine.create("bench", profile="small")
        accel = choose_accel()
        print(f"host: {os.cpu_count()} cpus, accel={accel.accel} ({accel.reason}), "
              f"{engine.backend.version()}")
        work = state / "raw"
        work.mkdir()
        rootfs = work / "rootfs.ext4"
        shutil.copy(engine.status("bench").dir.rootfs, rootfs)
        raw_qemu_boot(engine, rootfs, work)  # warm caches (initramfs build, page cache)
        subprocess.run(cli + ["run", "--delete", "--", "true"], env=env, check=True, capture_output=True)

        raw, run, warm = [], [], []
        for _ in range(args.boots):  # interleave so drift in host load hits all alike
            raw.append(raw_qemu_boot(engine, rootfs, work))
            t0 = time.perf_counter()
            subprocess.run(cli + ["run", "--cold", "--delete", "--", "true"], env=env, check=True, capture_output=True)
            run.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run(cli + ["run", "--delete", "--", "true"], env=env, check=True, capture_output=True)
            warm.append(time.perf_counter() - t0)

        engine.start("bench")
        execs = [engine.exec("bench", ["true"]).duration for _ in range(args.execs)]
        with engine.connection("bench") as conn:
            pings = [conn.ping() for _ in range(args.execs)]
        halts, starts = [], []
        for _ in range(args.boots):
            t0 = time.perf_counter()
            engine.halt("bench")
            halts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.start("bench")
            starts.append(time.perf_counter() - t0)
        engine.kill("bench")

        print(summary("(a) raw QEMU boot -> agent ready -> off", raw))
        print(summary("(b) microagent run --cold -- true (end to end)", run))
        print(f"{'ratio (b)/(a) of medians':<44} {statistics.median(run) / statistics.median(raw):.3f}")
        print(summary("(b') microagent run -- true (warm, default)", warm))
        label = "ratio (b)/(b') of medians (cold/warm)"
        print(f"{label:<44} {statistics.median(run) / statistics.median(warm):.3f}")
        print(summary("(c) exec `true` round trip", execs, "ms", 1000))
        print(summary("(c) agent PING round trip (no fork)", pings, "ms", 1000))
        print(summary("(d) halt", halts))
        print(summary("(d) start (to exec-ready)", starts))
        if args.trace:
            trace_warm_runs(cli, env, args.boots, state)
    finally:
        for info in engine.list():
            if info.dir.supervisor_alive():
                engine.kill(info.name)
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
