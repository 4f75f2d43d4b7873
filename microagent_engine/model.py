"""The typed objects a workspace is made of, and the one parser of their command-line forms.

``Engine.create`` takes these objects. The CLI and the magics build them from their string forms
(``-v SRC:DST[:ro|rw]``, ``--disk/--bundle NAME=PATH:MOUNT[:ro|rw]``, ``--output NAME=/path``,
``--mediation PORT=HOST:PORT``, ``-p [HOST_IP:]HOST_PORT:GUEST_PORT``) with the ``parse_*`` functions here; the
spec loader and the REST API build them from JSON with ``from_json``. Whatever checks a front-end makes (e.g.
REST's allowed roots) read the same objects the engine then executes.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import validate_name
from .errors import InvalidArgument
from .network_policy import NetworkPolicy, policy_of
from .storage.attachments import (
    BUNDLE_SUFFIXES,
    DIR_GUIDANCE,
    DISK_SUFFIXES,
    check_bundle_file,
    check_ext4_file,
)
from .storage.debugfs import normalize_guest_path

ATTACHMENT_KINDS = ("volume", "disk", "bundle")
#: guest paths a disk may not be mounted on (or under, for the pseudo filesystems)
RESERVED_MOUNTS = ("/", "/proc", "/sys", "/dev")


def _expect(data: Any, what: str, keys: Iterable[str], required: Iterable[str]) -> dict[str, Any]:
    """``data`` as a mapping with only ``keys`` and all of ``required``; InvalidArgument otherwise."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what} must be an object, got {type(data).__name__}")
    unknown = set(data) - set(keys)
    if unknown:
        raise InvalidArgument(f"{what}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                              f"known: {', '.join(keys)}")
    missing = [k for k in required if data.get(k) in (None, "")]
    if missing:
        raise InvalidArgument(f"{what}: missing {', '.join(missing)}")
    return data


def _str(data: dict[str, Any], key: str, what: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise InvalidArgument(f"{what}.{key} must be a string")
    return value


def validate_mountpoint(mountpoint: str) -> str:
    """An absolute, normalized guest mountpoint other than ``/`` (a trailing ``/`` is dropped)."""
    if not mountpoint.startswith("/"):
        raise InvalidArgument(f"mountpoint {mountpoint!r} must be an absolute guest path, e.g. /data")
    if re.search(r"[\s\x00-\x1f\x7f,\"'\\:]", mountpoint):
        raise InvalidArgument(f"mountpoint {mountpoint!r} contains whitespace, a quote, a comma, a colon or a "
                              f"control character; choose a plain path such as /data")
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


# ---- attachments --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attachment:
    """One disk to attach. ``source`` is a volume name (kind ``volume``) or an absolute host path."""

    kind: str
    name: str
    source: str
    mountpoint: str
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ATTACHMENT_KINDS:
            raise InvalidArgument(f"attachment kind {self.kind!r} must be one of {', '.join(ATTACHMENT_KINDS)}")
        validate_name(self.name, self.kind)
        if self.kind == "volume":
            validate_name(self.source, "volume")
        elif not os.path.isabs(self.source) or os.path.normpath(self.source) != self.source:
            raise InvalidArgument(f"{self.kind} {self.name}: source {self.source!r} must be an absolute, "
                                  f"normalized host path")
        object.__setattr__(self, "mountpoint", validate_mountpoint(self.mountpoint))

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"

    @property
    def host_path(self) -> Path | None:
        """The host file behind a disk or bundle (None for a named volume)."""
        return None if self.kind == "volume" else Path(self.source)

    def check_host_file(self) -> None:
        """NotFound/InvalidArgument unless a disk is an ext4 file and a bundle a tar archive."""
        if self.kind == "disk":
            check_ext4_file(self.source, f"disk {self.name}")
        elif self.kind == "bundle":
            check_bundle_file(self.source, f"bundle {self.name}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "source": self.source, "mountpoint": self.mountpoint,
                "readOnly": self.read_only}

    @classmethod
    def from_json(cls, data: Any) -> "Attachment":
        """From ``{kind, source, mountpoint, name?, readOnly?}``; a disk/bundle name defaults from its file."""
        d = _expect(data, "attachment", ("kind", "name", "source", "mountpoint", "readOnly"),
                    ("kind", "source", "mountpoint"))
        kind, source = _str(d, "kind", "attachment"), _str(d, "source", "attachment")
        if kind != "volume":
            if not os.path.isabs(source):
                raise InvalidArgument(f"attachment source {source!r} must be an absolute host path")
            source = os.path.normpath(source)
        name = d.get("name") or (source if kind == "volume" else _name_from_path(source))
        read_only = d.get("readOnly", kind == "bundle")
        if not isinstance(read_only, bool):
            raise InvalidArgument("attachment.readOnly must be true or false")
        return cls(kind, str(name), source, _str(d, "mountpoint", "attachment"), read_only)


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


def _parse_named(value: str, flag: str, kind: str, default_ro: bool) -> Attachment:
    example = f"{flag} name=/path{'.ext4' if kind == 'disk' else '.tar'}:/mount:{'ro' if default_ro else 'rw'}"
    name, sep, rest = value.partition("=")
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(f"{flag} {value!r}: expected NAME=PATH:MOUNT[:ro|rw], e.g. {example}")
    validate_name(name, kind)
    (check_ext4_file if kind == "disk" else check_bundle_file)(parts[0], flag)
    return Attachment(kind, name, os.path.abspath(parts[0]), validate_mountpoint(parts[1]),
                      _mode(parts[2] if len(parts) == 3 else None, default_ro, flag))


def parse_disk_flag(value: str) -> Attachment:
    """``--disk name=/path.ext4:/mount[:ro|rw]`` (default rw): an existing ext4 image you manage."""
    return _parse_named(value, "--disk", "disk", False)


def parse_bundle_flag(value: str) -> Attachment:
    """``--bundle name=/path.tar:/mount[:ro|rw]`` (default ro): a tar built into a one-shot disk at start."""
    return _parse_named(value, "--bundle", "bundle", True)


def parse_attachment_flags(volumes: Iterable[str] = (), disks: Iterable[str] = (),
                           bundles: Iterable[str] = ()) -> list[Attachment]:
    """The attachments of ``-v``, ``--disk`` and ``--bundle`` flags, in that order."""
    return ([parse_volume_flag(v) for v in volumes] + [parse_disk_flag(d) for d in disks]
            + [parse_bundle_flag(b) for b in bundles])


def validate_attachments(attachments: Iterable[Attachment]) -> list[Attachment]:
    """InvalidArgument on duplicate mountpoints, names or sources across one workspace's attachments."""
    items = list(attachments)
    seen_mount: dict[str, Attachment] = {}
    seen_name: dict[str, Attachment] = {}
    seen_src: dict[tuple[str, str], Attachment] = {}
    for a in items:
        if not isinstance(a, Attachment):
            raise InvalidArgument(f"attachments must be Attachment objects (see microagent_engine.model), "
                                  f"got {type(a).__name__}")
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


# ---- outputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """A declared output: a guest file read back from the stopped workspace's disks by name."""

    name: str
    path: str

    def __post_init__(self) -> None:
        validate_name(self.name, "output")
        object.__setattr__(self, "path", normalize_guest_path(self.path))

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}

    @classmethod
    def from_json(cls, data: Any) -> "Output":
        d = _expect(data, "output", ("name", "path"), ("name", "path"))
        return cls(_str(d, "name", "output"), _str(d, "path", "output"))


def parse_output_flag(value: str) -> Output:
    """``--output NAME=/guest/path``."""
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise InvalidArgument(f"--output {value!r}: use NAME=/guest/path, e.g. report=/work/report.json")
    return Output(name, path)


def validate_outputs(outputs: Iterable[Output]) -> list[Output]:
    items = list(outputs)
    names = [o.name for o in items]
    for name in names:
        if names.count(name) > 1:
            raise InvalidArgument(f"output {name!r} is declared twice")
    return items


# ---- mediation ----------------------------------------------------------------------------------------
def parse_host_port(text: str, what: str = "target") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port). An IPv6 host must be in brackets."""
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be a string HOST:PORT")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InvalidArgument(f"{what} {text!r} has no port; write it as HOST:PORT, e.g. 127.0.0.1:9900")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidArgument(f"{what} {text!r}: unbalanced brackets; write e.g. [::1]:9900")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise InvalidArgument(f"{what} {text!r}: write an IPv6 host in brackets, e.g. [::1]:9900")
    elif not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
        raise InvalidArgument(f"{what} {text!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} {text!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Mediation:
    """Guest programs connect to ``127.0.0.1:port`` in the guest; the supervisor relays to ``host:target_port``."""

    port: int
    host: str
    target_port: int
    required: bool = False
    fail_closed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise InvalidArgument(f"mediation port {self.port!r} is out of range; use a port from 1 to 65535")
        parse_host_port(self.target)  # validates host and port

    @property
    def target(self) -> str:
        return format_host_port(self.host, self.target_port)

    def to_json(self) -> dict[str, Any]:
        return {"enabled": True, "port": self.port, "target": self.target, "required": self.required,
                "failClosed": self.fail_closed}

    @classmethod
    def from_json(cls, data: Any) -> "Mediation | None":
        """From ``{port, target, enabled?, required?, failClosed?}``; None when ``enabled`` is false."""
        d = _expect(data, "mediation", ("enabled", "port", "target", "required", "failClosed"), ())
        if d.get("enabled", True) is False:
            return None
        if d.get("port") is None or d.get("target") is None:
            raise InvalidArgument("mediation needs a guest port (1-65535) and a target HOST:PORT")
        port = d["port"]
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not isinstance(port, int) or isinstance(port, bool):
            raise InvalidArgument(f"mediation port {port!r} is not a number from 1 to 65535")
        host, tport = parse_host_port(d["target"], "mediation target")
        flags = {k: d.get(k, False) for k in ("required", "failClosed")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise InvalidArgument(f"mediation.{key} must be true or false")
        return cls(port, host, tport, flags["required"], flags["failClosed"])


def parse_mediation_flag(value: str) -> Mediation:
    """``--mediation PORT=HOST:PORT``: required and fail-closed, as a flag asks for a working channel."""
    port, sep, target = value.partition("=")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"--mediation {value!r}: use GUEST_PORT=HOST:PORT, e.g. 2048=127.0.0.1:9900")
    host, tport = parse_host_port(target, "--mediation target")
    return Mediation(int(port), host, tport, required=True, fail_closed=True)


# ---- published ports ----------------------------------------------------------------------------------
#: the host address a published port binds to unless the user names another one
PUBLISH_DEFAULT_HOST_IP = "127.0.0.1"
_PUBLISH_EXAMPLE = "e.g. -p 8888:8888, -p 0:8888 (any free host port) or -p 0.0.0.0:8080:80"


def _port_number(value: Any, what: str, allow_zero: bool) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise InvalidArgument(f"{what} {value!r} is not a port number from {low} to 65535"
                              + (" (0: any free port)" if allow_zero else ""))
    return value


def _host_ip(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be an IP address string such as 127.0.0.1")
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not an IP address (a host name is not accepted); use e.g. "
                              f"127.0.0.1, 0.0.0.0 or [::1]") from None


@dataclass(frozen=True)
class Publish:
    """A host TCP port forwarded into the guest over the agent channel (works with ``--network isolated``):
    connections to ``host_ip:host_port`` on the host reach ``127.0.0.1:guest_port`` in the guest.
    ``host_port`` 0 picks a free port at each start; binding a non-loopback ``host_ip`` must be asked for."""

    host_port: int
    guest_port: int
    host_ip: str = PUBLISH_DEFAULT_HOST_IP

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_port", _port_number(self.host_port, "published host port", True))
        object.__setattr__(self, "guest_port", _port_number(self.guest_port, "published guest port", False))
        object.__setattr__(self, "host_ip", _host_ip(self.host_ip, "published host IP"))

    @property
    def host_address(self) -> str:
        return format_host_port(self.host_ip, self.host_port)

    def __str__(self) -> str:
        return f"{self.host_address}->{self.guest_port}"

    def to_json(self) -> dict[str, Any]:
        return {"hostIp": self.host_ip, "hostPort": self.host_port, "guestPort": self.guest_port}

    @classmethod
    def from_json(cls, data: Any) -> "Publish":
        """From ``{hostPort, guestPort, hostIp?}`` or the flag's string form ``[HOST_IP:]HOST_PORT:GUEST_PORT``."""
        if isinstance(data, str):
            return parse_publish_flag(data)
        d = _expect(data, "publish", ("hostIp", "hostPort", "guestPort"), ("hostPort", "guestPort"))
        return cls(d["hostPort"], d["guestPort"], d.get("hostIp") or PUBLISH_DEFAULT_HOST_IP)


