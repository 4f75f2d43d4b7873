"""Moving data without booting: ``cp`` between the host and a stopped workspace, and declared outputs.

Everything here reads or writes ext4 images with debugfs while the workspace's VM is not running.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MAX_COPY, MAX_INLINE_OUTPUT, parse_size, validate_name
from ..errors import InvalidArgument, NotFound
from ..fsutil import file_lock
from ..model import Attachment
from ..storage import debugfs
from .context import EngineContext
from .store import WorkspaceInfo


def parse_ws_path(value: str) -> tuple[str, str | None, str] | None:
    """``WS:/path`` -> (ws, None, path); ``WS:DISK:/path`` -> (ws, disk, path); a host path -> None."""
    head, sep, rest = value.partition(":")
    if not sep or "/" in head or not head:
        return None
    validate_name(head)
    disk, sep2, path = rest.partition(":")
    if sep2 and not disk.startswith("/"):
        return head, disk, debugfs.normalize_guest_path(path)
    return head, None, debugfs.normalize_guest_path(rest)


def _copy_cap(max_size: int | str | None) -> int:
    return DEFAULT_MAX_COPY if max_size is None else parse_size(max_size)


class Transfer:
    """``cp``, ``outputs`` and ``output_get``."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def _disk_image(self, info: WorkspaceInfo, disk: str | None) -> Path:
        """The ext4 image behind ``ws:/path`` (rootfs) or ``ws:<disk>:/path`` (an attachment by name)."""
        if disk is None or disk == "rootfs":
            return info.dir.rootfs
        for att in info.config.attachments:
            if att.name == disk or (att.kind == "volume" and att.source == disk):
                if att.kind == "bundle":
                    raise InvalidArgument(f"disk {disk!r} of {info.name} is a bundle, rebuilt from its tar at each "
                                          f"start; change the tar instead")
                return self.ctx.volumes.get(att.source).path if att.kind == "volume" else Path(att.source)
        names = ", ".join(["rootfs", *[a.name for a in info.config.attachments]])
        raise NotFound(f"workspace {info.name!r} has no disk named {disk!r} (it has: {names})")

    def cp(self, src: str, dst: str, max_size: int | str | None = None) -> Path | str:
        src_ws, dst_ws = parse_ws_path(src), parse_ws_path(dst)
        if bool(src_ws) == bool(dst_ws):
            raise InvalidArgument("cp copies between the host and a workspace: one side must be WS:/path "
                                  "(or WS:DISK:/path), the other a host path")
        if dst_ws:
            name, disk, guest = dst_ws
            info = self.ctx.store.stopped(name, "cp")
            with file_lock(info.dir.ops_lock, blocking=False, what=f"workspace {name!r}"):
                host = Path(src).expanduser()
                if not host.is_file():
                    raise NotFound(f"{host} is not a regular file on the host")
                debugfs.copy_in(self._disk_image(info, disk), host, guest)
            return f"{name}:{guest}"
        assert src_ws
        name, disk, guest = src_ws
        info = self.ctx.store.stopped(name, "cp")
        with file_lock(info.dir.ops_lock, blocking=False, what=f"workspace {name!r}"):
            target = Path(dst).expanduser()
            debugfs.copy_out(self._disk_image(info, disk), guest, target, _copy_cap(max_size))
        return target / posixpath.basename(guest) if target.is_dir() else target

    def _output_location(self, info: WorkspaceInfo, output: str) -> tuple[Path, str]:
        decl = next((o for o in info.config.outputs if o.name == output), None)
        if decl is None:
            declared = ", ".join(o.name for o in info.config.outputs) or "none"
            raise NotFound(f"workspace {info.name!r} declares no output {output!r} (declared: {declared})")
        path = decl.path
        best: Attachment | None = None
        for att in info.config.attachments:
            if (path == att.mountpoint or path.startswith(att.mountpoint + "/")) and \
                    (best is None or len(att.mountpoint) > len(best.mountpoint)):
                best = att
        if best is None:
            return info.dir.rootfs, path
        if best.kind == "bundle":
            raise InvalidArgument(f"output {output!r} is on bundle {best.name!r}, which is read from its tar and "
                                  f"not kept; declare outputs on the rootfs, a volume or a disk")
        rel = path[len(best.mountpoint):] or "/"
        return self._disk_image(info, best.name), rel

    def outputs(self, name: str) -> list[dict[str, Any]]:
        info = self.ctx.store.stopped(name, "output list")
        out = []
        for decl in info.config.outputs:
            image, rel = self._output_location(info, decl.name)
            out.append({**decl.to_json(), "exists": debugfs.exists(image, rel)})
        return out

    def output_get(self, name: str, output: str, dest: str | os.PathLike[str] | None = None,
                   max_size: int | str | None = None) -> bytes | Path:
        info = self.ctx.store.stopped(name, "output get")
        image, rel = self._output_location(info, output)
        if dest is None:
            return debugfs.read_file(image, rel, min(_copy_cap(max_size), MAX_INLINE_OUTPUT))
        target = Path(dest).expanduser()
        debugfs.copy_out(image, rel, target, _copy_cap(max_size))
        return target / posixpath.basename(rel) if target.is_dir() else target
