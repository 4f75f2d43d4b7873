"""Named volumes: managed ext4 disks in ``<state-dir>/volumes/`` (``index.json`` + ``<name>.ext4``).

A volume is single-attach: at most one running workspace holds it. A holder that is no longer running is
reclaimed on the next attach. Every change of the index happens under ``volumes/.lock`` (a separate lock
file: locking index.json itself would lose updates, since the atomic rename swaps its inode).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import MAX_DISK_MIB, validate_name
from ..errors import AlreadyExists, InvalidArgument, MicroagentError, NotFound, VolumeInUse
from ..fsutil import file_lock, private_dir, read_json, sweep_stale_temp, write_json_atomic
from .ext4 import make_ext4

#: the seeds give no default; 1024 MiB matches the default ("small") profile's disk
DEFAULT_SIZE_MIB = 1024
MIN_SIZE_MIB = 8
MAX_SIZE_MIB = MAX_DISK_MIB
INDEX_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Volume:
    name: str
    size_mib: int
    path: Path
    created_at: str
    attached: str | None = None
    last_holder: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sizeMiB": self.size_mib, "path": str(self.path), "createdAt": self.created_at,
                "attached": self.attached, "lastHolder": self.last_holder}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "Volume":
        size = int(data.get("sizeMiB", data.get("sizeMib", 0)))  # index entries from before the casing was unified
        return cls(name=data["name"], size_mib=size, path=path, created_at=data["createdAt"],
                   attached=data.get("attached"), last_holder=data.get("lastHolder"))


class VolumeRegistry:
    """The volumes of one state dir. ``is_running(holder)`` says whether a workspace is live right now."""

    def __init__(self, state_dir: Path, is_running: Callable[[str], bool]) -> None:
        self.dir = Path(state_dir) / "volumes"
        self.index_path = self.dir / "index.json"
        self.lock_path = self.dir / ".lock"
        self.is_running = is_running

    # -- index ------------------------------------------------------------------------------------------
    def image_path(self, name: str) -> Path:
        return self.dir / f"{name}.ext4"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with file_lock(self.lock_path, what="the volume registry"):
            yield

    def _sweep(self) -> None:
        """Under the registry lock no other create runs, so any ``.NAME.ext4.tmp`` (and write_json_atomic
        temp file) is what a killed command left: remove it."""
        sweep_stale_temp(self.dir, (".*.ext4.tmp", ".index.json.*"), stale_after=0)

    def _load(self) -> dict[str, Volume]:
        if not self.index_path.exists():
            return {}
        try:
            data = read_json(self.index_path)
            if data.get("version") != INDEX_VERSION or not isinstance(data.get("volumes"), dict):
                raise ValueError(f"unexpected version/layout {str(data)[:80]!r}")
            return {n: Volume.from_json(v, self.image_path(n)) for n, v in data["volumes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise MicroagentError(
                f"the volume index {self.index_path} is unreadable ({exc}); it was not changed. Restore it "
                f"from a backup or fix it by hand (the volume images {self.dir}/*.ext4 are intact)") from None

    def _save(self, vols: dict[str, Volume]) -> None:
        write_json_atomic(self.index_path, {"version": INDEX_VERSION,
                                            "volumes": {n: vols[n].to_json() for n in sorted(vols)}})

    def _view(self, vol: Volume) -> Volume:
        """The volume as users should see it: a holder that no longer runs is shown as released."""
        if vol.attached and not self.is_running(vol.attached):
            return replace(vol, attached=None, last_holder=vol.attached)
        return vol

    def _require(self, vols: dict[str, Volume], name: str) -> Volume:
        if name not in vols:
            validate_name(name, "volume")
            raise NotFound(f'no volume named "{name}"; create it with: microagent volume create {name}')
        return vols[name]

    # -- public API ---------------------------------------------------------------------------------------
    def create(self, name: str, size_mib: int = DEFAULT_SIZE_MIB) -> Volume:
        """Make ``<name>.ext4`` and record it; AlreadyExists if the name is taken."""
        validate_name(name, "volume")
        if not isinstance(size_mib, int) or not MIN_SIZE_MIB <= size_mib <= MAX_SIZE_MIB:
            raise InvalidArgument(f"volume size {size_mib!r} MiB is out of range; "
                                  f"use --size-mib between {MIN_SIZE_MIB} and {MAX_SIZE_MIB}")
        private_dir(self.dir)
        with self._locked():
            self._sweep()
            vols = self._load()
            if name in vols:
                raise AlreadyExists(f'volume "{name}" already exists; use it, or delete it first with: '
                                    f"microagent volume delete {name}")
            path = self.image_path(name)
            make_ext4(path, size_mib, label=name)  # atomic; a leftover from a crashed create is replaced
            vol = Volume(name=name, size_mib=size_mib, path=path, created_at=_now())
            vols[name] = vol
            try:
                self._save(vols)
            except BaseException:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
            return vol

    def get(self, name: str) -> Volume:
        with self._locked():
            return self._view(self._require(self._load(), name))

    def list(self) -> list[Volume]:
        with self._locked():
            vols = self._load()
        return [self._view(vols[n]) for n in sorted(vols)]

    def delete(self, name: str, force: bool = False) -> Volume:
        """Remove the volume and its disk; InvalidState while a running workspace holds it (unless force)."""
        with self._locked():
            self._sweep()
            vols = self._load()
            vol = self._require(vols, name)
            if vol.attached and not force and self.is_running(vol.attached):
                raise VolumeInUse(f'volume "{name}" is attached to running workspace "{vol.attached}"; '
                                  f"halt it first, or pass --force to delete the volume anyway")
            del vols[name]
            self._save(vols)  # index first: a crash leaves an orphan image that create replaces
            with contextlib.suppress(FileNotFoundError):
                vol.path.unlink()
            return vol

    def attach(self, name: str, holder: str) -> Volume:
        """Record ``holder`` as the volume's single holder; VolumeInUse if another running workspace has it."""
        with self._locked():
            vols = self._load()
            vol = self._require(vols, name)
            if vol.attached == holder:
                return vol
            if vol.attached and self.is_running(vol.attached):
                raise VolumeInUse(f'volume "{name}" is attached to running workspace "{vol.attached}"; '
                                  f"halt it first or use another volume")
            if not vol.path.is_file():
                raise NotFound(f'the disk of volume "{name}" ({vol.path}) is missing; delete the volume with: '
                               f"microagent volume delete {name} --force, then create it again")
            vols[name] = replace(vol, attached=holder, last_holder=holder)
            self._save(vols)
            return vols[name]

    def release(self, holder: str) -> list[str]:
        """Release every volume ``holder`` holds (the last holder stays recorded); returns their names."""
        with self._locked():
            vols = self._load()
            names = [n for n, v in vols.items() if v.attached == holder]
            for n in names:
                vols[n] = replace(vols[n], attached=None, last_holder=holder)
            if names:
                self._save(vols)
            return sorted(names)

    def release_volume(self, name: str, holder: str) -> bool:
        """Release ``name`` if ``holder`` holds it; False (and no change) otherwise."""
        with self._locked():
            vols = self._load()
            vol = self._require(vols, name)
            if vol.attached != holder:
                return False
            vols[name] = replace(vol, attached=None, last_holder=holder)
            self._save(vols)
            return True


# -- text renderers (seed formats) --------------------------------------------------------------------------
def render_created(vol: Volume) -> str:
    return f'Created volume "{vol.name}" ({vol.size_mib} MiB)'


def render_list(vols: list[Volume]) -> str:
    rows = [["NAME", "SIZE-MIB", "ATTACHED"]] + [[v.name, str(v.size_mib), v.attached or "-"] for v in vols]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_status(vol: Volume) -> str:
    """``Attached:`` shows the holder, or the last holder once released (as the seed's example does)."""
    return "\n".join([f"Name: {vol.name}", f"Size: {vol.size_mib} MiB", f"Created: {vol.created_at}",
                      f"Attached: {vol.attached or vol.last_holder or '-'}", f"Path: {vol.path}"])


def render_deleted(vol: Volume) -> str:
    return f'Deleted volume "{vol.name}"'