def parse_publish_flag(value: str) -> Publish:
    """``-p/--publish [HOST_IP:]HOST_PORT:GUEST_PORT`` (an IPv6 HOST_IP in brackets); HOST_IP defaults to
    127.0.0.1, so a published port is reachable from this host only unless an address is named."""
    if not isinstance(value, str):
        raise InvalidArgument(f"--publish must be a string [HOST_IP:]HOST_PORT:GUEST_PORT, {_PUBLISH_EXAMPLE}")
    rest, sep, guest = value.rpartition(":")
    if not sep or not rest:
        raise InvalidArgument(f"--publish {value!r}: expected [HOST_IP:]HOST_PORT:GUEST_PORT, {_PUBLISH_EXAMPLE}")
    ip, sep, host = rest.rpartition(":")
    if sep and not ip:
        raise InvalidArgument(f"--publish {value!r}: empty HOST_IP; {_PUBLISH_EXAMPLE}")
    if ip.startswith("[") != ip.endswith("]") or (":" in ip and not ip.startswith("[")):
        raise InvalidArgument(f"--publish {value!r}: write an IPv6 host address in brackets, e.g. [::1]:8080:80")
    try:
        return Publish(_port_number(host, "host port", True), _port_number(guest, "guest port", False),
                       ip or PUBLISH_DEFAULT_HOST_IP)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--publish {value!r}: {exc}; {_PUBLISH_EXAMPLE}") from None


