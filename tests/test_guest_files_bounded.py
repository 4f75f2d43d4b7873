"""Guest files reach the host disk with their holes and in bounded memory; over the cap, nothing is written.

The workspace is real (created by the engine, never booted: cp, output get and commit read a stopped
workspace's ext4 with debugfs); the sparse files are put into its rootfs with debugfs itself, as a guest's
``truncate -s 3G`` and ``fallocate`` would leave them. Host figures come from the real CLI in a subprocess:
peak RSS from ``getrusage(RUSAGE_CHILDREN)`` (the CLI and every debugfs it waited for), disk from ``st_blocks``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from microagent_engine import Engine
from microagent_engine.hostinfo import require_tool
from microagent_engine.model import Output

GIB = 1 << 30
BIG = 3 * GIB
MARK = b"guest-data-in-the-middle"
MARK_AT = BIG // 2 + 12345
RSS_BOUND = 256 << 20  # the CLI (Python, imports) peaks near 30 MiB; a 3 GiB file read whole takes over 3 GiB
DISK_BOUND = 64 << 20


def _debugfs_w(image: Path, *requests: str) -> None:
    for req in requests:
        proc = subprocess.run([require_tool("debugfs"), "-w", "-R", req, str(image)], capture_output=True, text=True)
        errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")
                  and not ln.startswith("Allocated inode")]
        assert proc.returncode == 0 and not errors, (req, proc.stderr)


@pytest.fixture(scope="module")
def sparse_ws(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A stopped workspace whose rootfs holds /big (3 GiB, one 4 KiB block of data) and /fa (8 MiB unwritten)."""
    name = "sparse"
    engine.create(name, profile="tiny", outputs=[Output("big", "/big"), Output("fa", "/fa")])
    src = tmp_path_factory.mktemp("src") / "big"
    with open(src, "wb") as fh:
        fh.truncate(BIG)
        fh.seek(MARK_AT)
        fh.write(MARK)
    assert os.stat(src).st_blocks * 512 <= 8192
    image = engine.status(name).dir.rootfs
    _debugfs_w(image, f"write {src} big", "write /dev/null fa", "fallocate /fa 0 2047", "sif /fa size 8388608")
    stat = subprocess.run([require_tool("debugfs"), "-R", "stat /fa", str(image)], capture_output=True, text=True)
    assert "[u]" in stat.stdout, stat.stdout  # really unwritten extents, not holes
    src.unlink()
    yield name
    engine.delete(name)


