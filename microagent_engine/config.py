"""Engine-wide settings and rules: the state directory, resource profiles, defaults, and the validation rules
for names, environment keys, hostnames and choices. Every front-end calls these; none keeps a copy."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgument
from .protocol import NetworkMode

STATE_DIR_ENV = "MICROAGENT_STATE_DIR"
KERNEL_ENV = "MICROAGENT_KERNEL"
ACCEL_ENV = "MICROAGENT_ACCEL"
QEMU_ENV = "MICROAGENT_QEMU"
#: the resolv.conf whose nameservers answer the guests' DNS (through the engine's forwarder); default /etc/resolv.conf
RESOLV_CONF_ENV = "MICROAGENT_RESOLV_CONF"

MAX_NAME_LEN = 63
RESTART_POLICIES = ("never", "on-failure", "always")
#: user-facing network mode -> the value recorded and sent to the guest agent
NETWORK_MODES = {"user": NetworkMode.USER, "isolated": NetworkMode.NONE, "none": NetworkMode.NONE}
NETWORK_CHOICES = ("user", "isolated")
#: ``--accel``: pick KVM where it works (else TCG), or force one
ACCEL_CHOICES = ("auto", "kvm", "tcg")
#: how long a boot may take before the workspace is marked failed, by accelerator (TCG emulates every instruction)
BOOT_TIMEOUTS = {"kvm": 30.0, "tcg": 90.0}
#: the largest disk image (rootfs or volume) in MiB: ext4 with 4 KiB blocks, the format of both the host file
#: holding the image on a typical host and the guest filesystem inside it, holds files up to 16 TiB minus one
#: block. Images are sparse, so free space is not required up front (a guest filling its disk gets ENOSPC).
MAX_DISK_MIB = 16 * 1024 * 1024 - 1
#: resource keyword -> the name users see for it (spec/REST/JSON casing)
#: the largest file ``cp`` / ``output get`` copy out of a guest disk unless raised with ``--max-size``: its logical
#: size (holes are kept, so it also bounds the host disk the copy uses, and the time spent reading the holes)
DEFAULT_MAX_COPY = 8 << 30
#: the largest output ``output get`` without a destination holds in memory (to print or show it)
MAX_INLINE_OUTPUT = 64 << 20
_SIZE_SYNTAX = f"bytes, or with K/M/G/T, e.g. 20G; default {DEFAULT_MAX_COPY >> 30}G"
MAX_SIZE_HELP = (f"refuse a guest file larger than SIZE ({_SIZE_SYNTAX}); holes are kept, so the host disk used is at "
                 f"most the file's data")
COMMIT_MAX_SIZE_HELP = f"refuse when the rootfs's files add up to more than SIZE ({_SIZE_SYNTAX})"
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
RESOURCE_NAMES = {"memory_mib": "memoryMiB", "cpus": "cpuCount", "size_mib": "sizeMiB"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def default_state_dir() -> Path:
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".microagent"


def validate_name(name: str, kind: str = "workspace") -> str:
    """Return ``name`` if it is a safe workspace/volume name, else raise InvalidArgument saying why."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{kind} name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidArgument(f"{kind} name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"{kind} name {name[:20]!r}... is {len(name)} characters; the limit is {MAX_NAME_LEN}")
    if "/" in name or name in (".", "..") or ".." in name:
        raise InvalidArgument(f"{kind} name {name!r} must not contain '/' or '..'")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


@functools.lru_cache(maxsize=1)
def host_capacity() -> tuple[int, int]:
    """(RAM in MiB, CPU cores) of this host, read once: the upper bounds of a workspace's memory and vCPUs."""
    try:
        ram_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        ram_mib = 0
    return max(ram_mib, 1), max(os.cpu_count() or 1, 1)


def resource_limit(key: str) -> int:
    """The upper bound of resource ``key`` (``memory_mib``, ``cpus`` or ``size_mib``): the host's RAM in MiB,
    its CPU cores, or :data:`MAX_DISK_MIB`."""
    ram_mib, cores = host_capacity()
    return {"memory_mib": ram_mib, "cpus": cores, "size_mib": MAX_DISK_MIB}[key]


