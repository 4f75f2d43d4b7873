"""The ``builtin:python`` image for tests, built once per package set and machine (the build takes minutes).

Builds go to ``$MICROAGENT_TEST_IMAGE_CACHE`` (default ``/var/tmp/microagent-test-images-UID``) with the real
builder, and are hard-linked (else copied) into a test session's state dir, where the engine then finds them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from microagent_engine.fsutil import private_dir
from microagent_engine.images.builtin import PYTHON_RECIPE, builtin_python_image
from microagent_engine.images.debian import debian_image

CACHE_ENV = "MICROAGENT_TEST_IMAGE_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or f"/var/tmp/microagent-test-images-{os.getuid()}")


def python_image_into(state_dir: Path, packages: Iterable[str] = ()) -> Path:
    """Path of ``builtin:python`` (plus ``packages``) in ``state_dir``'s image cache, built on first need."""
    img = debian_image(cache_dir(), PYTHON_RECIPE, packages, lambda m: print(f"[python image] {m}", file=sys.stderr))
    images = private_dir(state_dir / "images")
    for src in (img.path, img.path.with_suffix(".json")):  # the .ext4 first: the .json marks it complete
        dest = images / src.name
        if not dest.exists():
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
    return builtin_python_image(state_dir, packages)