def measured(state_dir: Path, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the real CLI; return it and the peak RSS (bytes) of it and every process it waited for."""
    proc, rss, _ = measured_with_disk(state_dir, *args, cwd=cwd, watch=None)
    return proc, rss


def measured_with_disk(state_dir: Path, *args: str, cwd: Path,
                       watch: Path | None) -> tuple[subprocess.CompletedProcess[str], int, int]:
    """:func:`measured`, plus the largest growth of the disk used under ``watch`` seen while it ran (sampled, so it
    can only under-state a peak; a 3 GiB temp file written at disk speed is seen)."""
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)\n"
             "sys.exit(p.returncode)\n")
    env = {**os.environ, "MICROAGENT_STATE_DIR": str(state_dir), "PYTHONPATH": str(Path(__file__).parent.parent)}
    before = allocated(watch) if watch else 0
    peak = 0
    with subprocess.Popen([sys.executable, "-c", probe, sys.executable, "-m", "microagent_engine", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd) as popen:
        while watch and popen.poll() is None:
            peak = max(peak, allocated(watch) - before)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.2)  # pace the sampling; returns as soon as the CLI ends
        out, err_text = popen.communicate(timeout=1800)
    *err, rss = err_text.rstrip("\n").split("\n")
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, "\n".join(err))
    return proc, int(rss), peak


def allocated(root: Path) -> int:
    """Bytes of host disk used under ``root`` (st_blocks)."""
    if root.is_file():
        return os.stat(root).st_blocks * 512
    total = 0
    for d, _, fs in os.walk(root):
        for f in fs:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:  # a build directory being removed while we walk it
                pass
    return total


def check_sparse_copy(path: Path) -> None:
    st = os.stat(path)
    assert st.st_size == BIG
    assert st.st_blocks * 512 <= 64 << 10, f"{st.st_blocks * 512} bytes allocated for a 4 KiB guest file"
    with open(path, "rb") as fh:
        for off in (0, GIB, BIG - 4096, MARK_AT - 4096):  # sampled: holes read back as zeros
            fh.seek(off)
            assert fh.read(4096) == bytes(4096)
        fh.seek(MARK_AT)
        assert fh.read(len(MARK)) == MARK


def test_cp_out_keeps_holes_in_bounded_memory(state_dir: Path, sparse_ws: str, tmp_path: Path) -> None:
    proc, rss = measured(state_dir, "cp", f"{sparse_ws}:/big", str(tmp_path / "big"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_sparse_copy(tmp_path / "big")
    assert rss < RSS_BOUND, f"cp peaked at {rss >> 20} MiB RSS"
    print(f"cp: peak RSS {rss >> 20} MiB, {allocated(tmp_path / 'big')} bytes on the host disk")
    proc, _ = measured(state_dir, "cp", f"{sparse_ws}:/fa", str(tmp_path / "fa"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    st = os.stat(tmp_path / "fa")
    assert st.st_size == 8 << 20 and st.st_blocks == 0  # unwritten extents come out as holes
    assert (tmp_path / "fa").read_bytes() == bytes(8 << 20)


def test_output_get_keeps_holes_in_bounded_memory(state_dir: Path, sparse_ws: str, tmp_path: Path) -> None:
    proc, rss = measured(state_dir, "output", "get", sparse_ws, "big", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_sparse_copy(tmp_path / "big")
    assert rss < RSS_BOUND, f"output get peaked at {rss >> 20} MiB RSS"
    print(f"output get DEST: peak RSS {rss >> 20} MiB, {allocated(tmp_path / 'big')} bytes on the host disk")
    # without a destination the bytes are held in memory: refused by size, before reading
    proc, rss = measured(state_dir, "output", "get", sparse_ws, "big", cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout
    assert "3.0 GiB (3221225472 bytes), over the copy cap of 64.0 MiB" in proc.stderr, proc.stderr
    assert "give a host destination (DEST)" in proc.stderr and "Traceback" not in proc.stderr
    assert rss < RSS_BOUND, f"output get (stdout) peaked at {rss >> 20} MiB RSS"


def test_copy_over_the_cap_is_refused_and_leaves_nothing(state_dir: Path, sparse_ws: str, tmp_path: Path) -> None:
    for args in (["cp", f"{sparse_ws}:/big", str(tmp_path / "big")],
                 ["output", "get", sparse_ws, "big", str(tmp_path)]):
        proc, _ = measured(state_dir, *args, "--max-size", "2G", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert ("/big is 3.0 GiB (3221225472 bytes), over the copy cap of 2.0 GiB; nothing was copied. "
                "Raise the cap with --max-size (e.g. --max-size 3G)") in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(tmp_path.iterdir()) == []  # no file, no temp file
    proc, _ = measured(state_dir, "cp", "--max-size", "3G", f"{sparse_ws}:/big", str(tmp_path / "big"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc, _ = measured(state_dir, "cp", "--max-size", "lots", f"{sparse_ws}:/big", str(tmp_path / "b2"), cwd=tmp_path)
    assert proc.returncode == 2 and "--max-size 'lots' is not a size" in proc.stderr, proc.stderr


def test_commit_streams_its_layer(state_dir: Path, sparse_ws: str, tmp_path: Path) -> None:
    committed = state_dir / "committed"
    layouts = sorted(committed.iterdir()) if committed.exists() else []
    proc, _ = measured(state_dir, "commit", sparse_ws, "local/sparse:v1", "--max-size", "2G", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"the files of this rootfs add up to 3\.0 GiB \(\d+ bytes; largest /big, 3\.0 GiB\), over the "
                     r"commit cap of 2\.0 GiB; nothing was committed\. Raise the cap with --max-size \(e\.g\. "
                     r"--max-size 4G\)", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(committed.iterdir()) == layouts  # no layout, no temp dir
    before = allocated(state_dir)
    proc, rss, peak = measured_with_disk(state_dir, "commit", sparse_ws, "local/sparse:v1", cwd=tmp_path,
                                         watch=state_dir)
    assert proc.returncode == 0, proc.stderr
    grown = allocated(state_dir) - before
    print(f"commit: peak RSS {rss >> 20} MiB, state dir grew {grown} bytes (peak seen {peak})")
    assert rss < RSS_BOUND, f"commit peaked at {rss >> 20} MiB RSS"
    assert max(grown, peak) < DISK_BOUND, f"commit used {max(grown, peak)} bytes of host disk for 4 KiB of data"


def test_commit_tar_of_holey_and_hardlinked_files(tmp_path: Path) -> None:
    """The streamed layer tar holds a holey file's exact bytes once, its second name as a hardlink."""
    import tarfile

    from microagent_engine.images.commit import rootfs_to_tar
    from microagent_engine.storage.ext4 import make_ext4

    image = tmp_path / "root.ext4"
    make_ext4(image, 32)
    src = tmp_path / "holey"
    with open(src, "wb") as fh:
        fh.seek(5 << 20)
        fh.write(MARK)
    _debugfs_w(image, f"write {src} holey", "ln holey again", "sif holey links_count 2", "write /dev/null fa",
               "fallocate /fa 0 255", "sif /fa size 1048576")
    with open(tmp_path / "layer.tar", "wb") as out:
        rootfs_to_tar(image, out, tmp_path / "work")
    with tarfile.open(tmp_path / "layer.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert {members["holey"].type, members["again"].type} == {tarfile.REGTYPE, tarfile.LNKTYPE}
        reg = members["holey"] if members["holey"].isreg() else members["again"]
        assert tf.extractfile(reg).read() == src.read_bytes()  # type: ignore[union-attr]
        assert tf.extractfile("fa").read() == bytes(1 << 20)  # type: ignore[union-attr]
