"""The built-in Debian images (``builtin:python``, with or without added packages) in the image cache, as
:class:`~microagent_engine.images.store.ImageInfo` records: listed and pruned with the OCI images.

They are built by :mod:`.debian` as ``<state-dir>/images/debian-<key>.ext4`` with its ``.json`` record (written
last); their id here is ``debian:<key>``, which a workspace created from one records as its ``image_id``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..fsutil import file_lock, read_json
from .debian import DebianImage
from .registry import DEFAULT_PLATFORM
from .store import ImageInfo

PREFIX = "debian-"
ID_PREFIX = "debian:"


def image_id(base: Path) -> str:
    """The id of the built-in Debian image whose base ext4 is ``base`` ("" for any other base)."""
    return ID_PREFIX + base.stem[len(PREFIX):] if base.stem.startswith(PREFIX) else ""


def list_cached(images_dir: Path) -> list[ImageInfo]:
    """The complete built-in Debian images in ``images_dir`` (a damaged record is skipped: its next use rebuilds)."""
    out = []
    for meta in sorted(images_dir.glob(f"{PREFIX}*.json")):
        ext4 = meta.with_suffix(".ext4")
        try:
            img = DebianImage.from_json(read_json(meta), ext4)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ext4.exists():
            out.append(ImageInfo(image_id(ext4), [f"builtin:{img.recipe}"], ext4, img.size_mib, img.content_bytes,
                                 DEFAULT_PLATFORM, img.created, f"Debian {img.suite}: {' '.join(img.packages)}",
                                 [], [], {"Env": [f"{k}={v}" for k, v in img.env.items()]}))
    return out


def remove(info: ImageInfo) -> None:
    """Delete a built-in Debian image (its record first: without it the image counts as not built), under the
    lock its build takes."""
    key = info.id[len(ID_PREFIX):]
    with file_lock(info.path.parent / "locks" / f"{PREFIX}{key}.lock", what=f"image {info.refs[0]}"):
        for p in (info.path.with_suffix(".json"), info.path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
