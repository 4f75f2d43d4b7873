"""``commit``: a workspace's ext4 rootfs written back as an OCI image (one layer), read with debugfs only.

The tree is walked with batched ``debugfs -f`` scripts (``ls -p`` per directory level, ``stat`` and ``dump`` per
inode), so owners, modes (setuid included), mtimes, symlinks, hardlinks and device nodes survive without mounting
the image. Extended attributes are not carried over.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HostError
from ..hostinfo import require_tool

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_PROMPT = "debugfs: "
_SKIP = {".", "..", "lost+found"}


@dataclass
class _Entry:
    path: str
    inode: int
    mode: int
    uid: int
    gid: int


def _script(image: Path, commands: list[str], work: Path) -> dict[str, str]:
    """Run ``commands`` in one debugfs process; map each command to its output."""
    script = work / "debugfs.script"
    script.write_text("\n".join(commands) + "\n")
    proc = subprocess.run([require_tool("debugfs"), "-f", str(script), str(image)], capture_output=True,
                          text=True, errors="surrogateescape")
    out: dict[str, str] = {}
    current: str | None = None
    chunks: list[str] = []
    for line in proc.stdout.splitlines(keepends=True):
        if line.startswith(_PROMPT) and line[len(_PROMPT):].rstrip("\n") in commands:
            if current is not None:
                out[current] = "".join(chunks)
            current, chunks = line[len(_PROMPT):].rstrip("\n"), []
        else:
            chunks.append(line)
    if current is not None:
        out[current] = "".join(chunks)
    if len(out) < len(set(commands)):
        raise HostError(f"debugfs could not read {image}: {proc.stderr.strip()[-300:]}")
    return out


def _quote(path: str) -> str:
    if '"' in path or "\n" in path:
        raise HostError(f"cannot commit a file whose name contains a quote or newline: {path!r}")
    return f'"{path}"'


def walk(image: Path, work: Path) -> list[_Entry]:
    """Every entry of the filesystem (but lost+found), parents before children."""
    entries: list[_Entry] = []
    level = ["/"]
    while level:
        cmds = [f"ls -p {_quote(d)}" for d in level]
        outs = _script(image, cmds, work)
        nxt = []
        for d, cmd in zip(level, cmds):
            for line in outs[cmd].splitlines():
                parts = line.split("/")
                if len(parts) < 7 or parts[5] in _SKIP:
                    continue
                path = f"{d.rstrip('/')}/{parts[5]}"
                entry = _Entry(path, int(parts[1]), int(parts[2], 8), int(parts[3]), int(parts[4]))
                entries.append(entry)
                if stat.S_ISDIR(entry.mode):
                    nxt.append(path)
        level = nxt
    return entries


def rootfs_to_tar(image: Path, out: Path, work: Path) -> None:
    """Write the tree of ext4 ``image`` as an uncompressed tar at ``out``."""
    work.mkdir(parents=True, exist_ok=True)
    entries = walk(image, work)
    inodes = sorted({e.inode for e in entries})
    stats = _script(image, [f"stat <{i}>" for i in inodes], work)
    data_dir = work / "data"
    data_dir.mkdir(exist_ok=True)
    dumps = [f"dump <{e.inode}> {data_dir / str(e.inode)}" for e in entries
             if stat.S_ISREG(e.mode) or stat.S_ISLNK(e.mode)]
    if dumps:
        _script(image, sorted(set(dumps)), work)
    seen: dict[int, str] = {}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            st = stats[f"stat <{e.inode}>"]
            m = re.search(r"^\s*mtime: 0x([0-9a-f]+)", st, re.M)
            info = tarfile.TarInfo(e.path.lstrip("/"))
            info.mode, info.uid, info.gid = stat.S_IMODE(e.mode), e.uid, e.gid
            info.mtime = int(m.group(1), 16) if m else int(time.time())
            body: io.BufferedReader | None = None
            if stat.S_ISDIR(e.mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISREG(e.mode) and e.inode in seen:
                info.type, info.linkname = tarfile.LNKTYPE, seen[e.inode]
            elif stat.S_ISREG(e.mode):
                seen[e.inode] = info.name
                info.size = (data_dir / str(e.inode)).stat().st_size
                body = open(data_dir / str(e.inode), "rb")
            elif stat.S_ISLNK(e.mode):
                fast = re.search(r'Fast link dest: "(.*)"', st)
                info.type = tarfile.SYMTYPE
                info.linkname = fast.group(1) if fast else (data_dir / str(e.inode)).read_text(errors="surrogateescape")
            elif stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode):
                dev = re.search(r"Device major/minor number: (\d+):(\d+)", st)
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(e.mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = (int(dev.group(1)), int(dev.group(2))) if dev else (0, 0)
            elif stat.S_ISFIFO(e.mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # sockets are not part of an image
            tf.addfile(info, body)
            if body:
                body.close()
    shutil.rmtree(data_dir, ignore_errors=True)


def _blob(blobs: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = blobs / digest
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, layer_tar: Path, config: dict[str, Any], tag: str) -> str:
    """An OCI image layout with one gzip layer; returns the manifest digest."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    raw = layer_tar.read_bytes()
    layer = {"mediaType": OCI_LAYER, **_blob(blobs, gzip.compress(raw, compresslevel=3, mtime=0))}
    cfg = {"architecture": "amd64", "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]},
           "history": [{"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "created_by": "microagent commit"}]}
    cfg_desc = {"mediaType": OCI_CONFIG, **_blob(blobs, json.dumps(cfg, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg_desc, "layers": [layer]}
    man_desc = {"mediaType": OCI_MANIFEST, **_blob(blobs, json.dumps(manifest, sort_keys=True).encode()),
                "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [man_desc]}
    tmp = layout / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, layout / "index.json")
    return man_desc["digest"]
