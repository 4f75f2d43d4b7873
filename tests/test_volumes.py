"""Named volumes: the registry, its index.json, single-attach, and the seed's texts. Real mkfs.ext4, no VMs."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest

from microagent_engine.errors import AlreadyExists, HostError, InvalidArgument, InvalidState, MicroagentError, NotFound
from microagent_engine.hostinfo import require_tool
from microagent_engine.storage import volumes as volmod
from microagent_engine.errors import VolumeInUse
from microagent_engine.storage.volumes import (DEFAULT_SIZE_MIB, VolumeRegistry, render_created,
                                               render_list, render_status)

RUNNING: set[str] = set()


def is_running(holder: str) -> bool:
    return holder in RUNNING


def always_running(holder: str) -> bool:
    return True


@pytest.fixture(autouse=True)
def _e2fsprogs() -> None:
    for tool in ("mkfs.ext4", "debugfs"):
        try:
            require_tool(tool)
        except HostError as exc:
            pytest.fail(str(exc), pytrace=False)
    RUNNING.clear()


@pytest.fixture
def reg(tmp_path: Path) -> VolumeRegistry:
    return VolumeRegistry(tmp_path, is_running)


def _is_ext4(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(1080)
        return fh.read(2) == b"\x53\xef"


def test_create_list_status_texts(reg: VolumeRegistry, tmp_path: Path) -> None:
    vol = reg.create("data", size_mib=512)
    assert render_created(vol) == 'Created volume "data" (512 MiB)'
    assert vol.path == tmp_path / "volumes" / "data.ext4"
    assert vol.path.stat().st_size == 512 * 1024 * 1024 and _is_ext4(vol.path)
    assert vol.path.stat().st_blocks * 512 < 64 * 1024 * 1024  # sparse
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", vol.created_at)
    reg.create("scratch-2", size_mib=16)
    assert render_list(reg.list()) == ("NAME       SIZE-MIB  ATTACHED\n"
                                       "data       512       -\n"
                                       "scratch-2  16        -")
    assert render_status(reg.get("data")) == (f"Name: data\nSize: 512 MiB\nCreated: {vol.created_at}\n"
                                              f"Attached: -\nPath: {tmp_path}/volumes/data.ext4")


def test_index_json_content(reg: VolumeRegistry, tmp_path: Path) -> None:
    vol = reg.create("data", size_mib=16)
    index = json.loads((tmp_path / "volumes" / "index.json").read_text())
    assert index == {"version": 1, "volumes": {"data": {
        "name": "data", "sizeMiB": 16, "path": str(vol.path), "createdAt": vol.created_at,
        "attached": None, "lastHolder": None}}}
    assert vol.to_json() == index["volumes"]["data"]
    assert (tmp_path / "volumes" / ".lock").exists()
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == [".lock", "data.ext4", "index.json"]


def test_default_size_and_bad_input(reg: VolumeRegistry) -> None:
    assert DEFAULT_SIZE_MIB == 1024
    assert reg.create("big").size_mib == 1024
    with pytest.raises(AlreadyExists, match='volume "big" already exists'):
        reg.create("big", size_mib=16)
    for bad in ("", "a/b", "..", "-x", "a b"):
        with pytest.raises(InvalidArgument):
            reg.create(bad, size_mib=16)
    with pytest.raises(InvalidArgument, match="--size-mib"):
        reg.create("tiny", size_mib=1)
    with pytest.raises(NotFound, match='no volume named "nope"; create it with: microagent volume create nope'):
        reg.get("nope")
    assert [v.name for v in reg.list()] == ["big"]


def test_failed_create_leaves_nothing(reg: VolumeRegistry, tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise HostError("mkfs.ext4 failed")
    monkeypatch.setattr(volmod, "make_ext4", boom)
    with pytest.raises(HostError):
        reg.create("data", size_mib=16)
    monkeypatch.undo()

    def bad_save(self, vols):
        raise OSError("disk full")
    monkeypatch.setattr(VolumeRegistry, "_save", bad_save)
    with pytest.raises(OSError):
        reg.create("data", size_mib=16)
    monkeypatch.undo()
    assert reg.list() == []
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == [".lock"]
    reg.create("data", size_mib=16)  # and the name is usable afterwards


def test_corrupt_index_is_reported_not_reset(reg: VolumeRegistry, tmp_path: Path) -> None:
    reg.create("data", size_mib=16)
    index = tmp_path / "volumes" / "index.json"
    index.write_text('{"version": 1, "volumes": {"data": ')
    with pytest.raises(MicroagentError, match="volume index .*index.json is unreadable"):
        reg.list()
    with pytest.raises(MicroagentError, match="unreadable"):
        reg.create("other", size_mib=16)
    assert index.read_text() == '{"version": 1, "volumes": {"data": '
    assert not (tmp_path / "volumes" / "other.ext4").exists()


def test_single_attach_reclaim_and_release(reg: VolumeRegistry) -> None:
    reg.create("data", size_mib=16)
    RUNNING.add("a")
    assert reg.attach("data", "a").attached == "a"
    assert reg.attach("data", "a").attached == "a"  # re-attach by the same holder
    with pytest.raises(VolumeInUse) as exc:
        reg.attach("data", "b")
    assert str(exc.value) == 'volume "data" is attached to running workspace "a"; halt it first or use another volume'
    assert isinstance(exc.value, InvalidState)
    assert render_list(reg.list()) == "NAME  SIZE-MIB  ATTACHED\ndata  16        a"
    assert "Attached: a\n" in render_status(reg.get("data"))

    RUNNING.discard("a")  # a stopped without releasing: b reclaims it
    assert reg.list()[0].attached is None
    assert reg.attach("data", "b").attached == "b"
    RUNNING.add("b")
    assert reg.release("a") == []
    assert reg.release_volume("data", "a") is False
    assert reg.get("data").attached == "b"
    assert reg.release("b") == ["data"]
    vol = reg.get("data")
    assert (vol.attached, vol.last_holder) == (None, "b")
    assert render_list(reg.list()) == "NAME  SIZE-MIB  ATTACHED\ndata  16        -"
    assert "Attached: b\n" in render_status(vol)  # the seed shows the last holder
    reg.attach("data", "c")
    assert reg.release_volume("data", "c") is True
    with pytest.raises(NotFound):
        reg.attach("nope", "c")


def test_delete_fails_closed_while_attached(reg: VolumeRegistry) -> None:
    vol = reg.create("data", size_mib=16)
    RUNNING.add("a")
    reg.attach("data", "a")
    with pytest.raises(InvalidState, match='volume "data" is attached to running workspace "a"; .*--force'):
        reg.delete("data")
    assert vol.path.exists()
    reg.delete("data", force=True)
    assert not vol.path.exists() and reg.list() == []
    with pytest.raises(NotFound):
        reg.delete("data")
    reg.create("data", size_mib=16)
    reg.attach("data", "gone")  # holder not running: delete is allowed
    reg.delete("data")
    assert reg.list() == []


def _create_worker(state_dir: str, barrier, queue) -> None:
    reg = VolumeRegistry(Path(state_dir), always_running)
    barrier.wait()
    try:
        reg.create("data", size_mib=16)
        queue.put("won")
    except AlreadyExists:
        queue.put("exists")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"error: {exc!r}")


def _attach_worker(state_dir: str, holder: str, barrier, queue) -> None:
    reg = VolumeRegistry(Path(state_dir), always_running)
    barrier.wait()
    try:
        reg.attach("data", holder)
        queue.put(("won", holder))
    except VolumeInUse as exc:
        queue.put(("busy", str(exc)))
    except Exception as exc:  # noqa: BLE001
        queue.put(("error", repr(exc)))


def _race(target, args_for, n: int = 8) -> list:
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), barrier, queue)) for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_race_create_same_name(tmp_path: Path) -> None:
    results = _race(_create_worker, lambda i: (str(tmp_path),))
    assert sorted(results) == ["exists"] * 7 + ["won"]
    index = json.loads((tmp_path / "volumes" / "index.json").read_text())
    assert list(index["volumes"]) == ["data"]
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == [".lock", "data.ext4", "index.json"]


def test_race_attach_single_holder(tmp_path: Path) -> None:
    VolumeRegistry(tmp_path, always_running).create("data", size_mib=16)
    results = _race(_attach_worker, lambda i: (str(tmp_path), f"ws{i}"))
    winners = [r[1] for r in results if r[0] == "won"]
    assert len(winners) == 1, results
    busy = [r[1] for r in results if r[0] == "busy"]
    assert len(busy) == 7
    assert all(m == f'volume "data" is attached to running workspace "{winners[0]}"; halt it first or use '
                    f"another volume" for m in busy)
    index = json.loads((tmp_path / "volumes" / "index.json").read_text())
    assert index["volumes"]["data"]["attached"] == winners[0]
