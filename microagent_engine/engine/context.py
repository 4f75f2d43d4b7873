"""What the engine's parts share: the state directory, the progress callback, the backend and the registries."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..backends import get_backend
from ..guest.kernel import Kernel, resolve_kernel
from ..storage.volumes import VolumeRegistry
from .store import WorkspaceStore

if TYPE_CHECKING:
    from ..images.store import ImageStore

Progress = Callable[[str], None]


class EngineContext:
    """One per :class:`~microagent_engine.Engine`; handed to each of its collaborators."""

    def __init__(self, state_dir: Path, progress: Progress | None = None) -> None:
        self.state_dir = state_dir
        self.progress: Progress = progress or (lambda _msg: None)
        self.backend = get_backend("qemu")
        self.store = WorkspaceStore(state_dir)
        self.volumes = VolumeRegistry(state_dir, self.store.holder_running)

    @functools.cached_property
    def images(self) -> "ImageStore":
        """The OCI image cache (imported on first use: the registry client is not needed by most commands)."""
        from ..images.store import ImageStore

        return ImageStore(self.state_dir, progress=self.progress)

    def resolve_kernel(self, kernel: str | None) -> Kernel:
        """The workspace's kernel (``kernel`` path), else the default one, installed on first need."""
        return resolve_kernel(self.state_dir, kernel, self.progress)