def validate_resource(key: str, value: Any, label: str | None = None) -> int:
    """``value`` if it is a whole number from 1 to :func:`resource_limit` for ``key``, else InvalidArgument.
    ``label`` names the value in the message (a flag such as ``--memory``; default the JSON field name).
    The one rule for explicit memory, vCPU and disk sizes from the CLI, the spec, REST and Python."""
    label = label or RESOURCE_NAMES[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{label} must be a positive whole number, got {str(value)[:40]!r}")
    if value <= 0:
        raise InvalidArgument(f"{label} must be a positive whole number, got {value}")
    limit = resource_limit(key)
    if value > limit:
        what = {"memory_mib": f"this host's RAM ({limit} MiB)", "cpus": f"this host's CPU cores ({limit})",
                "size_mib": f"the largest disk image ({limit} MiB, ext4's 16 TiB file limit)"}[key]
        shown = value if value.bit_length() < 64 else f"a {value.bit_length()}-bit number"
        raise InvalidArgument(f"{label} {shown} exceeds {what}; use at most {limit}")
    return value


def validate_text(value: Any, what: str) -> str:
    """``value`` if it is a string without NUL bytes (a guest command, path or image reference), else
    InvalidArgument naming ``what``."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidArgument(f"{what} must not contain a NUL byte")
    return value


def validate_env_key(key: str) -> str:
    """An environment variable name: letters, digits and '_', not starting with a digit."""
    if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
        raise InvalidArgument(f"invalid environment variable name {key!r}: use letters, digits and '_', not "
                              f"starting with a digit (e.g. MY_VAR)")
    return key


def validate_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with every key checked and every value a string without NUL bytes."""
    for key, value in env.items():
        validate_env_key(key)
        if not isinstance(value, str) or "\0" in value:
            raise InvalidArgument(f"environment variable {key}: the value must be a string without NUL bytes")
    return dict(env)


def validate_hostname(hostname: str) -> str:
    """A Linux hostname (RFC 1123 label): up to 63 lowercase letters, digits and '-', no '-' at either end."""
    if not isinstance(hostname, str) or not hostname or len(hostname) > 63 or hostname != hostname_for(hostname):
        raise InvalidArgument(f"invalid hostname {hostname!r}: use up to 63 lowercase letters, digits and '-', "
                              f"not starting or ending with '-' (e.g. {hostname_for(str(hostname))!r})")
    return hostname


def validate_choice(value: str, choices: tuple[str, ...] | dict[str, str], what: str) -> str:
    """``value`` if it is one of ``choices``, else InvalidArgument listing them."""
    if value not in choices:
        raise InvalidArgument(f"unknown {what} {value!r}; use one of: {', '.join(choices)}")
    return value


def parse_env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings from ``-e`` flags; ``KEY`` alone passes the host's value, as docker does."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            if key in os.environ:
                value = os.environ[key]
            else:
                raise InvalidArgument(f"-e {pair!r}: use KEY=VALUE (or KEY to pass the host's value)")
        out[key] = value
    return out


def hostname_for(name: str) -> str:
    """The workspace name sanitised as a Linux hostname (RFC 1123 label, at most 63 chars)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "microagent"


@dataclass(frozen=True)
class Profile:
    name: str
    memory_mib: int
    cpus: int
    disk_mib: int


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("tiny", 256, 1, 512),
        Profile("small", 512, 2, 1024),
        Profile("medium", 2048, 2, 8192),
        Profile("large", 4096, 4, 16384),
    )
}
DEFAULT_PROFILE = "small"


def get_profile(name: str | None) -> Profile:
    key = name or DEFAULT_PROFILE
    try:
        return PROFILES[key]
    except KeyError:
        raise InvalidArgument(f"unknown profile {key!r}; choose one of: {', '.join(PROFILES)}") from None


def parse_size(value: str | int, what: str = "--max-size") -> int:
    """Bytes from ``1048576``, ``512M``, ``8G``, ``2T`` (binary units; ``KiB``/``MiB``/``GiB``/``TiB`` also read)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.I)
        if not m:
            raise InvalidArgument(f"{what} {value!r} is not a size; give bytes or a number with K, M, G or T, e.g. 20G")
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if n <= 0:
        raise InvalidArgument(f"{what} must be positive, e.g. 20G")
    return n


def human_size(n: int) -> str:
    """``3221225472`` -> ``3.0 GiB`` (for messages)."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} bytes"
