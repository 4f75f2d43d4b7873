#!/usr/bin/env python3
"""Storage benchmark: each engine operation against the raw e2fsprogs/tar baseline, in one process.

    volume create 2 GiB           vs  truncate + mkfs.ext4 (same options)
    bundle from a 100 MiB tar     vs  tar -x + mkfs.ext4 -d of the same tree
    cp 100 MiB in / out           vs  debugfs -w "write" / debugfs "dump"
    image pull + rootfs build     vs  curl-less baseline: tar -x of the layer + mkfs.ext4 -d
      (a ~100 MB image pushed to Debian's docker-registry on 127.0.0.1)

Prints min/median/max per side and the ratio of medians. Usage: python bench/bench_storage.py [--runs N]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from microagent_engine import Engine  # noqa: E402
from microagent_engine.images.store import ImageStore  # noqa: E402
from microagent_engine.storage import debugfs  # noqa: E402
from microagent_engine.storage.bundles import build_bundle  # noqa: E402
from microagent_engine.storage.ext4 import MKFS_OPTS, make_ext4  # noqa: E402
from registry_fixture import LAYER_GZIP, Image, Registry, sha  # noqa: E402

MIB = 1 << 20


def timed(fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None) -> list[float]:
    out = []
    for _ in range(runs):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def line(label: str, ours: list[float], base: list[float]) -> None:
    def fmt(v: list[float]) -> str:
        return f"min={min(v):.3f}s median={statistics.median(v):.3f}s max={max(v):.3f}s"
    print(f"{label:<34} ours   {fmt(ours)}")
    print(f"{'':<34} base   {fmt(base)}")
    print(f"{'':<34} ratio  {statistics.median(ours) / statistics.median(base):.2f}")


def raw_tar_to_ext4(archive: Path, dest: Path, image: Path, size_mib: int) -> None:
    """The baseline for bundles and image builds: GNU tar into a fresh directory, then mkfs.ext4 -d."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    subprocess.run(["tar", "-C", str(dest), "-xf", str(archive)], check=True)  # tar detects gzip itself
    make_ext4(image, size_mib, dest)


def make_tree(root: Path, total_mib: int) -> None:
    """A tree like a project: many small files plus some large ones, ~total_mib of incompressible data."""
    root.mkdir(parents=True)
    for i in range(total_mib // 4):
        (root / f"blob{i}.bin").write_bytes(os.urandom(4 * MIB - 4096))
    for d in range(20):
        sub = root / f"src{d}"
        sub.mkdir()
        for f in range(50):
            (sub / f"mod{f}.py").write_bytes(os.urandom(2048))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ma-bench-storage-", dir="/var/tmp"))
    try:
        engine = Engine(work / "state")
        n = [0]

        def fresh_name() -> str:
            n[0] += 1
            return f"v{n[0]}"

        ours = timed(lambda: engine.volumes.create(fresh_name(), size_mib=2048), args.runs)

        def raw_mkfs() -> None:
            img = work / f"raw{n[0]}.ext4"
            n[0] += 1
            with open(img, "wb") as fh:
                fh.truncate(2048 * MIB)
            subprocess.run(["mkfs.ext4", *MKFS_OPTS, str(img)], check=True, capture_output=True)
        base = timed(raw_mkfs, args.runs)
        line("volume create 2 GiB", ours, base)

        tree = work / "tree"
        make_tree(tree, 100)
        tar = work / "ctx.tar"
        with tarfile.open(tar, "w") as tf:
            tf.add(tree, arcname=".")
        out = work / "bundle.ext4"
        ours = timed(lambda: build_bundle(tar, out, work), args.runs)

        base = timed(lambda: raw_tar_to_ext4(tar, work / "x", work / "raw-bundle.ext4", 160), args.runs)
        line(f"bundle {tar.stat().st_size // MIB} MiB tar", ours, base)

        disk = work / "cp.ext4"
        make_ext4(disk, 512)
        big = work / "big.bin"
        big.write_bytes(os.urandom(100 * MIB))
        ours = timed(lambda: debugfs.copy_in(disk, big, "/data/big.bin"), args.runs)

        def raw_write() -> None:
            subprocess.run(["debugfs", "-w", "-R", "rm /data/big.bin", str(disk)], capture_output=True)
            subprocess.run(["debugfs", "-w", "-R", f"write {big} /data/big.bin", str(disk)], capture_output=True)
        base = timed(raw_write, args.runs)
        line("cp 100 MiB in", ours, base)
        back = work / "back.bin"
        ours = timed(lambda: debugfs.copy_out(disk, "/data/big.bin", back), args.runs, lambda: back.unlink(True))
        base = timed(lambda: subprocess.run(["debugfs", "-R", f"dump /data/big.bin {back}", str(disk)],
                                            capture_output=True), args.runs, lambda: back.unlink(True))
        assert back.read_bytes() == big.read_bytes()
        line("cp 100 MiB out", ours, base)

        reg = Registry(work / "registry").start()
        try:
            layer_tar = work / "layer.tar"
            with tarfile.open(layer_tar, "w") as tf:
                tf.add(tree, arcname=".")
            raw = layer_tar.read_bytes()
            layer = gzip.compress(raw, compresslevel=1)
            reg.push_image("bench/img", "v1", Image([(LAYER_GZIP, layer)], diff_ids=[sha(raw)]))
            ref = f"{reg.host}/bench/img:v1"
            k = [0]

            def pull() -> None:
                k[0] += 1
                ImageStore(work / f"pull{k[0]}").ensure(ref)
            ours = timed(pull, args.runs)
            gz_file = work / "layer.tar.gz"
            gz_file.write_bytes(layer)

            base = timed(lambda: raw_tar_to_ext4(gz_file, work / "y", work / "raw-image.ext4", 200), args.runs)
            line(f"image pull+build ({len(layer) // MIB} MiB gz)", ours, base)
        finally:
            reg.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
