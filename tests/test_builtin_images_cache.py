"""Built-in Debian images (builtin:python) in the image cache: listed by `images list` and removed by
`images prune` like pulled images, kept while a workspace was created from them. No image is built: the cache
entries are written as debian.py writes them (the record last), the workspaces are real (busybox, never booted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.cli import main
from microagent_engine.fsutil import write_json_atomic
from microagent_engine.images.builtin import PYTHON_REF
from microagent_engine.images.debian import DebianImage


def _cached_python_image(state_dir: Path, key: str) -> Path:
    images = state_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    ext4 = images / f"debian-{key}.ext4"
    ext4.write_bytes(b"\0" * 4096)
    img = DebianImage(ext4, "python", ["python3", "python3-numpy"], {"LANG": "C.UTF-8"}, "bookworm", 900,
                      600_000_000, 200_000_000, 120.0, "2026-01-01T00:00:00Z")
    write_json_atomic(ext4.with_suffix(".json"), img.to_json())
    return ext4


def _cli_json(state_dir: Path, capsys: pytest.CaptureFixture[str], *words: str) -> list[dict]:
    assert main(["--state-dir", str(state_dir), "--json", *words]) == 0
    return json.loads(capsys.readouterr().out)


def test_python_images_are_listed_and_pruned_unless_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir, engine = tmp_path, Engine(tmp_path)  # its own: prune must not take the session's cached images
    used = _cached_python_image(state_dir, "a" * 20)
    unused = _cached_python_image(state_dir, "b" * 20)
    listed = _cli_json(state_dir, capsys, "images", "list")
    python = [i for i in listed if PYTHON_REF in i["refs"]]
    assert sorted(i["id"] for i in python) == [f"debian:{'a' * 20}", f"debian:{'b' * 20}"]
    assert all(i["sizeMiB"] == 900 for i in python)

    info = engine.create("made-from-python", profile="tiny")  # a real record, then as if made from image a
    cfg = info.dir.load_config()
    legacy = engine.create("made-before-ids", profile="tiny")
    legacy_cfg = legacy.dir.load_config()
    try:
        cfg.image, cfg.image_id = PYTHON_REF, f"debian:{'a' * 20}"
        info.dir.save_config(cfg)
        legacy_cfg.image, legacy_cfg.image_id = PYTHON_REF, ""  # which base it used is not known: keep them all
        legacy.dir.save_config(legacy_cfg)
        assert all(i["id"].startswith("sha256:") for i in _cli_json(state_dir, capsys, "images", "prune"))
        assert used.exists() and unused.exists()
        engine.delete(legacy.name)
        gone = _cli_json(state_dir, capsys, "images", "prune")
        assert [i["id"] for i in gone if i["id"].startswith("debian:")] == [f"debian:{'b' * 20}"]
        assert used.exists() and not unused.exists() and not unused.with_suffix(".json").exists()
    finally:
        for name in ("made-from-python", "made-before-ids"):
            if name in [i.name for i in engine.list()]:
                engine.delete(name)
    gone = _cli_json(state_dir, capsys, "images", "prune")
    assert f"debian:{'a' * 20}" in [i["id"] for i in gone] and not used.exists()
