"""Extra disks a workspace attaches: named volumes, raw ext4 disks and tar bundles (``-v``, ``--disk``,
``--bundle``). Host directories are never attached: everything the guest sees is a block device.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ..config import validate_name
from ..errors import InvalidArgument, NotFound

KINDS = ("volume", "disk", "bundle")
BUNDLE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DISK_SUFFIXES = (".ext4", ".img")
EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"
#: guest paths a disk may not be mounted on (or under, for the pseudo filesystems)
RESERVED_MOUNTS = ("/", "/proc", "/sys", "/dev")
DIR_GUIDANCE = ("host directories are never attached; package a directory as a tar for ingress "
                "(tar -C DIR -cf ctx.tar . then -v ./ctx.tar:/ctx:ro), or use cp against a stopped workspace")


@dataclass(frozen=True)
class Attachment:
    """One disk to attach: ``source`` is a volume name (kind volume) or an absolute host path."""

    kind: str
    name: str
    source: str
    mountpoint: str
    read_only: bool

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["readOnly"] = d.pop("read_only")
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Attachment":
        return cls(kind=data["kind"], name=data["name"], source=data["source"], mountpoint=data["mountpoint"],
                   read_only=bool(data.get("readOnly", data.get("read_only", False))))

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"


def validate_mountpoint(mountpoint: str) -> str:
    """An absolute, normalized guest mountpoint other than ``/`` (a trailing ``/`` is dropped)."""
    if not mountpoint.startswith("/"):
        raise InvalidArgument(f"mountpoint {mountpoint!r} must be an absolute guest path, e.g. /data")
    if re.search(r"[\s\x00-\x1f\x7f,\"'\\]", mountpoint):
        raise InvalidArgument(f"mountpoint {mountpoint!r} contains whitespace, a quote, a comma or a control "
                              f"character; choose a plain path such as /data")
    if ".." in mountpoint.split("/"):
        raise InvalidArgument(f"mountpoint {mountpoint!r} must not contain '..'")
    trimmed = mountpoint.rstrip("/") or "/"
    if posixpath.normpath(trimmed) != trimmed:
        raise InvalidArgument(f"mountpoint {mountpoint!r} is not normalized; write it as "
                              f"{posixpath.normpath(trimmed)!r}")
    if trimmed in RESERVED_MOUNTS or any(trimmed.startswith(r + "/") for r in RESERVED_MOUNTS[1:]):
        raise InvalidArgument(f"mountpoint {trimmed!r} is reserved by the guest system; mount the disk "
                              f"somewhere else, e.g. /data")
    return trimmed


def _mode(value: str | None, default_ro: bool, flag: str) -> bool:
    if value is None or value == "":
        return default_ro
    if value not in ("ro", "rw"):
        raise InvalidArgument(f"{flag}: mode {value!r} must be 'ro' or 'rw'")
    return value == "ro"


def _name_from_path(path: str) -> str:
    base = os.path.basename(path)
    for suffix in BUNDLE_SUFFIXES + DISK_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.").replace("..", ".")
    return name[:63] or "disk"


def check_ext4_file(path: str | Path, flag: str = "--disk") -> None:
    """NotFound/InvalidArgument unless ``path`` is a regular file with an ext4 superblock magic."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{flag}: disk image {p} does not exist")
    if p.is_dir():
        raise InvalidArgument(f"{flag}: {p} is a directory; {DIR_GUIDANCE}")
    if not p.is_file():
        raise InvalidArgument(f"{flag}: {p} is not a regular file; attach an ext4 image file")
    with open(p, "rb") as fh:
        fh.seek(EXT4_MAGIC_OFFSET)
        if fh.read(2) != EXT4_MAGIC:
            raise InvalidArgument(f"{flag}: {p} is not an ext4 filesystem image (no ext4 superblock); "
                                  f"build one with mkfs.ext4, or use a .tar bundle")