def validate_publish(items: Iterable[Publish]) -> list[Publish]:
    """InvalidArgument on non-Publish items or a host address published twice."""
    out = list(items)
    seen: set[tuple[str, int]] = set()
    for p in out:
        if not isinstance(p, Publish):
            raise InvalidArgument(f"publish entries must be Publish objects (see microagent_engine.model."
                                  f"parse_publish_flag), got {type(p).__name__}")
        key = (p.host_ip, p.host_port)
        if p.host_port and key in seen:
            raise InvalidArgument(f"host address {p.host_address} is published twice; publish each host port once")
        seen.add(key)
    return out


# ---- files copied in at create -----------------------------------------------------------------------
@dataclass(frozen=True)
class FileCopy:
    """A host file copied into the rootfs at create time."""

    src: Path
    dst: str
    mode: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dst", normalize_guest_path(self.dst))
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise InvalidArgument(f"file mode {oct(self.mode)} for {self.dst} is not a valid permission mode")


# ---- what the supervisor is launched with ------------------------------------------------------------
@dataclass
class LaunchSpec:
    """Everything the supervisor needs to run a workspace's VM (written to ``run/launch.json``)."""

    argv: list[str]
    hostname: str
    network: str
    shell: str
    env: dict[str, str]
    accel: str
    boot_timeout: float
    mounts: list[list[str]]
    setup: list[str]
    entrypoint: str | None
    restart: str
    mediation: Mediation | None = None
    network_policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    publish: list[Publish] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific launch data (e.g. confinement)
    secrets: list[dict[str, Any]] = field(default_factory=list)  # {name, hosts, placeholder}: never a value
    #: placeholder -> value, handed over a pipe at start (``--secrets-fd``): never serialised
    secret_values: dict[str, str] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"argv": self.argv, "hostname": self.hostname, "network": self.network, "shell": self.shell,
                "env": self.env, "accel": self.accel, "bootTimeout": self.boot_timeout, "mounts": self.mounts,
                "setup": self.setup, "entrypoint": self.entrypoint, "restart": self.restart,
                "mediation": self.mediation.to_json() if self.mediation else None,
                "networkPolicy": self.network_policy.to_json(), "publish": [p.to_json() for p in self.publish],
                "extra": self.extra, "secrets": self.secrets}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LaunchSpec":
        med = data["mediation"]
        return cls(argv=list(data["argv"]), hostname=data["hostname"], network=data["network"],
                   shell=data["shell"], env=dict(data["env"]), accel=data["accel"],
                   boot_timeout=float(data["bootTimeout"]), mounts=[list(m) for m in data["mounts"]],
                   setup=list(data["setup"]), entrypoint=data["entrypoint"], restart=data["restart"],
                   mediation=Mediation.from_json(med) if med else None,
                   network_policy=policy_of(data["network"], data.get("networkPolicy")),
                   publish=[Publish.from_json(p) for p in data.get("publish") or []],
                   extra=dict(data.get("extra") or {}), secrets=list(data.get("secrets") or []))
