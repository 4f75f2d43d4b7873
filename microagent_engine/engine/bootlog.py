"""The end of a workspace's boot logs (serial console, then the hypervisor's own output), quoted in the error of
a run whose workspace is deleted right after: the user must not be pointed at files that are gone."""

from __future__ import annotations

import os
from pathlib import Path

from .store import WorkspaceInfo

LINE_CHARS = 240  # the hypervisor's log starts with its (long) command line; quote only its head


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    kept = [ln.rstrip() for ln in text.replace("\r\n", "\n").splitlines() if ln.strip()][-lines:]
    return [ln if len(ln) <= LINE_CHARS else ln[:LINE_CHARS] + " …" for ln in kept]


def boot_log_tail(info: WorkspaceInfo, lines: int = 15) -> str:
    """The last ``lines`` non-empty lines of the serial console and of the hypervisor log (``vm.log``)."""
    parts = []
    console = _tail(info.dir.serial_log, lines)
    if console:
        parts.append("[console]\n" + "\n".join(console))
    vm = _tail(info.dir.vm_log, lines)
    if vm:
        parts.append("[hypervisor]\n" + "\n".join(vm))
    return "\n".join(parts)
