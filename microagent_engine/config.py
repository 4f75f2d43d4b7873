"""Engine-wide settings and rules: the state directory, resource profiles, defaults, and the validation rules
for names, environment keys, hostnames and choices. Every front-end calls these; none keeps a copy."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument

STATE_DIR_ENV = "MICROAGENT_STATE_DIR"
KERNEL_ENV = "MICROAGENT_KERNEL"
ACCEL_ENV = "MICROAGENT_ACCEL"
QEMU_ENV = "MICROAGENT_QEMU"

MAX_NAME_LEN = 63
RESTART_POLICIES = ("never", "on-failure", "always")
#: user-facing network mode -> the value recorded and sent to the guest agent
NETWORK_MODES = {"user": "user", "isolated": "none", "none": "none"}
NETWORK_CHOICES = ("user", "isolated")
ACCEL_CHOICES = ("auto", "kvm", "tcg")
#: how long a boot may take before the workspace is marked failed, by accelerator (TCG emulates every instruction)
BOOT_TIMEOUTS = {"kvm": 30.0, "tcg": 90.0}
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
