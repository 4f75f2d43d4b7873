"""The local image store: OCI references turned into cached base ext4 images.

Layout under the state dir::

    images/oci-<hex>.ext4   base rootfs of the image whose manifest digest is sha256:<hex> (docker-archive:
                            its config digest); built once, workspaces clone it with ``clone_sized``
    images/oci-<hex>.json   its metadata (refs, platform, sizes, layers) and OCI config (Env, Cmd, ...)
    images/refs.json        reference -> image id, so a known tag needs no network
    blobs/sha256/<hex>      verified registry blobs (layers and configs)
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterator

from ..errors import MicroagentError, NotFound
from ..fsutil import file_lock, read_json, write_json_atomic
from ..storage.ext4 import drop_sized, make_ext4
from . import reference
from .layers import LayerApplier, replay_into
from .sizes import image_size_mib, tree_size
from .registry import DEFAULT_PLATFORM, BlobCache, Descriptor, Progress, RegistryClient, ResolvedImage
from .sources import is_local, open_source



@dataclass
class ImageInfo:
    id: str  # sha256:<hex>
    refs: list[str]
    path: Path  # the base ext4
    size_mib: int
    content_bytes: int
    platform: str
    created: str
    source: str
    layers: list[str]
    blobs: list[str]
    config: dict[str, Any]  # the OCI config's "config" object: Env, Cmd, Entrypoint, WorkingDir, User, ...

    @property
    def env(self) -> dict[str, str]:
        return dict(e.split("=", 1) for e in self.config.get("Env") or [] if "=" in e)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "refs": self.refs, "sizeMiB": self.size_mib, "contentBytes": self.content_bytes,
                "platform": self.platform, "created": self.created, "source": self.source, "layers": self.layers,
                "blobs": self.blobs, "config": self.config}

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path) -> "ImageInfo":
        size = int(d.get("sizeMiB", d.get("sizeMib", 0)))  # records written before the casing was unified: sizeMib
        return cls(d["id"], list(d.get("refs") or []), path, size, int(d["contentBytes"]),
                   d.get("platform", ""), d.get("created", ""), d.get("source", ""), list(d.get("layers") or []),
                   list(d.get("blobs") or []), dict(d.get("config") or {}))


class ImageStore:
    """Pulls/reads images and keeps one base ext4 per image under ``<state_dir>/images``."""

    def __init__(self, state_dir: str | os.PathLike[str], progress: Progress | None = None,
                 platform: str = DEFAULT_PLATFORM, privileged: bool | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "images"
        self.blobs = BlobCache(self.state_dir / "blobs")
        self.progress: Progress = progress or (lambda _m: None)
        self.platform = platform
        self.privileged = privileged

    # paths and the index
    def _paths(self, image_id: str) -> tuple[Path, Path]:
        hexd = image_id.split(":", 1)[1]
        return self.dir / f"oci-{hexd}.ext4", self.dir / f"oci-{hexd}.json"

    def _refs(self) -> dict[str, str]:
        try:
            return dict(read_json(self.dir / "refs.json"))
        except FileNotFoundError:
            return {}

    @contextlib.contextmanager
    def _refs_locked(self) -> Iterator[dict[str, str]]:
        with file_lock(self.dir / "locks" / "refs.lock", what="the image index"):
            refs = self._refs()
            before = dict(refs)
            yield refs
            if refs != before:
                write_json_atomic(self.dir / "refs.json", refs)

    @contextlib.contextmanager
    def _gc_lock(self, exclusive: bool) -> Iterator[None]:
        """Pulls hold it shared so that prune/remove (exclusive) never delete blobs a build is using."""
        path = self.dir / "locks" / "gc.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _load(self, image_id: str) -> ImageInfo | None:
        ext4, meta = self._paths(image_id)
        if not (ext4.exists() and meta.exists()):
            return None
        return ImageInfo.from_json(read_json(meta), ext4)

    @staticmethod
    def key(ref: str) -> str:
        """The normalised form of ``ref`` used in the index."""
        if is_local(ref):
            with open_source(ref) as src:
                return src.key
        return str(reference.parse(ref))

    # public API
    def get(self, ref: str) -> ImageInfo | None:
        """The cached image for ``ref`` (a reference or an id / id prefix), without any network access."""
        if ref.startswith("sha256:") and len(ref) >= 19:
            for info in self.list():
                if info.id.startswith(ref):
                    return info
        refs = self._refs()
        try:
            image_id = refs.get(self.key(ref))
        except MicroagentError:  # e.g. a local archive that is gone: match the text as stored
            image_id = next((v for k, v in refs.items() if k in (ref, f"oci:{ref}")), None)
        return self._load(image_id) if image_id else None

    def ensure_rootfs(self, ref: str, *, refresh: bool = False) -> Path:
        """Path of the base ext4 for ``ref``, pulling and building it when it is not cached yet."""
        return self.ensure(ref, refresh=refresh).path

    def ensure(self, ref: str, *, refresh: bool = False) -> ImageInfo:
        """Like :meth:`ensure_rootfs` but returns the :class:`ImageInfo` (config, sizes...).

        A registry reference already in the index is used without network access unless ``refresh``; local
        sources are re-read each time (cheap) so a rewritten archive is noticed.
        """
        with self._gc_lock(exclusive=False):
            if is_local(ref):
                with open_source(ref) as src:
                    resolved = src.resolve(self.platform)
                    return self._ensure_built(src.key, resolved, src.open_blob)
            parsed = reference.parse(ref)
            key = str(parsed)
            if not refresh:
                image_id = self._refs().get(key)
                info = self._load(image_id) if image_id else None
                if info is not None:
                    return info
            self.progress(f"Pulling {key}")
            client = RegistryClient(self.blobs, self.progress, self.platform)
            resolved = client.resolve(parsed)
            n = len(resolved.layers)
            if self._load(resolved.id) is None:  # download everything before taking the build lock
                for i, desc in enumerate(resolved.layers):
                    if not self.blobs.has(desc.digest):
                        self.progress(f"Fetching layer {i + 1}/{n} {desc.digest[7:19]} ({desc.size / 1e6:.1f} MB)")
                    client.blob(parsed, desc, f"layer {i + 1}/{n}")

            def open_blob(desc: Descriptor) -> ContextManager[BinaryIO]:
                return open(client.blob(parsed, desc), "rb")  # a cache hit unless pruned meanwhile

            return self._ensure_built(key, resolved, open_blob, blob_cache=True)

    def _ensure_built(self, key: str, resolved: ResolvedImage,
                      open_blob: Callable[[Descriptor], ContextManager[BinaryIO]],
                      blob_cache: bool = False) -> ImageInfo:
        ext4, meta = self._paths(resolved.id)
        with file_lock(self.dir / "locks" / f"{resolved.id[7:]}.lock", what=f"image {resolved.id}"):
            info = self._load(resolved.id)
            if info is None:
                info = self._build(resolved, open_blob, ext4, blob_cache)
            if key not in info.refs:
                info.refs.append(key)
                write_json_atomic(meta, info.to_json())
        with self._refs_locked() as refs:
            refs[key] = resolved.id
        return info

    def _build(self, resolved: ResolvedImage, open_blob: Callable[[Descriptor], ContextManager[BinaryIO]],
               ext4: Path, blob_cache: bool) -> ImageInfo:
        self.dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.dir, prefix=".build-") as tmp:
            root = Path(tmp) / "root"
            root.mkdir()
            applier = LayerApplier(root, self.privileged)
            n = len(resolved.layers)
            for i, desc in enumerate(resolved.layers):
                self.progress(f"Unpacking layer {i + 1}/{n} {desc.digest[7:19]}")
                with open_blob(desc) as fh:
                    applier.apply(fh, f"layer {i + 1}/{n} ({desc.digest}) of {resolved.source}")
            applier.finish()
            content, inodes = tree_size(root)
            size_mib = image_size_mib(content, inodes)
            self.progress(f"Building base rootfs ({size_mib} MiB) of image {resolved.id[:19]}")
            out = Path(tmp) / "rootfs.ext4"
            make_ext4(out, size_mib, root, label="microagent")
            replay_into(out, applier.replay)
            os.replace(out, ext4)
        blobs = [d.digest for d in resolved.layers] + [resolved.extra.get("config_digest", "")]
        info = ImageInfo(resolved.id, [], ext4, size_mib, content, resolved.platform,
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), resolved.source,
                         [d.digest for d in resolved.layers], [b for b in blobs if b] if blob_cache else [],
                         dict(resolved.config.get("config") or {}))
        write_json_atomic(ext4.with_suffix(".json"), info.to_json())
        self.progress(f"Image {resolved.id[:19]} ready ({content / 1e6:.0f} MB) in {time.monotonic() - started:.1f} s")
        return info

    def tag(self, ref: str, image_id: str) -> ImageInfo:
        """Make ``ref`` name the cached image ``image_id`` (used by commit); no network access."""
        key = str(reference.parse(ref))
        ext4, meta = self._paths(image_id)
        with file_lock(self.dir / "locks" / f"{image_id[7:]}.lock", what=f"image {image_id}"):
            info = self._load(image_id)
            if info is None:
                raise NotFound(f"image {image_id} is not in the cache")
            if key not in info.refs:
                info.refs.append(key)
                write_json_atomic(meta, info.to_json())
        with self._refs_locked() as refs:
            refs[key] = image_id
        return info

    def list(self) -> list[ImageInfo]:
        out = []
        for meta in sorted(self.dir.glob("oci-*.json")):
            ext4 = meta.with_suffix(".ext4")
            if ext4.exists():
                out.append(ImageInfo.from_json(read_json(meta), ext4))
        return out

    def remove(self, ref: str) -> ImageInfo:
        """Delete the cached image ``ref`` names (and blobs no other image uses); NotFound if not cached."""
        info = self.get(ref)
        if info is None:
            raise NotFound(f"image {ref!r} is not in the local image cache; list cached images with "
                           "`microagent images`")
        with self._gc_lock(exclusive=True):
            self._delete(info)
            self._gc_blobs()
        return info

    def prune(self, in_use: set[str]) -> builtins.list[ImageInfo]:
        """Delete cached images not named in ``in_use`` (references or ids), then unused blobs."""
        keep: set[str] = set()
        for ref in in_use:
            try:
                keep.add(self.key(ref) if not ref.startswith("sha256:") else ref)
            except Exception:  # an unparsable or vanished reference keeps nothing
                keep.add(ref)
        removed = []
        with self._gc_lock(exclusive=True):
            for info in self.list():
                if info.id in keep or keep & set(info.refs):
                    continue
                self._delete(info)
                removed.append(info)
            self._gc_blobs()
            for tmp in self.dir.glob(".build-*"):  # staging left by killed builds
                if time.time() - tmp.stat().st_mtime > 86400:
                    shutil.rmtree(tmp, ignore_errors=True)
        return removed

    def _delete(self, info: ImageInfo) -> None:
        with file_lock(self.dir / "locks" / f"{info.id[7:]}.lock", what=f"image {info.id}"):
            for p in (info.path.with_suffix(".json"), info.path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            drop_sized(info.path)
        with self._refs_locked() as refs:
            for k in [k for k, v in refs.items() if v == info.id]:
                del refs[k]

    def _gc_blobs(self) -> None:
        used = {d for info in self.list() for d in info.blobs}
        for digest in self.blobs.digests():
            if digest not in used:
                self.blobs.remove(digest)
