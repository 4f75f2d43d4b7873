"""The seeds' storage walkthrough, end to end in real VMs: volumes, bundles, disks, cp, outputs, single-attach."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, InvalidState, NotFound
from microagent_engine.model import parse_output_flag, parse_volume_flag
from microagent_engine.storage.ext4 import overhead_clusters, superblock_fields

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def data_volume(engine: Engine):
    vol = engine.volumes.create("data", size_mib=64)
    yield vol
    for info in engine.list():
        if info.dir.supervisor_alive():
            engine.kill(info.name)
    engine.volumes.delete("data", force=True)


def test_counter_survives_one_shot_runs(cli, data_volume, state_dir: Path) -> None:
    proc = cli("volume", "list")
    assert ["data", "64", "-"] in [line.split() for line in proc.stdout.decode().splitlines()[1:]]
    before = set((state_dir / "workspaces").glob("*"))
    proc = cli("run", "--delete", "--profile", "tiny", "-v", "data:/work", "--", "sh", "-c",
               "echo 42 > /work/counter.txt")
    assert proc.returncode == 0, proc.stderr
    proc = cli("run", "--delete", "--profile", "tiny", "-v", "data:/work", "--", "cat", "/work/counter.txt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"42\n"
    # run --delete left no workspace behind, but the volume kept its data (read back on the host)
    assert set((state_dir / "workspaces").glob("*")) == before
    dump = subprocess.run(["debugfs", "-R", "cat /counter.txt", str(data_volume.path)], capture_output=True)
    assert dump.stdout == b"42\n"
    status = cli("volume", "status", "data").stdout.decode().splitlines()
    assert status[0] == "Name: data" and status[1] == "Size: 64 MiB"
    assert status[3].startswith("Attached: run-") and status[4] == f"Path: {data_volume.path}"


def test_bundle_read_in_guest(cli, tmp_path: Path) -> None:
    config_dir = tmp_path / "config-dir"
    config_dir.mkdir()
    (config_dir / "hello.txt").write_text("bundled file\n")
    tar = tmp_path / "config.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(config_dir, arcname=".")
    proc = cli("run", "--delete", "--profile", "tiny", "--bundle", f"config={tar}:/config:ro",
               "--exec", "cat /config/hello.txt; touch /config/x 2>&1 || echo read-only")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("bundled file\n")
    assert "read-only" in proc.stdout.decode() or "Read-only" in proc.stdout.decode()
    # the -v alias takes the same tar
    proc = cli("run", "--delete", "--profile", "tiny", "-v", f"{tar}:/ctx:ro", "--", "cat", "/ctx/hello.txt")
    assert proc.stdout == b"bundled file\n", proc.stderr


def test_cp_in_before_start_and_out_after_halt(engine: Engine, cli, data_volume, tmp_path: Path) -> None:
    app = tmp_path / "app.conf"
    app.write_text("config-v1\n")
    proc = cli("create", "scratch", "--profile", "tiny", "-v", "data:/work")
    assert proc.returncode == 0, proc.stderr
    # its rootfs (a copy of the image grown to 512 MiB) has the overhead the guest's kernel would count: with it
    # zeroed here, the kernel counts it at this first mount and writes the same number (checked after the halt)
    rootfs = engine.status("scratch").dir.rootfs
    recorded = superblock_fields(rootfs)["Overhead clusters"]
    assert int(recorded) == overhead_clusters(superblock_fields(rootfs))
    subprocess.run(["debugfs", "-w", "-R", "ssv overhead_clusters 0", str(rootfs)], check=True, capture_output=True)
    proc = cli("cp", str(app), "scratch:/etc/app.conf")
    assert proc.returncode == 0, proc.stderr
    engine.start("scratch")
    r = engine.exec("scratch", ["cat", "/etc/app.conf", "/work/counter.txt"])
    assert r.stdout == b"config-v1\n42\n"
    # while it runs, cp goes through the guest agent: in (written beside, then renamed) and out (bounded)
    (tmp_path / "live.txt").write_text("live-in\n")
    proc = cli("cp", str(tmp_path / "live.txt"), "scratch:/work/in/")  # WS:/dir/: the file goes inside it
    assert proc.returncode == 0, proc.stderr
    assert engine.exec("scratch", ["cat", "/work/in/live.txt"]).stdout == b"live-in\n"
    proc = cli("cp", str(tmp_path / "live.txt"), "scratch:/work/in")  # an existing directory: inside it too
    assert proc.returncode == 0 and proc.stdout.strip().endswith(b"/work/in/live.txt"), proc.stdout
    engine.exec("scratch", ["sh", "-c", "head -c 300000 /dev/zero > /tmp/big; echo out > /tmp/small"])
    assert cli("cp", "scratch:/tmp/small", str(tmp_path)).returncode == 0
    assert (tmp_path / "small").read_text() == "out\n"
    proc = cli("cp", "--max-size", "100K", "scratch:/tmp/big", str(tmp_path))
    assert proc.returncode != 0 and b"larger than 102400 bytes" in proc.stderr and b"Traceback" not in proc.stderr
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".microagent-cp-*"))  # nothing half-written
    proc = cli("cp", "scratch:/no/such", str(tmp_path / "x"))
    assert proc.returncode != 0 and b"not a regular file" in proc.stderr and not (tmp_path / "x").exists()
    engine.exec("scratch", ["sh", "-c", "echo config-v2 > /etc/app.conf; echo 43 > /work/counter.txt"])
    engine.halt("scratch")
    assert superblock_fields(rootfs)["Overhead clusters"] == recorded  # what the kernel counted
    out = tmp_path / "app.conf.out"
    assert cli("cp", "scratch:/etc/app.conf", str(out)).returncode == 0
    assert out.read_text() == "config-v2\n"
    assert cli("cp", "scratch:data:/counter.txt", str(tmp_path)).returncode == 0
    assert (tmp_path / "counter.txt").read_text() == "43\n"
    proc = cli("cp", "scratch:/no/such/file", str(tmp_path / "x"))
    assert proc.returncode == 1 and b"does not exist" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = cli("cp", "scratch:nodisk:/f", str(tmp_path / "x"))
    assert b"no disk named 'nodisk'" in proc.stderr
    assert cli("delete", "scratch", "--yes").returncode == 0


def test_single_attach_fails_closed_then_succeeds(engine: Engine, cli, data_volume) -> None:
    engine.create("holder-a", profile="tiny", attachments=[parse_volume_flag("data:/work")])
    engine.create("holder-b", profile="tiny", attachments=[parse_volume_flag("data:/work")])
    engine.start("holder-a")
    proc = cli("start", "holder-b")
    assert proc.returncode != 0
    assert b'volume "data" is attached to running workspace "holder-a"' in proc.stderr
    assert engine.status("holder-b").state.state == "prepared"
    proc = cli("volume", "delete", "data")
    assert proc.returncode != 0 and b"holder-a" in proc.stderr
    engine.halt("holder-a")
    engine.start("holder-b")
    assert engine.exec("holder-b", ["cat", "/work/counter.txt"]).stdout.strip() in (b"42", b"43")
    engine.kill("holder-b")
    engine.delete("holder-a")
    engine.delete("holder-b")
    assert engine.volumes.get("data").attached is None


def test_raw_disk_and_outputs(engine: Engine, cli, tmp_path: Path) -> None:
    disk = tmp_path / "results.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk), "32M"], check=True)
    proc = cli("run", "--name", "reporter", "--profile", "tiny", "--disk", f"results={disk}:/results:rw",
               "--output", "report=/results/report.json", "--output", "log=/root/run.log",
               "--exec", "echo '{\"ok\": true}' > /results/report.json; echo done > /root/run.log")
    assert proc.returncode == 0, proc.stderr
    assert engine.output_get("reporter", "report") == b'{"ok": true}\n'
    assert cli("output", "get", "reporter", "log").stdout == b"done\n"
    status = cli("status", "reporter").stdout.decode().splitlines()
    assert f"Disk: results={disk} -> /results (rw)" in status
    assert "Output: report = /results/report.json" in status
    listing = cli("--json", "output", "list", "reporter").stdout
    assert b'"exists": true' in listing
    # the disk is the user's file: the data is there on the host
    dump = subprocess.run(["debugfs", "-R", "cat /report.json", str(disk)], capture_output=True)
    assert dump.stdout == b'{"ok": true}\n'
    with pytest.raises(NotFound, match="declares no output"):
        engine.output_get("reporter", "nope")
    engine.delete("reporter")


def test_attachment_errors_leave_nothing(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="package a directory as a tar"):
        engine.create("bad1", attachments=[parse_volume_flag(f"{tmp_path}:/data")])
    with pytest.raises(NotFound, match="volume create nosuch"):
        engine.create("bad2", attachments=[parse_volume_flag("nosuch:/data")])
    with pytest.raises(InvalidArgument):
        engine.create("bad3", outputs=[parse_output_flag("report")])
    for name in ("bad1", "bad2", "bad3"):
        with pytest.raises(NotFound):
            engine.status(name)
    engine.create("busy", profile="tiny")
    engine.start("busy")
    try:
        with pytest.raises(NotFound, match="not a regular file on the host"):
            engine.cp(str(tmp_path / "f"), "busy:/f")  # running: through the agent, and the host file is missing
        engine.pause("busy")
        (tmp_path / "f").write_text("x")
        with pytest.raises(InvalidState, match="halt it first"):  # paused: neither the agent nor the disks
            engine.cp(str(tmp_path / "f"), "busy:/f")
    finally:
        engine.kill("busy")
        engine.delete("busy")
