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
from ..fsutil import file_lock
from .context import EngineContext

if TYPE_CHECKING:
    from ..images.store import ImageInfo


class Imaging:
    """``pull``, ``commit`` and ``prune_images``."""

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
        if info.state.state not in ("halted", "stopped", "prepared", "failed"):
            raise InvalidState(f"workspace {name!r} is {info.state.state}; halt or stop it before commit")
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

    def prune(self) -> list["ImageInfo"]:
        in_use = {i.config.image_id or i.config.image for i in self.ctx.store.list()}
        return self.ctx.images.prune(in_use)
