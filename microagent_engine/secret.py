"""Secrets that never enter the guest (issue 18): ``--secret NAME[=SOURCE]@HOST[,HOST...]``.

The guest's environment holds a placeholder under NAME. The engine reads the real value from the host when the
workspace starts (``SOURCE``: ``env:VAR``, default ``env:NAME``, or ``file:/path``) and hands it to the supervisor
over a pipe; it is never written to a record, a log or status. The egress proxy terminates TLS to the bound hosts
with the workspace's own CA (which the guest trusts; its key stays on the host) and replaces the placeholder with
the value in the HTTP request headers sent to those hosts only. A request anywhere else carries the placeholder.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from .config import validate_env_key
from .errors import InvalidArgument, NotFound
from .network_policy import AllowEntry

MAX_SECRETS = 32
MAX_VALUE = 16 * 1024  # bytes of one secret's value
PLACEHOLDER_PREFIX = "microagent-secret-"
FLAG_SYNTAX = "NAME[=env:VAR|file:/path]@HOST[,HOST...]"


@dataclass(frozen=True)
class Secret:
    """A secret bound to the hosts that may receive it."""

    name: str  # the guest environment variable holding the placeholder
    hosts: tuple[str, ...]  # host names or *.suffix wildcards (port-less)
    source: str = ""  # "env:VAR" or "file:/path"; "" is env:NAME

    def __post_init__(self) -> None:
        validate_env_key(self.name)
        if not self.hosts:
            raise InvalidArgument(f"secret {self.name}: bind it to at least one host, e.g. {self.name}@api.example.com")
        hosts = []
        for host in self.hosts:
            try:
                entry = AllowEntry.parse(host) if isinstance(host, str) else None
            except InvalidArgument:
                entry = None
            if entry is None or not entry.is_name or entry.port is not None:
                raise InvalidArgument(f"secret {self.name}: {host!r} is not a host name or *.suffix (no address, no "
                                      f"port): a secret goes only to the hosts named")
            hosts.append(entry.target)
        object.__setattr__(self, "hosts", tuple(dict.fromkeys(hosts)))
        kind, _, rest = self.source.partition(":")
        if self.source and (kind not in ("env", "file") or not rest):
            raise InvalidArgument(f"secret {self.name}: source {self.source!r} must be env:VAR or file:/path")
        if kind == "env":
            validate_env_key(rest)
        if kind == "file" and not os.path.isabs(rest):
            raise InvalidArgument(f"secret {self.name}: file {rest!r} must be an absolute host path")

    def bound_to(self, host: str) -> bool:
        """Whether ``host`` (lower-case, no final dot) may receive this secret."""
        return any(AllowEntry(h).matches(host) for h in self.hosts)

    def read_value(self, environ: Mapping[str, str] | None = None) -> str:
        """The value, read now on the host (NotFound/InvalidArgument saying what to set)."""
        kind, _, rest = (self.source or f"env:{self.name}").partition(":")
        if kind == "env":
            value = (os.environ if environ is None else environ).get(rest)
            if value is None:
                raise NotFound(f"secret {self.name}: ${rest} is not set in the environment that starts the "
                               f"workspace; export it (or give the secret as {self.name}=file:/path@HOST)")
        else:
            try:
                with open(rest, "rb") as fh:
                    raw = fh.read(MAX_VALUE + 1)
            except OSError as exc:
                raise NotFound(f"secret {self.name}: cannot read {rest} ({exc.strerror or exc})") from None
            if len(raw) > MAX_VALUE:
                raise InvalidArgument(f"secret {self.name}: {rest} is larger than {MAX_VALUE} bytes")
            try:
                value = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InvalidArgument(f"secret {self.name}: {rest} is not UTF-8 text") from None
        if not value or len(value.encode()) > MAX_VALUE or any(c in value for c in "\r\n\0"):
            raise InvalidArgument(f"secret {self.name}: the value is empty, larger than {MAX_VALUE} bytes, or holds "
                                  f"a line break or NUL (it goes into an HTTP header)")
        return value

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "hosts": list(self.hosts), **({"source": self.source} if self.source else {})}

    @classmethod
    def from_json(cls, data: Any) -> "Secret":
        if isinstance(data, str):
            return parse_secret_flag(data)
        keys = set(data) if isinstance(data, dict) else set()
        if not isinstance(data, dict) or keys - {"name", "hosts", "source"} or not {"name", "hosts"} <= keys:
            raise InvalidArgument(f"secrets entries must be {{name, hosts, source?}} objects or {FLAG_SYNTAX}")
        hosts = data["hosts"]
        if isinstance(hosts, str) or not isinstance(hosts, list):
            raise InvalidArgument("secrets[].hosts must be a list of host names")
        source = data.get("source", "")
        if not isinstance(data["name"], str) or not isinstance(source, str):
            raise InvalidArgument("secrets[].name and secrets[].source must be strings")
        return cls(data["name"], tuple(hosts), source)


def parse_secret_flag(value: str) -> Secret:
    """``--secret NAME[=SOURCE]@HOST[,HOST...]``."""
    spec, sep, hosts = value.rpartition("@")
    if not sep or not spec or not hosts:
        raise InvalidArgument(f"--secret {value!r}: expected {FLAG_SYNTAX}, e.g. "
                              f"--secret OPENAI_API_KEY@api.openai.com")
    name, _, source = spec.partition("=")
    return Secret(name, tuple(h.strip() for h in hosts.split(",") if h.strip()), source)


def validate_secrets(items: list[Secret]) -> list[Secret]:
    if len(items) > MAX_SECRETS:
        raise InvalidArgument(f"{len(items)} secrets given; at most {MAX_SECRETS}")
    names = [s.name for s in items]
    for name in names:
        if names.count(name) > 1:
            raise InvalidArgument(f"secret {name} is given twice")
    return items


def new_placeholder(name: str) -> str:
    """The guest's stand-in for secret ``name``: unguessable, so it cannot be forged into another header."""
    return f"{PLACEHOLDER_PREFIX}{name}-{secrets.token_hex(16)}"
