"""The workspace spec file: ``microagent.yaml`` parsed strictly into a :class:`~.workspace_spec.WorkspaceSpec`.

Every error names the file, line and field (``microagent.yaml:14: files[0].mode: ...``). Lines come from
PyYAML's composed node tree, which is converted to Python values by a small walker that records where each
field was written.

A spec may come from a cloned repository, so it is read as untrusted input: the file size, the nesting depth,
the number of aliases and the size of the tree they expand to are bounded (no alias bomb hangs the loader, no
nesting overflows the stack), every reader/constructor failure becomes a :class:`SpecError` naming the file,
and host paths (``files[].src``, ``disks[].path``, ``bundles[].path``) must lie inside the spec's directory
(symlinks resolved) unless the caller opts in with ``allow_host_files``.
"""

from __future__ import annotations

import difflib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import (
    PROFILES,
    RESTART_POLICIES,
    hostname_for,
    validate_env,
    validate_env_key,
    validate_hostname,
    validate_name,
    validate_resource,
)
from .errors import InvalidArgument, MicroagentError, SpecError
from .images.debian import parse_packages
from .model import Attachment, FileCopy, Mediation, Output, Publish, parse_host_port, validate_mountpoint, \
    validate_publish
from .network_policy import NetworkPolicy
from .storage.attachments import check_bundle_file, check_ext4_file
from .secret import Secret, validate_secrets
from .workspace_spec import WorkspaceSpec

DISK_MODES = ("ro", "rw")
BUNDLE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_MODE_RE = re.compile(r"^(0o)?[0-7]+$")

#: bounds on a spec as untrusted input (a real spec is a few KiB, a few levels deep, with a handful of aliases)
MAX_SPEC_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_ALIASES = 64
MAX_NODES = 20_000  # the tree after aliases are expanded
MAX_NUMBER_CHARS = 64  # a longer int/float scalar is no resource size (and sexagesimal ints cost quadratic time)
MAX_KEY_CHARS = 128
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


@dataclass(frozen=True)
class FileEntry:
    src: Path  # absolute host path of a regular file
    dst: str  # absolute, normalized guest path
    mode: int | None = None


@dataclass(frozen=True)
class DiskEntry:
    """An entry of ``disks`` or ``bundles``."""

    name: str
    path: Path  # absolute host path
    mountpoint: str
    mode: str  # "ro" | "rw"

    def to_model(self, kind: str) -> Attachment:
        return Attachment(kind, self.name, str(self.path), self.mountpoint, self.mode == "ro")


@dataclass(frozen=True)
class OutputEntry:
    name: str
    path: str  # absolute guest path



@dataclass(frozen=True)
class MediationSpec:
    enabled: bool = False
    required: bool = False
    port: int | None = None
    target: str | None = None  # "host:port"
    fail_closed: bool = False

    def to_model(self) -> Mediation | None:
        """The engine's mediation contract (None when not enabled)."""
        if not self.enabled or self.port is None or self.target is None:
            return None
        host, port = parse_host_port(self.target)
        return Mediation(self.port, host, port, self.required, self.fail_closed)


@dataclass
class SpecFile:
    """A parsed spec file. A field is None when the spec did not set it (the engine's default then applies)."""

    source: Path
    name: str | None = None
    image: str | None = None
    profile: str | None = None
    restart: str | None = None
    entrypoint: str | None = None
    shell: str | None = None
    hostname: str | None = None
    setup: list[str] | None = None
    files: list[FileEntry] | None = None
    env: dict[str, str] | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    size_mib: int | None = None
    mediation: MediationSpec | None = None
    disks: list[DiskEntry] | None = None
    bundles: list[DiskEntry] | None = None
    outputs: list[OutputEntry] | None = None
    network: NetworkPolicy | None = None
    publish: list[Publish] | None = None  # "[HOST_IP:]HOST_PORT:GUEST_PORT" or {hostIp?, hostPort, guestPort}
    packages: list[str] | None = None  # Debian packages added to the built-in Debian image
    secrets: list[Secret] | None = None  # bound to hosts; values are read at start, never from the file

    def effective_hostname(self, name: str) -> str:
        """The hostname the guest gets: the spec's, else ``name`` sanitised by ``config.hostname_for``."""
        return self.hostname or hostname_for(name)

    def workspace_spec(self) -> WorkspaceSpec:
        """The request this file makes (fields it did not set stay None)."""
        attachments = [e.to_model(kind) for kind, entries in (("disk", self.disks), ("bundle", self.bundles))
                       for e in entries or []]
        return WorkspaceSpec(
            image=self.image, profile=self.profile, memory_mib=self.memory_mib, cpus=self.cpus,
            size_mib=self.size_mib, hostname=self.hostname, restart=self.restart, shell=self.shell,
            entrypoint=self.entrypoint, env=self.env, setup=self.setup,
            files=None if self.files is None else [FileCopy(f.src, f.dst, f.mode) for f in self.files],
            mediation=self.mediation.to_model() if self.mediation is not None else None,
            network=self.network,
            attachments=attachments if self.disks is not None or self.bundles is not None else None,
            outputs=None if self.outputs is None else [Output(o.name, o.path) for o in self.outputs],
            publish=self.publish, packages=self.packages, secrets=self.secrets)


