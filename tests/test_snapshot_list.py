"""The user's snapshot list: internal snapshots (the warm Python one) left out, and listing deletes nothing."""

from __future__ import annotations

import os
from pathlib import Path

from microagent_engine import Engine
from microagent_engine.fsutil import write_json_atomic
from microagent_engine.snapshots.workspace import META_FILE, snapshots_root


def _fake_snapshot(state_dir: Path, name: str, **meta: object) -> None:
    write_json_atomic(snapshots_root(state_dir) / name / META_FILE, {"name": name, "workspace": "w", **meta})


def test_internal_snapshots_are_hidden_and_listing_deletes_nothing(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    _fake_snapshot(tmp_path, "mine")
    _fake_snapshot(tmp_path, "pywarm-0123", internal=True)
    stale = snapshots_root(tmp_path) / ".taking-killed-0000"  # what a killed `snapshot` leaves
    stale.mkdir()
    os.utime(stale, (1, 1))
    young = snapshots_root(tmp_path) / ".taking-running-0000"  # a snapshot being taken right now
    young.mkdir()

    assert [m["name"] for m in engine.snapshots()] == ["mine"]
    assert [m["name"] for m in engine.snapshots(internal=True)] == ["mine", "pywarm-0123"]
    assert stale.is_dir() and young.is_dir()  # listing only reads

    assert engine.prune() == []  # the explicit clean-up sweeps the stale staging, not the one in progress
    assert not stale.exists() and young.is_dir()
    assert [m["name"] for m in engine.snapshots(internal=True)] == ["mine", "pywarm-0123"]
