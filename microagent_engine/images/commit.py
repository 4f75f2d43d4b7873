"""``commit``: a workspace's ext4 rootfs written back as an OCI image (one layer), read with debugfs only.

The tree is walked with batched ``debugfs -f`` scripts (``ls -p`` per directory level, ``stat`` and ``dump`` per
inode), so owners, modes (setuid included), mtimes, symlinks, hardlinks and device nodes survive without mounting
the image. Extended attributes are not carried over.

Memory and disk stay bounded whatever the guest's files: a file with holes or unwritten extents is extracted with
its holes kept (:func:`~microagent_engine.storage.debugfs.dump_sparse`), and the tar is streamed through gzip into
the blob file while both digests are computed; no layer is ever held in memory or written uncompressed.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, BinaryIO, Callable

from ..config import DEFAULT_MAX_COPY, human_size
from ..errors import HostError, InvalidArgument
from ..hostinfo import require_tool
from ..storage.debugfs import dump_sparse

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


def _holey(st: str) -> bool:
    """Whether ``stat`` output shows a file that a plain ``dump`` would blow up: holes or unwritten extents."""
    size = re.search(r"\bSize:\s+(\d+)", st)
    blocks = re.search(r"Blockcount:\s+(\d+)", st)
    if "[u]" in st or not size or not blocks:
        return True
    return int(blocks.group(1)) * 512 < int(size.group(1))


def _size(st: str) -> int:
    m = re.search(r"\bSize:\s+(\d+)", st)
    return int(m.group(1)) if m else 0


def _refuse_over_cap(entries: list[_Entry], stats: dict[str, str], max_size: int) -> None:
    """InvalidArgument, before anything is read, when the files' sizes (hardlinks once) add up to over ``max_size``:
    the layer holds each file whole (holes as zeros), so its tar, its gzip time and the image built from it grow
    with this sum."""
    sizes = {e.inode: (_size(stats[f"stat <{e.inode}>"]), e.path) for e in entries if stat.S_ISREG(e.mode)}
    total = sum(size for size, _ in sizes.values())
    if total > max_size:
        big, path = max(sizes.values())
        raise InvalidArgument(f"the files of this rootfs add up to {human_size(total)} ({total} bytes; largest "
                              f"{path}, {human_size(big)}), over the commit cap of {human_size(max_size)}; nothing "
                              f"was committed. Raise the cap with --max-size (e.g. --max-size "
                              f"{-(-total // (1 << 30))}G), or remove the file before committing")


def rootfs_to_tar(image: Path, out: BinaryIO, work: Path, max_size: int = DEFAULT_MAX_COPY) -> None:
    """Stream the tree of ext4 ``image`` as an uncompressed tar into ``out`` (written once, front to back); refused
    (before reading any file) when its files add up to more than ``max_size`` bytes."""
    work.mkdir(parents=True, exist_ok=True)
    entries = walk(image, work)
    inodes = sorted({e.inode for e in entries})
    stats = _script(image, [f"stat <{i}>" for i in inodes], work)
    _refuse_over_cap(entries, stats, max_size)
    data_dir = work / "data"
    data_dir.mkdir(exist_ok=True)
    dumps = set()
    for e in entries:
        st = stats[f"stat <{e.inode}>"]
        if stat.S_ISREG(e.mode) and _holey(st):
            if not (data_dir / str(e.inode)).exists():  # a hardlink's second name: dumped already
                with open(data_dir / str(e.inode), "wb") as fh:
                    dump_sparse(image, f"<{e.inode}>", fh.fileno(), _size(st))
        elif stat.S_ISREG(e.mode) or stat.S_ISLNK(e.mode):
            dumps.add(f"dump <{e.inode}> {data_dir / str(e.inode)}")
    if dumps:
        _script(image, sorted(dumps), work)
    seen: dict[int, str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
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


class _Digesting(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.sha, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def _layer_blob(blobs: Path, write_tar: Callable[[BinaryIO], None]) -> tuple[dict[str, Any], str]:
    """Stream the tar ``write_tar`` writes through gzip into a blob; returns (descriptor, diff_id)."""
    tmp = blobs / ".layer.tmp"
    try:
        with open(tmp, "wb") as fh:
            packed = _Digesting(fh)  # type: ignore[arg-type]
            with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=3, mtime=0) as gz:  # type: ignore[arg-type]
                raw = _Digesting(gz)  # type: ignore[arg-type]
                write_tar(raw)  # type: ignore[arg-type]
        digest = packed.sha.hexdigest()
        os.replace(tmp, blobs / digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return {"mediaType": OCI_LAYER, "digest": f"sha256:{digest}", "size": packed.size}, \
        f"sha256:{raw.sha.hexdigest()}"


def _blob(blobs: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = blobs / digest
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, write_tar: Callable[[BinaryIO], None], config: dict[str, Any], tag: str) -> str:
    """An OCI image layout with one gzip layer, the tar ``write_tar`` streams; returns the manifest digest."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layer, diff_id = _layer_blob(blobs, write_tar)
    cfg = {"architecture": "amd64", "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": [diff_id]},
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
