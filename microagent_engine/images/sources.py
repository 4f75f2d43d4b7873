"""Local image sources, named like skopeo's transports, so images need no registry:

- ``oci:PATH[:TAG]`` an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``); TAG matches the
  ``org.opencontainers.image.ref.name`` annotation and may be omitted when the index has one image.
- ``oci-archive:PATH[:TAG]`` the same layout packed in a tar file.
- ``docker-archive:PATH[:NAME:TAG]`` a ``docker save`` tarball (``manifest.json``); NAME:TAG picks one of its
  RepoTags and may be omitted when it holds one image.
- A bare path (starting with ``/``, ``./``, ``../`` or ``~``) to an existing directory or tar file is detected by
  its contents.

Every blob is checked against its digest (docker-archive layers against the config's ``diff_ids``) before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from ..errors import InvalidArgument, NotFound
from .layers import decompressed
from ..errors import ImageError
from .registry import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    HashingReader,
    ResolvedImage,
    image_platform,
    layers_of,
    load_json,
    media_type,
    select_platform,
    sha256_digest,
)

PREFIXES = ("oci:", "oci-archive:", "docker-archive:")
REF_NAME = "org.opencontainers.image.ref.name"


def is_local(ref: str) -> bool:
    return ref.startswith(PREFIXES) or ref.startswith(("/", "./", "../", "~"))


def local_path(ref: str) -> str | None:
    """The host path a local reference reads (its selector dropped); None for a registry reference."""
    if not is_local(ref):
        return None
    for prefix in PREFIXES:
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
            break
    return ref.split(":", 1)[0]


def _split_path(spec: str, what: str) -> tuple[Path, str | None]:
    """``PATH[:SUFFIX]``: the whole spec if it exists, else split at the first ':' after an existing path."""
    whole = Path(spec).expanduser()
    if whole.exists():
        return whole.resolve(), None
    idx = spec.find(":")
    while idx != -1:
        p = Path(spec[:idx]).expanduser()
        if p.exists():
            return p.resolve(), spec[idx + 1:] or None
        idx = spec.find(":", idx + 1)
    raise NotFound(f"{what} {spec!r} does not exist; give the path of an OCI layout directory or image tar file")


class LocalSource:
    """A resolved local image. Use as a context manager; :meth:`open_blob` yields verified, seekable blobs."""

    def __init__(self, kind: str, path: Path, selector: str | None) -> None:
        self.kind, self.path, self.selector = kind, path, selector
        self.key = f"{kind}:{path}" + (f":{selector}" if selector else "")
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._files: dict[str, str] = {}  # digest -> file name (docker-archive)
        if kind == "oci":
            if not (path / "oci-layout").is_file():
                raise InvalidArgument(f"{path} is not an OCI image layout (no oci-layout file); use "
                                      "oci-archive: for tar files or docker-archive: for docker save output")
        else:
            try:
                self._tar = tarfile.open(path, "r:*")
            except (tarfile.TarError, OSError) as exc:
                raise ImageError(f"{path} is not a readable tar archive ({exc})") from None
            for m in self._tar.getmembers():
                self._members[os.path.normpath(m.name).lstrip("/")] = m

    def __enter__(self) -> "LocalSource":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tar is not None:
            self._tar.close()

    def __str__(self) -> str:
        return self.key

    # raw file access
    def _open(self, name: str) -> BinaryIO:
        if self._tar is None:
            p = self.path / name
            if not p.is_file():
                raise ImageError(f"{self}: {name} is missing; the layout is incomplete")
            return open(p, "rb")
        m = self._members.get(os.path.normpath(name))
        fh = self._tar.extractfile(m) if m is not None and m.isfile() else None
        if fh is None:
            raise ImageError(f"{self}: {name} is missing from the archive; it is incomplete")
        return fh  # type: ignore[return-value]

    def _read(self, name: str, limit: int = 8 << 20) -> bytes:
        with self._open(name) as fh:
            return fh.read(limit)

    @contextlib.contextmanager
    def open_blob(self, desc: Descriptor) -> Iterator[BinaryIO]:
        """The blob for ``desc``, verified against its digest before it is handed out."""
        if self.kind == "docker-archive":
            name = self._files[desc.digest]
            with self._open(name) as fh:
                self._check_diff_id(fh, desc.digest, name)
                fh.seek(0)
                yield fh
            return
        with self._open(f"blobs/sha256/{desc.digest[7:]}") as fh:
            HashingReader(fh, desc.digest, desc.size, str(self)).check()
            fh.seek(0)
            yield fh

    def _check_diff_id(self, fh: BinaryIO, diff_id: str, name: str) -> None:
        h = hashlib.sha256()
        with decompressed(fh, f"{self}: {name}") as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != diff_id:
            raise ImageError(f"{self}: layer {name} does not match its diff_id {diff_id}; the archive is corrupt")

    # resolution
    def resolve(self, platform: str) -> ResolvedImage:
        if self.kind == "docker-archive":
            return self._resolve_docker()
        index = load_json(self._read("index.json"), f"{self}: index.json")
        entries = index.get("manifests") or []
        if self.selector:
            entries = [e for e in entries if (e.get("annotations") or {}).get(REF_NAME) == self.selector or
                       (e.get("annotations") or {}).get("io.containerd.image.name", "").endswith(f":{self.selector}")]
            if not entries:
                raise NotFound(f"{self}: no image tagged {self.selector!r} in index.json")
        if not entries:
            raise NotFound(f"{self}: index.json lists no images")
        if len(entries) == 1:
            desc = Descriptor.from_json(entries[0], str(self))
            mt = entries[0].get("mediaType", "")
        else:
            desc = select_platform({"manifests": entries}, platform, str(self))
            mt = desc.media_type
        doc = self._manifest(desc)
        mt = media_type(doc, mt)
        if mt in INDEX_TYPES:
            desc = select_platform(doc, platform, str(self))
            doc = self._manifest(desc)
            mt = media_type(doc, desc.media_type)
        if mt not in MANIFEST_TYPES:
            raise ImageError(f"{self}: unsupported manifest type {mt!r}")
        config_desc, layers = layers_of(doc, str(self))
        with self.open_blob(config_desc) as fh:
            config = load_json(fh.read(), f"{self}: config")
        return ResolvedImage(desc.digest, config, layers, image_platform(config), self.key)

    def _manifest(self, desc: Descriptor) -> dict[str, Any]:
        with self.open_blob(desc) as fh:
            return load_json(fh.read(), f"{self}: manifest {desc.digest}")

    def _resolve_docker(self) -> ResolvedImage:
        doc = load_json(b'{"m": %s}' % self._read("manifest.json"), f"{self}: manifest.json").get("m")
        if not isinstance(doc, list) or not doc:
            raise ImageError(f"{self}: manifest.json lists no images; is this `docker save` output?")
        if self.selector:
            sel = self.selector if ":" in self.selector else f"{self.selector}:latest"
            doc = [e for e in doc if sel in (e.get("RepoTags") or [])]
            if not doc:
                raise NotFound(f"{self}: no image tagged {sel!r} in manifest.json")
        elif len(doc) > 1:
            tags = [t for e in doc for t in (e.get("RepoTags") or [])]
            raise InvalidArgument(f"{self.path} holds {len(doc)} images; pick one with "
                                  f"docker-archive:{self.path}:NAME:TAG (it has {', '.join(tags) or 'no tags'})")
        entry = doc[0]
        raw = self._read(entry.get("Config", ""))
        config = load_json(raw, f"{self}: config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        files = entry.get("Layers") or []
        if len(diff_ids) != len(files):
            raise ImageError(f"{self}: {len(files)} layers but {len(diff_ids)} diff_ids in the config; corrupt")
        layers = []
        for diff_id, name in zip(diff_ids, files, strict=True):
            m = self._members.get(os.path.normpath(name))
            if m is None:
                raise ImageError(f"{self}: layer {name} is missing from the archive")
            self._files[diff_id] = name
            layers.append(Descriptor("application/vnd.docker.image.rootfs.diff.tar", diff_id, m.size))
        return ResolvedImage(sha256_digest(raw), config, layers, image_platform(config), self.key)


def open_source(ref: str) -> LocalSource:
    """The :class:`LocalSource` a local reference names (see the module docstring for the syntax)."""
    for kind in ("oci-archive", "docker-archive", "oci"):
        if ref.startswith(kind + ":"):
            path, sel = _split_path(ref[len(kind) + 1:], kind)
            return LocalSource(kind, path, sel)
    path, sel = _split_path(ref, "image path")
    if path.is_dir():
        return LocalSource("oci", path, sel)
    try:
        with tarfile.open(path, "r:*") as tf:
            names = {os.path.normpath(n).lstrip("/") for n in tf.getnames()}
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgument(f"{path} is neither an OCI layout directory nor a tar archive ({exc})") from None
    if "manifest.json" in names:
        return LocalSource("docker-archive", path, sel)
    if "oci-layout" in names:
        return LocalSource("oci-archive", path, sel)
    raise InvalidArgument(f"{path} has neither manifest.json (docker save) nor oci-layout (OCI archive) inside")
