"""Moving data: ``cp`` between the host and a workspace, and declared outputs.

A stopped workspace's ext4 images are read and written with debugfs. A running one is reached through its guest
agent: a file goes in as a command's stdin (written beside its destination, then renamed), and comes out as a
command's stdout, counted against the size cap as it arrives and written to a private temporary file that is
renamed into place only when whole (the guest decides what it sends: nothing beyond the cap is kept).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MAX_COPY, MAX_INLINE_OUTPUT, parse_size, validate_name
from ..errors import InvalidArgument, InvalidState, NotFound
from ..fsutil import capped, file_lock
from ..model import Attachment
from ..states import allows
from ..snapshots.overlay import require_own_disk
from ..storage import debugfs
from ..textsafe import safe_text
from .context import EngineContext
from .sessions import Sessions
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
        self._sessions = Sessions(ctx)

    def _disk_image(self, info: WorkspaceInfo, disk: str | None) -> Path:
        """The ext4 image behind ``ws:/path`` (rootfs) or ``ws:<disk>:/path`` (an attachment by name)."""
        if disk is None or disk == "rootfs":
            require_own_disk(info.dir.path, info.name, "cp")
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
        name = (dst_ws or src_ws)[0]  # type: ignore[index]
        info = self.ctx.store.status(name)
        if allows("exec", info.state.state):
            return self._cp_running(info, src, dst, src_ws, dst_ws, _copy_cap(max_size))
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

    def _cp_running(self, info: WorkspaceInfo, src: str, dst: str, src_ws: Any, dst_ws: Any,
                    cap: int) -> Path | str:
        """``cp`` with a running workspace, through its guest agent (see the module docstring)."""
        ws_side = dst_ws or src_ws
        if ws_side[1] is not None:
            raise InvalidArgument(f"{info.name} is running: name the file by its path in the guest (where the disk "
                                  f"is mounted), not WS:DISK:/path")
        guest = ws_side[2]
        if dst_ws:
            host = Path(src).expanduser()
            if not host.is_file():
                raise NotFound(f"{host} is not a regular file on the host")
            if dst.endswith("/"):  # WS:/dir/ names a directory (made if missing): the file goes inside it
                guest = posixpath.join(guest, host.name)
            put = ('d="$1"; [ -d "$d" ] && d="$d/$2"; mkdir -p "$(dirname "$d")" && '
                   'cat > "$d.microagent-cp" && mv -f "$d.microagent-cp" "$d" && printf %s "$d"')
            with open(host, "rb") as fh:
                result = self._sessions.exec(info.name, ["/bin/sh", "-c", put, "sh", guest, host.name], stdin=fh,
                                             max_output=4096)
            if not result.ok:
                raise InvalidState(f"copying into {info.name}:{guest} failed: "
                                   f"{safe_text(result.stderr.decode(errors='replace'), 300).strip()}")
            return f"{info.name}:{safe_text(result.stdout.decode(errors='replace'), 4096)}"
        target = Path(dst).expanduser()
        if target.is_dir():
            target = target / posixpath.basename(guest)
        private = target.parent / f".microagent-cp-{os.getpid()}-{target.name}"
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        write = capped(cap, lambda data: os.write(fd, data), lambda: InvalidState(
            f"{info.name}:{guest} is larger than {cap} bytes; give a larger --max-size (nothing was kept)"))

        try:
            script = 'if [ ! -f "$1" ]; then echo "not a regular file" >&2; exit 2; fi; cat "$1"'
            result = self._sessions.exec(info.name, ["/bin/sh", "-c", script, "sh", guest], on_stdout=write,
                                         max_output=4096)
            if not result.ok:
                raise NotFound(f"{info.name}:{guest}: {safe_text(result.stderr.decode(errors='replace'), 300)}"
                               .strip())
            os.close(fd)
            fd = -1
            os.replace(private, target)
        finally:
            if fd >= 0:
                os.close(fd)
            if private.exists():
                private.unlink()
        return target

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
            require_own_disk(info.dir.path, info.name, f"output {output!r}")
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