def check_bundle_file(path: str | Path, flag: str = "--bundle") -> None:
    """NotFound/InvalidArgument unless ``path`` is a readable tar archive (plain or compressed)."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{flag}: bundle {p} does not exist")
    if p.is_dir():
        raise InvalidArgument(f"{flag}: {p} is a directory; {DIR_GUIDANCE}")
    if not p.is_file():
        raise InvalidArgument(f"{flag}: {p} is not a regular file; give a .tar/.tar.gz/.tgz archive")
    try:
        ok = tarfile.is_tarfile(p)
    except (OSError, EOFError) as exc:
        raise InvalidArgument(f"{flag}: {p} could not be read as a tar archive ({exc})") from None
    if not ok:
        raise InvalidArgument(f"{flag}: {p} is not a tar archive; create one with: tar -C DIR -cf {p.name} .")


def parse_volume_flag(value: str) -> Attachment:
    """``-v SRC:DST[:ro|rw]``: a bare name is a named volume, .tar/.tar.gz/.tgz a bundle, .ext4/.img a disk."""
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(f"-v {value!r}: expected SRC:DST[:ro|rw], e.g. -v data:/data or "
                              f"-v ./ctx.tar:/ctx:ro (host paths must not contain ':')")
    src, dst = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else None
    if os.path.isdir(src):
        raise InvalidArgument(f"-v {value!r}: {src} is a host directory; {DIR_GUIDANCE}")
    if src.endswith(BUNDLE_SUFFIXES):
        check_bundle_file(src, "-v")
        return Attachment("bundle", _name_from_path(src), os.path.abspath(src), validate_mountpoint(dst),
                          _mode(mode, True, "-v"))
    if src.endswith(DISK_SUFFIXES):
        check_ext4_file(src, "-v")
        return Attachment("disk", _name_from_path(src), os.path.abspath(src), validate_mountpoint(dst),
                          _mode(mode, False, "-v"))
    if "/" in src or os.path.exists(src):
        raise InvalidArgument(f"-v {value!r}: {src} is not a volume name, a .ext4/.img disk or a "
                              f".tar/.tar.gz/.tgz bundle; a named volume is a bare name such as 'data'")
    validate_name(src, "volume")
    return Attachment("volume", src, src, validate_mountpoint(dst), _mode(mode, False, "-v"))


def _parse_named(value: str, flag: str, kind: str, default_ro: bool) -> tuple[str, str, str, bool]:
    example = f"{flag} name=/path{'.ext4' if kind == 'disk' else '.tar'}:/mount:{'ro' if default_ro else 'rw'}"
    name, sep, rest = value.partition("=")
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(f"{flag} {value!r}: expected NAME=PATH:MOUNT[:ro|rw], e.g. {example}")
    validate_name(name, kind)
    return name, parts[0], validate_mountpoint(parts[1]), _mode(parts[2] if len(parts) == 3 else None,
                                                                  default_ro, flag)


def parse_disk_flag(value: str) -> Attachment:
    """``--disk name=/path.ext4:/mount[:ro|rw]`` (default rw): an existing ext4 image you manage."""
    name, path, mount, ro = _parse_named(value, "--disk", "disk", False)
    check_ext4_file(path, "--disk")
    return Attachment("disk", name, os.path.abspath(path), mount, ro)


def parse_bundle_flag(value: str) -> Attachment:
    """``--bundle name=/path.tar:/mount[:ro|rw]`` (default ro): a tar built into a one-shot disk at start."""
    name, path, mount, ro = _parse_named(value, "--bundle", "bundle", True)
    check_bundle_file(path, "--bundle")
    return Attachment("bundle", name, os.path.abspath(path), mount, ro)


def validate_attachments(attachments: Iterable[Attachment]) -> list[Attachment]:
    """InvalidArgument on duplicate mountpoints, names or sources across one workspace's attachments."""
    items = list(attachments)
    seen_mount: dict[str, Attachment] = {}
    seen_name: dict[str, Attachment] = {}
    seen_src: dict[tuple[str, str], Attachment] = {}
    for a in items:
        if a.kind not in KINDS:
            raise InvalidArgument(f"attachment kind {a.kind!r} must be one of {', '.join(KINDS)}")
        validate_name(a.name, a.kind)
        validate_mountpoint(a.mountpoint)
        if a.mountpoint in seen_mount:
            raise InvalidArgument(f"mountpoint {a.mountpoint} is used twice ({seen_mount[a.mountpoint].source} and "
                                  f"{a.source}); give each disk its own mountpoint")
        if a.name in seen_name:
            raise InvalidArgument(f'two attached disks are named "{a.name}" ({seen_name[a.name].source} and '
                                  f"{a.source}); name them with --disk/--bundle NAME=PATH:MOUNT")
        key = ("volume", a.source) if a.kind == "volume" else ("file", os.path.realpath(a.source))
        if a.kind != "bundle" and key in seen_src:  # each bundle builds its own disk; others are shared files
            raise InvalidArgument(f"{a.source} is attached twice; attach each disk once")
        seen_mount[a.mountpoint] = seen_name[a.name] = seen_src[key] = a
    return items