def load_spec(path: Path, *, allow_host_files: bool = False) -> SpecFile:
    """Read and validate the spec at ``path``. Host paths in it must lie in its directory unless
    ``allow_host_files`` (the CLI's ``--allow-host-files``)."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise SpecError("is a directory; give the path of a microagent.yaml file", file=path)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError("is not a regular file (a device, pipe or socket); give the path of a microagent.yaml "
                            "file", file=path)
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(f"is {st.st_size} bytes; a spec may be at most {MAX_SPEC_BYTES} bytes", file=path)
        with open(path, "rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError("spec file not found; check the --file path", file=path) from None
    except OSError as exc:
        raise SpecError(f"cannot read the spec file: {exc.strerror or exc}", file=path) from None
    except ValueError as exc:  # e.g. a NUL byte in the path itself
        raise SpecError(f"is not a usable path ({exc})", file=_printable(str(path))) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"is larger than {MAX_SPEC_BYTES} bytes, the limit for a spec", file=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8",
                        file=path, line=data[:exc.start].count(b"\n") + 1) from None
    return parse_spec(text, path, allow_host_files=allow_host_files)


def parse_spec(text: str, source: Path, *, allow_host_files: bool = False) -> SpecFile:
    """Validate spec ``text``; ``source`` names it in errors and anchors relative host paths."""
    source = Path(source)
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"is larger than {MAX_SPEC_BYTES} characters, the limit for a spec", file=source)
    doc = _Doc(source)
    top = doc.load(text)
    return _Validator(doc, allow_host_files=allow_host_files).spec(top)


def _printable(text: str) -> str:
    """``text`` with control characters and lone surrogates escaped, safe to show on a terminal."""
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else
                   json.dumps(c)[1:-1] for c in text)


# --- YAML nodes -> Python values, with the line of every field ---------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the composer bounded: nesting depth and number of aliases."""

    def __init__(self, text: str, source: Path) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML's hook
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise SpecError(f"more than {MAX_ALIASES} YAML aliases ('*name'); write the values out",
                                file=self.source, line=line)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise SpecError(f"nested more than {MAX_DEPTH} levels deep; a spec needs a few levels",
                                file=self.source, line=line)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Doc:
    """The spec converted to plain Python values; ``lines``/``raw`` map a field path to its line / source text."""

    def __init__(self, source: Path):
        self.source = source
        self.lines: dict[str, int] = {}
        self.raw: dict[str, str] = {}
        self.nodes = 0

    def error(self, path: str, problem: str, line: int | None = None) -> SpecError:
        return SpecError(problem, file=self.source, line=line if line is not None else self.lines.get(path),
                         field=path or None)

    def load(self, text: str) -> dict[str, Any]:
        nul = text.find("\0")
        if nul >= 0:
            raise SpecError("contains a NUL byte; a spec is YAML text (is this a binary file?)", file=self.source,
                            line=text.count("\n", 0, nul) + 1)
        loader = None
        try:
            loader = _BoundedLoader(text, self.source)
            root = loader.get_single_node()
            if root is None:
                raise SpecError("the spec is empty; add fields such as 'name:' and 'image:'", file=self.source,
                                line=1)
            if not isinstance(root, yaml.MappingNode):
                kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
                raise SpecError(f"the spec must be a mapping of fields (name:, image:, ...), not {kind}",
                                file=self.source, line=root.start_mark.line + 1)
            return self._convert(loader, root, "", set())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "malformed YAML"
            if problem.startswith("but ") and exc.context:  # "expected X" lives in context
                problem = f"{exc.context}, {problem}"
            hint = "; indent with spaces, not tabs" if "\\t" in problem or "\t" in problem else ""
            raise SpecError(f"invalid YAML: {_printable(problem)}{hint}", file=self.source,
                            line=mark.line + 1 if mark else None) from None
        except yaml.reader.ReaderError as exc:
            char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
            raise SpecError(f"invalid YAML: the character {char} is not allowed in YAML text; remove it",
                            file=self.source, line=text.count("\n", 0, max(exc.position, 0)) + 1) from None
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid YAML: {_printable(str(exc))}", file=self.source) from None
        except RecursionError:  # the bounds above should make this unreachable; never a traceback
            raise SpecError("nested too deeply; a spec needs a few levels", file=self.source) from None
        finally:
            if loader is not None:
                loader.dispose()

    def _scalar(self, loader: yaml.SafeLoader, node: yaml.ScalarNode, path: str) -> Any:
        line = node.start_mark.line + 1
        if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise self.error(path, f"a number of {len(node.value)} characters; no field takes one that long", line)
        try:
            value = loader.construct_object(node, deep=True)
        except (ValueError, OverflowError, TypeError) as exc:  # e.g. a timestamp 2024-13-45
            raise self.error(path, f"{_q(node.value)} cannot be read as {node.tag.rsplit(':', 1)[-1]} ({exc}); "
                                   f"quote it to make it a string", line) from None
        if isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise self.error(path, "contains an escaped UTF-16 surrogate (e.g. \\ud800), which is not a "
                                   "character; remove it", line)
        return value

    def _convert(self, loader: yaml.SafeLoader, node: yaml.Node, path: str, active: set[int]) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.error(path, f"the spec expands to more than {MAX_NODES} values (YAML aliases repeat "
                                   f"their value); write it out plainly", node.start_mark.line + 1)
        if len(active) >= MAX_DEPTH:
            raise self.error(path, f"nested more than {MAX_DEPTH} levels deep (through aliases); a spec needs a "
                                   f"few levels", node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            self.raw[path] = node.value
            return self._scalar(loader, node, path)
        if id(node) in active:
            raise self.error(path, "a YAML alias refers to itself; write the value out", node.start_mark.line + 1)
        if node.tag not in _COLLECTION_TAGS:
            raise self.error(path, f"the YAML tag {_q(node.tag)} is not supported; write a plain list or mapping",
                             node.start_mark.line + 1)
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                child = f"{path}[{i}]"
                self.lines[child] = item.start_mark.line + 1
                items.append(self._convert(loader, item, child, active))
            return items
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(path, "a key is a list or mapping; keys must be plain field names", key_line)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.error(path, "YAML merge keys ('<<') are not supported; write the fields out", key_line)
            key = self._scalar(loader, key_node, path)
            if not isinstance(key, str):
                raise self.error(path, f"key {_printable(key_node.value[:80])} is not a string; quote it: "
                                       f"{_q(key_node.value)}", key_line)
            if len(key) > MAX_KEY_CHARS or not key.isprintable():
                raise self.error(path, f"key {_q(key)} is not a field name (too long, or a control character); "
                                       f"use plain field names", key_line)
            child = f"{path}.{key}" if path else key
            if key in mapping:
                raise self.error(child, f"duplicate key (first set on line {self.lines[child]}); remove one of them",
                                 key_line)
            scalar = isinstance(value_node, yaml.ScalarNode)
            self.lines[child] = value_node.start_mark.line + 1 if scalar else key_line
            mapping[key] = self._convert(loader, value_node, child, active)
        return mapping


# --- validation --------------------------------------------------------------------------------------------

_TOP_FIELDS = ("name", "image", "profile", "restart", "entrypoint", "shell", "hostname", "setup", "files", "env",
               "resources", "mediation", "disks", "bundles", "outputs", "network", "publish", "packages", "secrets")
_FILE_FIELDS = ("src", "dst", "mode")
_RESOURCE_FIELDS = ("memoryMiB", "cpuCount", "sizeMiB")
_MEDIATION_FIELDS = ("enabled", "required", "port", "target", "failClosed")
_DISK_FIELDS = ("name", "path", "mountpoint", "mode")
_OUTPUT_FIELDS = ("name", "path")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__} ({_printable(str(value)[:80])})"


