"""Workspace snapshots, the engine's side: take one of a running workspace, list and remove them, and prepare a new
workspace that resumes one (``create --from-snapshot``).

A snapshot lives in ``<state-dir>/snapshots/<name>/`` (0700; files 0600): ``state`` (the VM's migration stream,
RAM included; device state only when the VM's RAM was a file: then ``memory``, 0644, and the ro-open shim),
``rootfs.ext4`` (a reflink or sparse copy of the root disk), ``workspace.json`` (the source's config) and
``meta.json`` (written last; a directory without it is unfinished). It is taken in a staging directory and renamed
into place, so a half-taken snapshot is never listed.

A workspace made from a snapshot gets its own copy of the disk and hard links to the stream (``restore-state``)
and memory (``restore-memory``), so the snapshot can be removed before the clone starts, plus ``restore.json``;
its first start resumes the snapshot (processes running), later starts boot its disk as any workspace does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from ..client import SupervisorConnection
from ..config import validate_name
from ..errors import AlreadyExists, GuestError, InvalidState, NotFound
from ..fsutil import private_dir, read_json, write_json_atomic
from ..records import WorkspaceConfig, WorkspaceDir, now_iso
from ..backends.qemu import RO_OPEN_NAME
from .overlay import BASE_FILE, OVERLAY_FILE, require_own_disk, write_overlay
from .live import MEMORY_FILE, RESTORE_KEY, ROOTFS_FILE, STATE_FILE, copy_disk, link_or_copy, snapshot_shape

SNAPSHOTS_DIR = "snapshots"
META_FILE = "meta.json"
CONFIG_FILE = "workspace.json"
#: in a workspace made from a snapshot, until its first start
RESTORE_MARKER = "restore.json"
RESTORE_STATE = "restore-state"
RESTORE_MEMORY = "restore-memory"
SNAPSHOT_REPLY_TIMEOUT = 600.0  # copying RAM and a large disk can take a while on a busy host


def snapshots_root(state_dir: Path) -> Path:
    return state_dir / SNAPSHOTS_DIR


def snapshot_dir(state_dir: Path, name: str) -> Path:
    return snapshots_root(state_dir) / validate_name(name)


def take(state_dir: Path, ws: WorkspaceDir, name: str, internal: bool = False) -> dict[str, Any]:
    """Snapshot the running (or paused) workspace ``ws`` as ``name``; the snapshot's meta.json. An ``internal``
    one (made by a frontend for its own use, such as the warm Python snapshot) is left out of the user's list."""
    final = snapshot_dir(state_dir, name)
    cfg = ws.load_config()
    require_own_disk(ws.path, cfg.name, "a snapshot")
    if cfg.attachments:
        raise InvalidState(f"workspace {cfg.name!r} has attached disks ({', '.join(a.name for a in cfg.attachments)}); "
                           f"snapshots cover the root disk only: create the workspace without attachments, or copy "
                           f"the data with 'microagent cp'")
    if final.exists():
        raise AlreadyExists(f"snapshot {name!r} already exists; pick another name or remove it "
                            f"('microagent snapshot rm {name}')")
    root = private_dir(snapshots_root(state_dir))
    staging = root / f".taking-{name}-{secrets.token_hex(4)}"
    private_dir(staging)
    try:
        t0 = time.monotonic()
        with SupervisorConnection(ws.control_socket) as conn:
            reply = conn.control("snapshot", {"dir": str(staging)}, reply_timeout=SNAPSHOT_REPLY_TIMEOUT)
        if not reply.get("ok"):
            raise GuestError(reply.get("error", "the snapshot failed"))
        write_json_atomic(staging / CONFIG_FILE, cfg.to_json())
        meta = {"name": name, "workspace": cfg.name, "createdAt": now_iso(), "memoryMiB": reply["memoryMiB"],
                "memory": reply["memory"], "shape": reply["shape"], "setupDone": reply["setupDone"],
                "stoppedSeconds": reply["stoppedSeconds"], "seconds": round(time.monotonic() - t0, 3),
                "stateBytes": reply["stateBytes"], "diskBytes": (staging / ROOTFS_FILE).stat().st_size,
                "internal": internal}
        write_json_atomic(staging / META_FILE, meta)
        try:
            os.rename(staging, final)
        except OSError:
            raise AlreadyExists(f"snapshot {name!r} already exists; pick another name") from None
        return meta
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load(state_dir: Path, name: str) -> dict[str, Any]:
    """A snapshot's meta.json (NotFound naming the existing ones)."""
    meta = snapshot_dir(state_dir, name) / META_FILE
    if not meta.is_file():
        have = ", ".join(m["name"] for m in list_all(state_dir)) or "none"
        raise NotFound(f"no snapshot named {name!r} (snapshots: {have}); take one with "
                       f"'microagent snapshot WORKSPACE {name}'")
    return read_json(meta)


def list_all(state_dir: Path, internal: bool = False) -> list[dict[str, Any]]:
    """meta.json of every finished snapshot, by name; internal ones only with ``internal``. Reads only."""
    root = snapshots_root(state_dir)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.name.startswith("."):  # being taken or removed
            continue
        try:
            meta = read_json(d / META_FILE)
        except (OSError, ValueError):
            continue
        if internal or not meta.get("internal"):
            out.append(meta)
    return out


