"""What a workspace is asked to be: one frozen, validated :class:`WorkspaceSpec`, built once from each surface.

Every surface builds the same object: the CLI and the magics from one argparse group (:mod:`.spec_args`), the
``microagent.yaml`` loader, the REST API and the sandboxed kernel's config from one JSON form
(:meth:`WorkspaceSpec.from_json`). ``Engine.create(name, spec)`` executes it and the workspace's record embeds its
JSON form. A field is None when the request did not set it (the engine's default then applies); the merge rules
of two requests (a spec file under command-line flags, say) live in :meth:`WorkspaceSpec.merged`.

A new field is added here (with its JSON key and schema), in the argparse group if it has a flag, and where the
engine executes it: nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import (
    ACCEL_CHOICES,
    PROFILES,
    RESTART_POLICIES,
    validate_choice,
    validate_env,
    validate_hostname,
    validate_name,
    validate_resource,
    validate_text,
)
from .errors import InvalidArgument
from .images.builtin import PYTHON_REF, accepts_packages, canonical, check_builtin_name
from .images.debian import parse_packages
from .model import (
    Attachment,
    FileCopy,
    Mediation,
    Output,
    Publish,
    validate_attachments,
    validate_outputs,
    validate_publish,
)
from .network_policy import NetworkPolicy
from .secret import Secret, validate_secrets

#: what may be given with ``fromSnapshot`` (the snapshot fixes everything else)
SNAPSHOT_FIELDS = ("hostname", "env")


def _json(key: str, schema: dict[str, Any], flag: str) -> dict[str, Any]:
    return {"json": key, "schema": schema, "flag": flag}


_STR = {"type": "string"}
_STRS = {"type": "array", "items": {"type": "string"}}
_INT = {"type": "integer", "minimum": 1}


@dataclass(frozen=True)
class WorkspaceSpec:
    """A workspace request. Validated when built (each field on its own); :meth:`check` adds the rules between
    fields, which hold only for a whole request (a spec file's fields may be completed by flags)."""

    image: str | None = field(default=None, metadata=_json("image", _STR, "--image"))
    packages: tuple[str, ...] | None = field(default=None, metadata=_json("packages", _STRS, "--packages"))
    profile: str | None = field(default=None, metadata=_json(
        "profile", {"type": "string", "enum": list(PROFILES)}, "--profile"))
    memory_mib: int | None = field(default=None, metadata=_json("memoryMiB", _INT, "--memory"))
    cpus: int | None = field(default=None, metadata=_json("cpus", _INT, "--cpus"))
    size_mib: int | None = field(default=None, metadata=_json("sizeMiB", _INT, "--size-mib"))
    env: Mapping[str, str] | None = field(default=None, metadata=_json(
        "env", {"type": "object", "additionalProperties": {"type": "string"}}, "-e/--env"))
    hostname: str | None = field(default=None, metadata=_json("hostname", _STR, "--hostname"))
    network: NetworkPolicy | None = field(default=None, metadata=_json("network", {
        "oneOf": [{"type": "string", "enum": ["user", "isolated"]},
                  {"type": "object", "properties": {"mode": {"type": "string", "enum": ["user", "isolated"]},
                                                    "allow": _STRS,
                                                    "hostPorts": {"type": "array", "items": {"type": "integer"}}},
                   "additionalProperties": False}]}, "--network/--allow/--allow-host-port"))
    accel: str | None = field(default=None, metadata=_json(
        "accel", {"type": "string", "enum": list(ACCEL_CHOICES)}, "--accel"))
    kernel: str | None = field(default=None, metadata=_json("kernel", _STR, "--kernel"))
    restart: str | None = field(default=None, metadata=_json(
        "restart", {"type": "string", "enum": list(RESTART_POLICIES)}, "--restart"))
    shell: str | None = field(default=None, metadata=_json("shell", _STR, "--shell"))
    setup: tuple[str, ...] | None = field(default=None, metadata=_json("setup", _STRS, "--setup"))
    entrypoint: str | None = field(default=None, metadata=_json("entrypoint", _STR, "--entrypoint"))
    mediation: Mediation | None = field(default=None, metadata=_json("mediation", {
        "type": "object", "properties": {"enabled": {"type": "boolean"}, "port": {"type": "integer"},
                                         "target": _STR, "required": {"type": "boolean"},
                                         "failClosed": {"type": "boolean"}},
        "additionalProperties": False}, "--mediation"))
    attachments: tuple[Attachment, ...] | None = field(default=None, metadata=_json("attachments", {
        "type": "array", "items": {"type": "object", "required": ["kind", "source", "mountpoint"],
                                   "properties": {"kind": {"type": "string", "enum": ["volume", "disk", "bundle"]},
                                                  "name": _STR, "source": _STR, "mountpoint": _STR,
                                                  "readOnly": {"type": "boolean"}},
                                   "additionalProperties": False}}, "-v/--disk/--bundle"))
    outputs: tuple[Output, ...] | None = field(default=None, metadata=_json("outputs", {
        "type": "array", "items": {"type": "object", "required": ["name", "path"],
                                   "properties": {"name": _STR, "path": _STR}, "additionalProperties": False}},
        "--output"))
    files: tuple[FileCopy, ...] | None = field(default=None, metadata=_json("files", {
        "type": "array", "items": {"type": "object", "required": ["src", "dst"],
                                   "properties": {"src": _STR, "dst": _STR, "mode": {"type": "integer"}},
                                   "additionalProperties": False}}, "files:"))
    publish: tuple[Publish, ...] | None = field(default=None, metadata=_json("publish", {
        "type": "array", "items": {"type": "object", "required": ["hostPort", "guestPort"],
                                   "properties": {"hostIp": _STR, "hostPort": {"type": "integer"},
                                                  "guestPort": {"type": "integer"}},
                                   "additionalProperties": False}}, "-p/--publish"))
    secrets: tuple[Secret, ...] | None = field(default=None, metadata=_json("secrets", {
        "type": "array", "items": {"type": "object", "required": ["name", "hosts"],
                                   "properties": {"name": _STR, "hosts": _STRS, "source": _STR},
                                   "additionalProperties": False}}, "--secret"))
    from_snapshot: str | None = field(default=None, metadata=_json("fromSnapshot", _STR, "--from-snapshot"))
    cold: bool | None = field(default=None, metadata=_json("cold", {"type": "boolean"}, "--cold"))

    def __post_init__(self) -> None:
        def put(attr: str, value: Any) -> None:
            object.__setattr__(self, attr, value)

        for attr, label in (("image", "image"), ("kernel", "kernel"), ("entrypoint", "entrypoint"),
                            ("shell", "shell")):
            if getattr(self, attr) is not None:
                validate_text(getattr(self, attr), label)
        check_builtin_name(self.image)
        if self.shell is not None and not self.shell.startswith("/"):
            raise InvalidArgument(f"shell must be an absolute guest path, got {self.shell!r}")
        if self.packages is not None:
            put("packages", parse_packages(self.packages if not isinstance(self.packages, str)
                                           else [self.packages]) or None)
        if self.profile is not None:
            validate_choice(self.profile, tuple(PROFILES), "profile")
        for attr, label in (("memory_mib", "--memory"), ("cpus", "--cpus"), ("size_mib", "--size-mib")):
            if getattr(self, attr) is not None:
                validate_resource(attr, getattr(self, attr), label)
        if self.env is not None:
            if not isinstance(self.env, Mapping):
                raise InvalidArgument(f"env must be a mapping of names to strings, got {type(self.env).__name__}")
            put("env", types.MappingProxyType(validate_env(dict(self.env))))
        if self.hostname is not None:
            validate_hostname(self.hostname)
        if self.network is not None:
            put("network", NetworkPolicy.parse(self.network))
        if self.accel is not None:
            validate_choice(self.accel, ACCEL_CHOICES, "accelerator")
        if self.restart is not None:
            validate_choice(self.restart, RESTART_POLICIES, "restart policy")
        if self.setup is not None:
            put("setup", tuple(validate_text(cmd, f"setup[{i}]") for i, cmd in enumerate(_items(self.setup))))
        if self.mediation is not None and not isinstance(self.mediation, Mediation):
            put("mediation", Mediation.from_json(self.mediation))
        if self.attachments is not None:
            put("attachments", tuple(validate_attachments(
                a if isinstance(a, Attachment) else Attachment.from_json(a) for a in _items(self.attachments))))
        if self.outputs is not None:
            put("outputs", tuple(validate_outputs(
                o if isinstance(o, Output) else Output.from_json(o) for o in _items(self.outputs))))
        if self.files is not None:
            put("files", tuple(f if isinstance(f, FileCopy) else _file_from_json(f) for f in _items(self.files)))
        if self.publish is not None:
            put("publish", tuple(validate_publish(
                p if isinstance(p, Publish) else Publish.from_json(p) for p in _items(self.publish))))
        if self.secrets is not None:
            put("secrets", tuple(validate_secrets(
                [s if isinstance(s, Secret) else Secret.from_json(s) for s in _items(self.secrets)])) or None)
        if self.from_snapshot is not None:
            validate_name(self.from_snapshot, "snapshot")
        if self.cold is not None and not isinstance(self.cold, bool):
            raise InvalidArgument("cold must be true or false")

    # ---- the whole request ---------------------------------------------------------------------
    def given(self) -> list[str]:
        """The attribute names this request sets."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def check(self) -> "WorkspaceSpec":
        """InvalidArgument when fields contradict each other; the spec itself otherwise."""
        if self.from_snapshot is not None:
            others = [a for a in self.given() if a not in SNAPSHOT_FIELDS + ("from_snapshot",)
                      and not (a == "cold" and self.cold is False)]
            if others:
                raise InvalidArgument(f"--from-snapshot takes the workspace as it was snapshotted; only a name, "
                                      f"--hostname and -e/--env may be given with it (not {', '.join(others)})")
        for secret in self.secrets or ():
            policy = self.network
            for host in secret.hosts:
                probe = "x" + host[1:] if host.startswith("*.") else host
                if policy is None or not policy.allow or not policy.allows_name(probe):
                    raise InvalidArgument(
                        f"secret {secret.name} is bound to {host}, which the network allow-list does not name: a "
                        f"secret reaches only hosts the workspace may reach by name; add --allow {host}")
        if self.packages and not accepts_packages(self.image):
            raise InvalidArgument(f"packages can only be added to the built-in Debian image, not to "
                                  f"{self.image or canonical(self.image)}; use --image {PYTHON_REF}")
        return self

    def merged(self, over: "WorkspaceSpec | None") -> "WorkspaceSpec":
        """This request with ``over``'s fields on top: a field ``over`` sets replaces this one's, except ``env``
        (merged key by key, ``over``'s keys winning) and ``attachments``/``outputs`` (added; an entry of the same
        name, or for attachments the same mountpoint, replaces this one's)."""
        if over is None:
            return self
        out: dict[str, Any] = {}
        for name in over.given():
            new, old = getattr(over, name), getattr(self, name)
            if name == "env" and old is not None:
                new = {**old, **new}
            elif name in ("attachments", "outputs") and old:
                def same(a: Any, b: Any) -> bool:
                    return a.name == b.name or getattr(a, "mountpoint", None) == getattr(b, "mountpoint", 0)
                new = tuple(o for o in old if not any(same(o, n) for n in new)) + tuple(new)
            out[name] = new
        return dataclasses.replace(self, **out)

    # ---- the JSON form -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The fields this request sets, by their JSON keys (what records embed and REST accepts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = [_item_json(v) for v in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            elif hasattr(value, "to_json"):
                value = value.to_json()
            out[f.metadata["json"]] = value
        return out

    @classmethod
    def from_json(cls, data: Any, *, what: str = "workspace spec") -> "WorkspaceSpec":
        """From the JSON form (keys as :meth:`to_json` writes them); unknown keys are refused by name."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidArgument(f"{what} must be an object, got {type(data).__name__}")
        keys = json_keys()
        unknown = sorted(str(k) for k in data if k not in keys)
        if unknown:
            raise InvalidArgument(f"{what}: unknown field(s) {', '.join(unknown)}; known: {', '.join(keys)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            attr = keys[key]
            if value is None:
                continue
            if attr in _LISTS and not isinstance(value, list):
                raise InvalidArgument(f"{what}: {key} must be a list")
            if attr in _STRINGS and not isinstance(value, str):
                raise InvalidArgument(f"{what}: {key} must be a string")
            if attr in _INTS and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidArgument(f"{what}: {key} must be an integer")
            if attr == "env" and (not isinstance(value, dict)
                                  or not all(isinstance(v, str) for v in value.values())):
                raise InvalidArgument(f"{what}: env must be an object of string values")
            kwargs[attr] = value
        return cls(**kwargs)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of :meth:`from_json`'s input (the panel's TypeScript types are generated from it)."""
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "WorkspaceSpec",
                "type": "object", "additionalProperties": False,
                "properties": {f.metadata["json"]: f.metadata["schema"] for f in dataclasses.fields(cls)}}


_LISTS = ("packages", "setup", "attachments", "outputs", "files", "publish", "secrets")
_STRINGS = ("image", "profile", "hostname", "accel", "kernel", "restart", "shell", "entrypoint", "from_snapshot")
_INTS = ("memory_mib", "cpus", "size_mib")


def json_keys() -> dict[str, str]:
    """JSON key -> attribute name, in field order."""
    return {f.metadata["json"]: f.name for f in dataclasses.fields(WorkspaceSpec)}


def _items(value: Any) -> Iterable[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgument(f"expected a list, got {type(value).__name__}")
    return list(value)


def _item_json(value: Any) -> Any:
    if isinstance(value, FileCopy):
        return {"src": str(value.src), "dst": value.dst, **({"mode": value.mode} if value.mode is not None else {})}
    return value.to_json() if hasattr(value, "to_json") else value


def _file_from_json(data: Any) -> FileCopy:
    if not isinstance(data, dict) or set(data) - {"src", "dst", "mode"} or not {"src", "dst"} <= set(data):
        raise InvalidArgument("files entries must be {src, dst, mode?} objects")
    src, dst, mode = data["src"], data["dst"], data.get("mode")
    if not isinstance(src, str) or not os.path.isabs(src):
        raise InvalidArgument(f"files[].src {src!r} must be an absolute host path")
    if not isinstance(dst, str) or (mode is not None and (isinstance(mode, bool) or not isinstance(mode, int))):
        raise InvalidArgument("files[].dst must be a guest path and files[].mode an integer")
    return FileCopy(Path(src), dst, mode)