def _q(value: str, limit: int = 120) -> str:
    """``value`` quoted for a message: JSON-escaped, control characters escaped, cut at ``limit`` characters."""
    text = json.dumps(value if len(value) <= limit else value[:limit], ensure_ascii=False)
    return _printable(text) + ("…" if len(value) > limit else "")


class _Checks:
    """Typed readers of a spec's values; each failure is a SpecError naming the file, line and field."""

    def __init__(self, doc: _Doc, *, allow_host_files: bool = False):
        self.doc = doc
        self.base = Path(os.path.abspath(doc.source)).parent
        self.allow_host_files = allow_host_files

    def err(self, path: str, problem: str) -> SpecError:
        return self.doc.error(path, problem)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.err(path, f"expected a mapping with fields {', '.join(allowed)}, got {_describe(value)}")
        for key in value:
            if key not in allowed:
                field_path = f"{path}.{key}" if path else key
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}? " if close else ""
                raise self.err(field_path, f"unknown field; {hint}Allowed fields: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.err(path, f"missing required field '{key}'")
        return value

    def string(self, value: Any, path: str) -> str:
        if isinstance(value, str):
            if not value:
                raise self.err(path, "must not be empty; give a value or remove the field")
            if "\0" in value:
                raise self.err(path, "must not contain a NUL character")
            return value
        if value is None:
            raise self.err(path, "has no value; give a value or remove the field")
        if isinstance(value, (bool, int, float)) or path in self.doc.raw:
            raw = self.doc.raw.get(path, str(value))
            raise self.err(path, f"expected a string, got {_describe(value)}; quote it: {_q(raw)}")
        raise self.err(path, f"expected a string, got {_describe(value)}")

    def choice(self, value: Any, path: str, choices: tuple[str, ...], what: str) -> str:
        value = self.string(value, path)
        if value not in choices:
            raise self.err(path, f"{_q(value)} is not a {what}; choose one of: {', '.join(choices)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.err(path, f"expected true or false, got {_describe(value)}")
        return value

    def positive_int(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(path, f"expected a positive integer, got {_describe(value)}")
        if value <= 0:
            raise self.err(path, f"must be a positive integer, got {value}")
        return value

    def items(self, value: Any, path: str, what: str) -> list:
        if not isinstance(value, list):
            raise self.err(path, f"expected a list of {what}, got {_describe(value)}")
        return value

    def guest_path(self, value: Any, path: str, *, allow_root: bool = False) -> str:
        value = self.string(value, path)
        if not value.startswith("/"):
            raise self.err(path, f"{_q(value)} is not an absolute guest path; use e.g. {_q('/' + value)}")
        if ".." in value.split("/"):
            raise self.err(path, f"{_q(value)} must not contain '..'; write the normalized absolute path")
        norm = posixpath.normpath(value)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        if norm == "/" and not allow_root:
            raise self.err(path, f"{_q(value)} is the root directory; name a path below '/'")
        return norm

    def host_file(self, value: Any, path: str) -> Path:
        """A host path relative to the spec's directory naming an existing regular file. Unless the caller
        allows host files, the path with symlinks resolved must lie inside the spec's directory: a cloned
        repository's spec must not copy ``/etc/shadow`` or ``../../secret`` into an untrusted guest."""
        text = self.string(value, path)
        full = Path(os.path.abspath(self.base / Path(text).expanduser()))
        if not self.allow_host_files:
            real, base = os.path.realpath(full), os.path.realpath(self.base)
            if os.path.commonpath([real, base]) != base:
                raise self.err(path, f"{_q(text)} is outside the spec's directory ({base}); a spec may only "
                                     f"use files beside it. Move the file there, or if you trust this spec, "
                                     f"allow host files (microagent create --allow-host-files, "
                                     f"load_spec(..., allow_host_files=True))")
        if not full.exists():
            raise self.err(path, f"{_q(text)} does not exist (looked at {_printable(str(full))}); relative paths "
                                 f"start at the spec file's directory")
        if not full.is_file():
            raise self.err(path, f"{_q(text)} is not a regular file ({_printable(str(full))}); a directory must be "
                                 f"packed as a tar and listed under bundles")
        return full

    def unique(self, seen: dict[str, str], key: str, path: str, what: str) -> None:
        if key in seen:
            raise self.err(path, f"{what} {_q(key)} is already used by {seen[key]}; each must be unique")
        seen[key] = path


class _Validator(_Checks):
    """The spec's fields, each read into what :class:`SpecFile` holds."""

    def spec(self, top: dict) -> SpecFile:
        self.mapping(top, "", _TOP_FIELDS)
        spec = SpecFile(source=self.doc.source)
        if "name" in top:
            spec.name = self.named(top["name"], "name", "workspace")
        if "image" in top:
            spec.image = self.string(top["image"], "image")
        if "profile" in top:
            spec.profile = self.choice(top["profile"], "profile", tuple(PROFILES), "profile")
        if "restart" in top:
            spec.restart = self.choice(top["restart"], "restart", RESTART_POLICIES, "restart policy")
        if "entrypoint" in top:
            spec.entrypoint = self.string(top["entrypoint"], "entrypoint")
        if "shell" in top:
            spec.shell = self.shell(top["shell"])
        if "hostname" in top:
            spec.hostname = self.hostname(top["hostname"])
        if "setup" in top:
            spec.setup = self.setup(top["setup"])
        if "files" in top:
            spec.files = self.files(top["files"])
        if "env" in top:
            spec.env = self.env(top["env"])
        if "resources" in top:
            res = self.mapping(top["resources"], "resources", _RESOURCE_FIELDS)
            for key, attr in (("memoryMiB", "memory_mib"), ("cpuCount", "cpus"), ("sizeMiB", "size_mib")):
                if key in res:
                    value = self.positive_int(res[key], f"resources.{key}")
                    try:
                        validate_resource(attr, value, key)  # the engine's bound, against this host
                    except InvalidArgument as exc:
                        raise self.err(f"resources.{key}", str(exc).removeprefix(f"{key} ")) from None
                    setattr(spec, attr, value)
        if "mediation" in top:
            spec.mediation = self.mediation(top["mediation"])
        if "network" in top:
            try:
                spec.network = NetworkPolicy.parse(top["network"])
            except InvalidArgument as exc:
                raise self.err("network", str(exc)) from None
        seen_names: dict[str, str] = {}
        seen_mounts: dict[str, str] = {}
        if "disks" in top:
            spec.disks = self.disks(top["disks"], "disks", "rw", seen_names, seen_mounts)
        if "bundles" in top:
            spec.bundles = self.disks(top["bundles"], "bundles", "ro", seen_names, seen_mounts)
        if "outputs" in top:
            spec.outputs = self.outputs(top["outputs"])
        if "publish" in top:
            spec.publish = self.publish(top["publish"])
        if "secrets" in top:
            spec.secrets = self.secrets(top["secrets"])
        if "packages" in top:
            items = [self.string(v, f"packages[{i}]") for i, v in
                     enumerate(self.items(top["packages"], "packages", "Debian package names"))]
            try:
                spec.packages = list(parse_packages(items))
            except InvalidArgument as exc:
                raise self.err("packages", str(exc)) from None
        return spec

    def named(self, value: Any, path: str, kind: str) -> str:
        value = self.string(value, path)
        try:
            return validate_name(value, kind)
        except InvalidArgument as exc:
            raise self.err(path, str(exc)) from None

    def shell(self, value: Any) -> str:
        text = self.string(value, "shell")
        try:
            WorkspaceSpec(shell=text)  # the request's rule: an absolute guest path
        except InvalidArgument:
            raise self.err("shell", f"{_q(text)} is not an absolute path; use e.g. \"/bin/sh\" or \"/bin/bash\"")
        return self.guest_path(text, "shell")

    def hostname(self, value: Any) -> str:
        text = self.string(value, "hostname")
        try:
            validate_hostname(text)
        except InvalidArgument:
            raise self.err("hostname", f"{_q(text)} is not a valid hostname; use up to 63 lowercase letters, digits "
                                       f"and '-', not starting or ending with '-' (e.g. {_q(hostname_for(text))})")
        return text

    def setup(self, value: Any) -> list[str]:
        commands = []
        for i, item in enumerate(self.items(value, "setup", "shell commands")):
            path = f"setup[{i}]"
            if isinstance(item, dict):
                raise self.err(path, "expected a command string, got a mapping; a ': ' inside a command makes YAML "
                                     "read it as a mapping, so quote the whole command")
            commands.append(self.string(item, path))
        return commands

    def files(self, value: Any) -> list[FileEntry]:
        entries, seen = [], {}
        for i, item in enumerate(self.items(value, "files", "{src, dst, mode} entries")):
            path = f"files[{i}]"
            item = self.mapping(item, path, _FILE_FIELDS, required=("src", "dst"))
            src = self.host_file(item["src"], f"{path}.src")
            dst = self.guest_path(item["dst"], f"{path}.dst")
            if str(item["dst"]).endswith("/"):
                raise self.err(f"{path}.dst", f"{_q(item['dst'])} ends in '/'; give the full path of the file "
                                              f"to write, e.g. {_q(item['dst'] + src.name)}")
            self.unique(seen, dst, f"{path}.dst", "destination")
            mode = self.mode(item["mode"], f"{path}.mode") if "mode" in item else None
            entries.append(FileEntry(src=src, dst=dst, mode=mode))
        return entries

    def mode(self, value: Any, path: str) -> int:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raw = self.doc.raw.get(path, str(value))
            raise self.err(path, f"{raw} is a YAML number, which is ambiguous (0644 reads as octal, 644 as "
                                 f"decimal); quote it, e.g. \"0644\"")
        text = self.string(value, path)
        if not _MODE_RE.match(text) or int(text.removeprefix("0o"), 8) > 0o7777:
            raise self.err(path, f"{_q(text)} is not an octal file mode; use e.g. \"0644\"")
        return int(text.removeprefix("0o"), 8)

    def env(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.err("env", f"expected a mapping of NAME: value, got {_describe(value)}")
        out = {}
        for key, item in value.items():
            path = f"env.{key}"
            try:
                validate_env_key(key)
            except InvalidArgument:
                raise self.err(path, "invalid environment variable name; use letters, digits and '_', not starting "
                                     "with a digit")
            if isinstance(item, str):
                try:
                    out[key] = validate_env({key: item})[key]  # the engine's rule (no NUL)
                except InvalidArgument:
                    raise self.err(path, "must not contain a NUL character") from None
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                out[key] = self.doc.raw.get(path, str(item))  # exactly as written: 1.10 stays "1.10"
            elif isinstance(item, bool):
                raw = self.doc.raw.get(path, str(item).lower())
                raise self.err(path, f"{raw} is a YAML boolean; quote it to pass a string: {_q(raw)}")
            elif item is None:
                raise self.err(path, "has no value; write \"\" for an empty string or remove the variable")
            else:
                raise self.err(path, f"expected a string value, got {_describe(item)}")
        return out

    def mediation(self, value: Any) -> MediationSpec:
        m = self.mapping(value, "mediation", _MEDIATION_FIELDS)
        enabled = self.boolean(m["enabled"], "mediation.enabled") if "enabled" in m else False
        required = self.boolean(m["required"], "mediation.required") if "required" in m else False
        fail_closed = self.boolean(m["failClosed"], "mediation.failClosed") if "failClosed" in m else False
        port = None
        if "port" in m:
            port = m["port"]
            if isinstance(port, bool) or not isinstance(port, int):
                raise self.err("mediation.port", f"expected a port number, got {_describe(port)}")
            if not 1 <= port <= 65535:
                raise self.err("mediation.port", f"{port} is out of range; use a vsock port from 1 to 65535")
        target = self.target(m["target"]) if "target" in m else None
        if required and not enabled:
            raise self.err("mediation.required", "required: true needs enabled: true; enable mediation or drop "
                                                 "required")
        if enabled:
            for key, val in (("port", port), ("target", target)):
                if val is None:
                    raise self.err("mediation", f"enabled: true needs '{key}'; add mediation.{key}")
        return MediationSpec(enabled=enabled, required=required, port=port, target=target, fail_closed=fail_closed)

    def target(self, value: Any) -> str:
        path = "mediation.target"
        text = self.string(value, path)
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port or (host.count(":") and not host.startswith("[")):
            raise self.err(path, f"{_q(text)} has no port; write it as host:port, e.g. \"127.0.0.1:9900\"")
        try:
            parse_host_port(text, _q(text))  # the rule the engine applies
        except InvalidArgument as exc:
            raise self.err(path, str(exc)) from None
        return text

    def disks(self, value: Any, key: str, default_mode: str, names: dict, mounts: dict) -> list[DiskEntry]:
        entries = []
        for i, item in enumerate(self.items(value, key, "{name, path, mountpoint, mode} entries")):
            path = f"{key}[{i}]"
            item = self.mapping(item, path, _DISK_FIELDS, required=("name", "path", "mountpoint"))
            name = self.named(item["name"], f"{path}.name", "disk")
            self.unique(names, name, f"{path}.name", "disk name")
            host = self.host_file(item["path"], f"{path}.path")
            lower = host.name.lower()
            if key == "bundles" and not lower.endswith(BUNDLE_SUFFIXES):
                raise self.err(f"{path}.path", f"{_q(str(item['path']))} is not a tar bundle; bundles must end in "
                                               f"{', '.join(BUNDLE_SUFFIXES)} (attach ext4 images under disks)")
            if key == "disks" and lower.endswith(BUNDLE_SUFFIXES):
                raise self.err(f"{path}.path", f"{_q(str(item['path']))} is a tar archive; list it under bundles, "
                                               f"disks are existing ext4 images")
            if ":" in str(host):
                raise self.err(f"{path}.path", f"{host} contains ':', which the disk syntax cannot carry; rename "
                                               f"the file")
            mount = self.guest_path(item["mountpoint"], f"{path}.mountpoint")
            if ":" in mount:
                raise self.err(f"{path}.mountpoint", f"{_q(mount)} must not contain ':'")
            try:
                validate_mountpoint(mount)
            except InvalidArgument as exc:
                raise self.err(f"{path}.mountpoint", str(exc)) from None
            try:  # the storage checks' messages start with their flag argument, here the field
                (check_bundle_file if key == "bundles" else check_ext4_file)(host, f"{path}.path")
            except MicroagentError as exc:
                raise self.err(f"{path}.path", str(exc).removeprefix(f"{path}.path: ")) from None
            self.unique(mounts, mount, f"{path}.mountpoint", "mountpoint")
            mode = self.choice(item["mode"], f"{path}.mode", DISK_MODES, "disk mode") if "mode" in item \
                else default_mode
            entries.append(DiskEntry(name=name, path=host, mountpoint=mount, mode=mode))
        return entries

    def publish(self, value: Any) -> list[Publish]:
        entries = []
        for i, item in enumerate(self.items(value, "publish", '"HOST_PORT:GUEST_PORT" or {hostIp, hostPort, '
                                                               'guestPort} entries')):
            if isinstance(item, int):
                raise self.err(f"publish[{i}]", f"got the number {item}: quote the entry, e.g. \"8080:80\" (YAML "
                                                f"reads an unquoted 8080:22 as a number)")
            try:
                entries.append(Publish.from_json(item))
            except InvalidArgument as exc:
                raise self.err(f"publish[{i}]", str(exc)) from None
        try:
            return validate_publish(entries)
        except InvalidArgument as exc:
            raise self.err("publish", str(exc)) from None

    def secrets(self, value: Any) -> list[Secret]:
        entries = []
        for i, item in enumerate(self.items(value, "secrets", '"NAME@HOST" or {name, hosts, source?} entries')):
            try:
                entries.append(Secret.from_json(item))
            except InvalidArgument as exc:
                raise self.err(f"secrets[{i}]", str(exc)) from None
        try:
            return validate_secrets(entries)
        except InvalidArgument as exc:
            raise self.err("secrets", str(exc)) from None

    def outputs(self, value: Any) -> list[OutputEntry]:
        entries, seen = [], {}
        for i, item in enumerate(self.items(value, "outputs", "{name, path} entries")):
            path = f"outputs[{i}]"
            item = self.mapping(item, path, _OUTPUT_FIELDS, required=("name", "path"))
            name = self.named(item["name"], f"{path}.name", "output")
            self.unique(seen, name, f"{path}.name", "output name")
            entries.append(OutputEntry(name=name, path=self.guest_path(item["path"], f"{path}.path")))
        return entries