def sweep_unfinished(state_dir: Path, older_than: float = 3600.0) -> list[str]:
    """Delete what a killed ``take`` or ``remove`` left (their staging directories, older than ``older_than``
    seconds: a younger one may still be in use); their names."""
    root = snapshots_root(state_dir)
    gone = []
    for d in sorted(root.glob(".*")) if root.is_dir() else []:
        with contextlib.suppress(OSError):
            if time.time() - d.stat().st_mtime > older_than:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
    return gone


def remove(state_dir: Path, name: str) -> None:
    """Delete a snapshot (workspaces made from it keep their own copies)."""
    load(state_dir, name)
    d = snapshot_dir(state_dir, name)
    trash = d.with_name(f".removing-{name}-{secrets.token_hex(4)}")
    os.rename(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clone_config(state_dir: Path, snapshot: str, name: str, hostname: str | None,
                 env: dict[str, str] | None) -> tuple[WorkspaceConfig, dict[str, Any]]:
    """The config of a new workspace ``name`` resuming ``snapshot``, and the snapshot's meta. It keeps the
    snapshot's image, resources, network, shell, setup and entrypoint (they are what is running); ``hostname`` and
    ``env`` may be its own (they reach the resumed agent with its CONFIG); published ports are dropped (the
    source may still hold the host ports)."""
    meta = load(state_dir, snapshot)
    cfg = WorkspaceConfig.from_json(read_json(snapshot_dir(state_dir, snapshot) / CONFIG_FILE))
    cfg.name, cfg.created_at, cfg.one_shot, cfg.publish, cfg.from_snapshot = name, now_iso(), False, [], snapshot
    cfg.hostname = hostname or cfg.hostname
    cfg.env = {**cfg.env, **(env or {})}
    return cfg, meta


def fill_clone(state_dir: Path, snapshot: str, staging: WorkspaceDir, overlay: bool = False) -> None:
    """Give the workspace being created in ``staging`` its own copy of the snapshot's disk (``overlay``: a
    copy-on-write overlay over it instead, for a disposable clone: snapshots/overlay.py), a link to its
    stream and the restore marker its first start reads."""
    src = snapshot_dir(state_dir, snapshot)
    meta = load(state_dir, snapshot)
    if overlay:
        link_or_copy(src / ROOTFS_FILE, staging.path / BASE_FILE)
        write_overlay(staging.path / OVERLAY_FILE, (src / ROOTFS_FILE).stat().st_size)
    else:
        copy_disk(src / ROOTFS_FILE, staging.rootfs)
    link_or_copy(src / STATE_FILE, staging.path / RESTORE_STATE)
    if meta["memory"] == "file":  # mapped copy-on-write by the clone; the ro-open shim must sit beside it
        link_or_copy(src / MEMORY_FILE, staging.path / RESTORE_MEMORY)
        link_or_copy(src / RO_OPEN_NAME, staging.path / RO_OPEN_NAME)
    write_json_atomic(staging.path / RESTORE_MARKER, {"snapshot": snapshot, "memory": meta["memory"],
                                                      "shape": meta["shape"]})


def render_snapshots(metas: list[dict[str, Any]]) -> str:
    """The snapshot list as a text table."""
    from ..render import text_table

    if not metas:
        return "(no snapshots; take one with 'microagent snapshot WORKSPACE NAME')"
    rows = [[m["name"], m["workspace"], m["createdAt"][:19].replace("T", " "), f"{m['memoryMiB']} MiB",
             f"{m['stateBytes'] >> 20} MiB", f"{m['stoppedSeconds']} s"] for m in metas]
    return text_table(rows, ["NAME", "WORKSPACE", "CREATED", "MEMORY", "STATE", "STOPPED"])


def pending_restore(ws: WorkspaceDir, argv: list[str]) -> dict[str, Any] | None:
    """The launch ``extra`` of a workspace's first start after create --from-snapshot (None: a normal boot);
    InvalidState when this host would now launch a VM the snapshot cannot be restored into."""
    marker = ws.path / RESTORE_MARKER
    if not marker.is_file():
        return None
    info = read_json(marker)
    if info.get("shape") != snapshot_shape(argv):
        raise InvalidState(f"workspace {ws.name!r} cannot resume snapshot {info.get('snapshot')!r}: the VM it would "
                           f"launch now differs from the snapshotted one (QEMU, kernel command line, memory, cpus or "
                           f"devices changed); 'microagent start {ws.name} --cold' boots its disk without the "
                           f"snapshot's processes")
    return {RESTORE_KEY: {"state": str(ws.path / RESTORE_STATE), "memory": info.get("memory", "default"),
                          "snapshot": info.get("snapshot", "?"), "ramFile": str(ws.path / RESTORE_MEMORY)}}


def restore_done(ws: WorkspaceDir) -> None:
    """The snapshot was resumed (or a cold start chose not to): later starts boot the disk."""
    for name in (RESTORE_MARKER, RESTORE_STATE, RESTORE_MEMORY, RO_OPEN_NAME):  # a running clone keeps its mapping
        (ws.path / name).unlink(missing_ok=True)


__all__ = ["take", "load", "list_all", "remove", "clone_config", "fill_clone", "pending_restore", "restore_done",
           "snapshots_root"]
