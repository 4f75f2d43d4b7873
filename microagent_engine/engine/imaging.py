"""Images as the engine uses them: pull, commit a stopped workspace as an OCI image, prune the unused."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DEFAULT_MAX_COPY, parse_size
from ..errors import HostError, InvalidState
from ..states import require
from ..fsutil import file_lock
from ..snapshots.overlay import require_own_disk
from .context import EngineContext

if TYPE_CHECKING:
    from ..images.store import ImageInfo


class Imaging:
    """``pull``, ``commit``, ``list_images`` and ``prune_images``."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def pull(self, ref: str) -> "ImageInfo":
        return self.ctx.images.ensure(ref, refresh=True)

    def commit(self, name: str, ref: str, max_size: int | str | None = None) -> "ImageInfo":
        from ..images import reference
        from ..images.commit import rootfs_to_tar, write_layout
        from ..storage.ext4 import fsck

        ctx = self.ctx
        key = str(reference.parse(ref))
        info = ctx.store.stopped(name, "commit")
        require("commit", info.state.state, name, info.vm_alive)
        require_own_disk(info.dir.path, name, "commit")
        with file_lock(info.dir.ops_lock, blocking=False, what=f"workspace {name!r}"):
            try:
                fsck(info.dir.rootfs, fix=False)
            except HostError as exc:
                raise InvalidState(f"the rootfs of {name!r} is not clean, so it is not committed: {exc}. Start "
                                   f"and halt the workspace (a clean shutdown), then commit again") from None
            committed = ctx.state_dir / "committed"
            committed.mkdir(parents=True, exist_ok=True)
            layout = committed / hashlib.sha256(key.encode()).hexdigest()[:16]
            with tempfile.TemporaryDirectory(dir=committed, prefix=".commit-") as tmp:
                ctx.progress(f"Reading the rootfs of {name}")
                config = {"Env": [f"{k}={v}" for k, v in info.config.env.items()],
                          "WorkingDir": info.config.workdir, "Cmd": [info.config.shell]}
                staged = Path(tmp) / "layout"
                cap = DEFAULT_MAX_COPY if max_size is None else parse_size(max_size)
                write_layout(staged, lambda out: rootfs_to_tar(info.dir.rootfs, out, Path(tmp) / "work", cap),
                             config, "latest")
                if layout.exists():
                    shutil.rmtree(layout)
                os.rename(staged, layout)
        img = ctx.images.ensure(f"oci:{layout}:latest")
        return ctx.images.tag(key, img.id)

    def list(self) -> list["ImageInfo"]:
        """The cached OCI images, then the built-in Debian ones."""
        from ..images import builtin_cache

        return self.ctx.images.list() + builtin_cache.list_cached(self.ctx.images.dir)

    def prune(self) -> list["ImageInfo"]:
        """Remove the cached images no workspace was created from: OCI images, then built-in Debian ones (all of
        those are kept while a workspace made before their ids were recorded uses one)."""
        from ..images import builtin_cache
        from ..images.builtin import PYTHON_REF

        configs = [i.config for i in self.ctx.store.list()]
        in_use = {c.image_id or c.image for c in configs}
        removed = self.ctx.images.prune(in_use)
        if any(c.image == PYTHON_REF and not c.image_id for c in configs):
            return removed
        for info in builtin_cache.list_cached(self.ctx.images.dir):
            if info.id not in in_use:
                builtin_cache.remove(info)
                removed.append(info)
        return removed
