"""The warm Python snapshot: a workspace snapshot of ``builtin:python`` in which a zygote has done the heavy imports
(E2B's "ready command"). One-shot ``run``s of ``python3`` and Jupyter's sessions and sandboxed kernels start from it.

The snapshot (``pywarm-<key>``) is taken of a build workspace in which :mod:`microagent_engine.guest.python_zygote`
runs with ipykernel, IPython, zmq, numpy, pandas and matplotlib imported and waits for requests. A workspace made
by ``Engine.create(from_snapshot=...)`` resumes with that process alive; an exec running one of the launchers below
asks it for a worker: a kernel (:func:`kernel_launcher`, with the session's own connection file: each session has
its own HMAC key, which is not in the snapshot; a clone's first kernel is the one the zygote initialized before the
snapshot on :data:`KERNEL_PORTS`, later ones are forked) or the exec's own ``python3 ARGS`` (:data:`RUN_LAUNCHER`,
forked). The clone path reseeds the guest clock and kernel RNG, the fork reseeds Python's and
numpy's generators.

The key covers everything that makes a snapshot fit a workspace: the image's identity (its base file, or its id),
the added packages, the network, profile, memory and cpus, and the zygote and launcher code. The machine shape
(kernel, initramfs, QEMU, devices) is checked by the engine when the clone starts: a mismatch there discards the
snapshot and the workspace boots cold. Built on first need under a lock (with progress), kept as an internal
snapshot (not in the user's snapshot list); a failed build is remembered (``<state-dir>/pywarm/<key>.failed``) so
later starts go cold at once with the reason, until the inputs change or the file is removed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..config import hostname_for
from ..errors import Busy, MicroagentError, NotFound
from ..fsutil import file_lock, private_dir, read_json, write_json_atomic
from ..guest import python_zygote
from ..images.builtin import PYTHON_REF, builtin_base, is_builtin
from ..workspace_spec import WorkspaceSpec
from .cleanup import kill_quietly, delete_quietly, remove_quietly

SNAPSHOT_PREFIX = "pywarm-"
BUILD_PREFIX = "pywarm-build-"
WARM_DIR = "pywarm"
#: where a warm snapshot's zygote waits for requests, and where a kernel's connection file and pid are kept
ZYGOTE_DIR = "/tmp/.microagent-zygote"
KERNEL_DIR = "/tmp/.microagent-kernel"
ZYGOTE_FILE = f"{ZYGOTE_DIR}/zygote.py"
#: ZMQ ports a guest kernel binds on its own loopback (the guest is a VM of its own: fixed ports are fine), below
#: Linux's ephemeral range (32768-60999): the agent's connections to the published ports start while a cold kernel
#: is still binding, and one of them drawing a port the kernel had yet to bind failed it ("Address already in use").
#: The zygote's prepared kernel is bound on them before the snapshot.
KERNEL_PORTS = {"shell_port": 20101, "iopub_port": 20102, "stdin_port": 20103, "control_port": 20104,
                "hb_port": 20105}
ZYGOTE_READY_TIMEOUT = 600.0  # the imports take tens of seconds under TCG on a busy host
#: what may differ between a snapshot's build and the workspace that uses it (``env`` reaches the resumed guest)
_KEY_FIELDS = ("image", "packages", "profile", "memory_mib", "cpus", "network")
#: the commands a one-shot ``run`` hands to the zygote (what the image's python3 is called)
PYTHON_COMMANDS = ("python3", "/usr/bin/python3")
#: ``MICROAGENT_WARM_PYTHON=0``: nothing starts from the warm snapshot (one-shots, sessions and kernels boot cold)
ENABLED_ENV = "MICROAGENT_WARM_PYTHON"


#: how the snapshot holds its RAM (part of the key: a snapshot of an older form is rebuilt and superseded)
_FORM = "ram-file"


def enabled() -> bool:
    return os.environ.get(ENABLED_ENV, "1") != "0"

_ZYGOTE_LIVE = f"Z={ZYGOTE_DIR}\nif [ -p $Z/requests ] && read zp < $Z/pid && kill -0 \"$zp\" 2>/dev/null; then\n"
_RC_FIFO = ("  mkfifo -m 600 $f 2>/dev/null || { rm -f $f; mkfifo -m 600 $f; } || exit 1\n"
            "  exec 3<>$f\n")


def connection_info(key: str, ports: dict[str, int] = KERNEL_PORTS, ip: str = "127.0.0.1", transport: str = "tcp"
                    ) -> dict[str, Any]:
    """A Jupyter connection-file dict (``transport`` ipc: each channel is the unix socket ``IP-PORT``)."""
    return {**ports, "ip": ip, "key": key, "transport": transport, "signature_scheme": "hmac-sha256",
            "kernel_name": "python3"}


def kernel_launcher(connection_file: str) -> str:
    """The start of a kernel's exec when the workspace has a live zygote: ask it for a kernel (forked from the warm
    process, with this exec's environment, output pipes and ``connection_file``), exit with its exit code (which
    the zygote writes into the FIFO named in the request). Without a zygote the script goes on (a cold start)."""
    return (f"{_ZYGOTE_LIVE}  f={KERNEL_DIR}/rc.$$\n{_RC_FIFO}"
            f"  echo \"$$ $f {connection_file}\" > $Z/requests\n"
            "  read rc <&3\n  rm -f $f\n  exit ${rc:-1}\nfi\n")


#: ``sh -c RUN_LAUNCHER python3 ARGS…``: the zygote runs ``python3 ARGS…`` in a fork of its warm process (it falls
#: back to ``exec``-ing the real python3 when the arguments ask for what a fork cannot give exactly); signals to
#: this exec reach the fork; without a live zygote, the real python3 runs.
RUN_LAUNCHER = (f"{_ZYGOTE_LIVE}  f=$Z/rc.$$\n{_RC_FIFO}  exec {python_zygote.RUN_STDIN_FD}<&0\n"
                "  echo \"$$ $f run\" > $Z/requests\n"
                "  cp=; while [ -z \"$cp\" ]; do read cp <&3; done\n"
                "  trap 'kill -INT $cp 2>/dev/null' INT; trap 'kill -TERM $cp 2>/dev/null' TERM\n"
                "  trap 'kill -HUP $cp 2>/dev/null' HUP\n"
                "  rc=; while [ -z \"$rc\" ]; do read rc <&3; done\n"
                "  rm -f $f\n  exit $rc\nfi\nexec \"$0\" \"$@\"\n")

Progress = Callable[[str], None]


class EngineLike(Protocol):
    """What building and using the warm snapshot takes of the Engine."""

    state_dir: Any
    images: Any

    def progress(self, message: str) -> None: ...
    def create(self, name: str | None, spec: WorkspaceSpec | None = None, **kwargs: Any) -> Any: ...
    def start(self, name: str, **kwargs: Any) -> Any: ...
    def exec(self, name: str, argv: list[str], **kwargs: Any) -> Any: ...
    def snapshot(self, name: str, snapshot: str, *, internal: bool = False) -> dict[str, Any]: ...
    def snapshots(self, *, internal: bool = False) -> list[dict[str, Any]]: ...
    def remove_snapshot(self, snapshot: str) -> None: ...
    def status(self, name: str) -> Any: ...
    def halt(self, name: str) -> Any: ...
    def kill(self, name: str) -> Any: ...
    def delete(self, name: str) -> None: ...


@functools.cache
def _code_version() -> str:
    """The zygote's and launchers' code, hashed once per process (it is part of every key)."""
    src = Path(python_zygote.__file__).read_bytes() + (kernel_launcher("") + RUN_LAUNCHER + _FORM).encode()
    return hashlib.sha256(src).hexdigest()[:16]


def ineligible(spec: WorkspaceSpec) -> str:
    """Why a workspace created with ``spec`` cannot start from a warm snapshot ("" when it can)."""
    if spec.attachments:
        return "volumes are attached (a snapshot covers the root disk only)"
    other = sorted(k for k in spec.given() if k not in _KEY_FIELDS and k != "env")
    if other:
        return f"the workspace sets {', '.join(other)}"
    return ""


def image_identity(engine: EngineLike, spec: WorkspaceSpec) -> Any:
    """What identifies the workspace's image content (a built-in image's base file, or a pulled image's id)."""
    ref = spec.image or PYTHON_REF
    if is_builtin(ref):
        base = builtin_base(ref, engine.state_dir, spec.packages or (), engine.progress)
        st = base.path.stat()
        return [base.ref, base.path.name, st.st_size, st.st_mtime_ns]
    return [ref, engine.images.ensure(str(ref)).id]


def _shape(spec: WorkspaceSpec) -> WorkspaceSpec:
    """The fields of ``spec`` a warm snapshot is built with (and keyed by); the image defaults to Python's."""
    fields = {k: getattr(spec, k) for k in _KEY_FIELDS}
    return WorkspaceSpec(**{**fields, "image": fields["image"] or PYTHON_REF})


def snapshot_key(engine: EngineLike, spec: WorkspaceSpec) -> str:
    """The warm snapshot's key for a workspace created with ``spec`` (a session's, a kernel's, a run's alike)."""
    fields = _shape(spec).to_json()
    fields.pop("image", None)
    blob = json.dumps({"image": image_identity(engine, spec), **fields, "code": _code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def family(spec: WorkspaceSpec) -> str:
    """What a warm snapshot is for, without what makes it current (the image's content, the zygote's code): a newer
    snapshot of the same family replaces the older one."""
    return hashlib.sha256(json.dumps(_shape(spec).to_json(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def supersede(engine: EngineLike, name: str, fam: str) -> list[str]:
    """Record ``name`` as its family's current snapshot and remove the family's older ones (their 1.5 GB disks would
    stay forever otherwise: no key ever asks for them again); the names removed. Clones made from them keep their
    own disks and RAM streams."""
    root = private_dir(Path(engine.state_dir) / WARM_DIR)
    removed = []
    for record in sorted(root.glob("*.built")):
        try:
            other = read_json(record)
        except (OSError, ValueError):
            continue
        if other.get("family") != fam or other.get("snapshot") == name:
            continue
        try:
            engine.remove_snapshot(str(other.get("snapshot")))
            removed.append(str(other.get("snapshot")))
        except MicroagentError:  # gone already, or not one of ours: the record goes either way
            pass
        record.unlink(missing_ok=True)
    write_json_atomic(root / f"{name[len(SNAPSHOT_PREFIX):]}.built", {"snapshot": name, "family": fam})
    return removed


def _failed_file(engine: EngineLike, key: str) -> Path:
    return Path(engine.state_dir) / WARM_DIR / f"{key}.failed"


def warm_snapshot(engine: EngineLike, spec: WorkspaceSpec, progress: Progress | None = None,
                  adopt: Callable[[str], None] | None = None) -> tuple[str | None, str]:
    """The name of the warm snapshot for ``spec`` (built now if missing), or None and why not. ``adopt``: called
    with the build workspace's name once it exists (a front-end records who owns it)."""
    why = ineligible(spec)
    if why:
        return None, why
    try:
        key = snapshot_key(engine, spec)
    except MicroagentError as exc:
        return None, f"the image could not be identified ({exc})"
    name = SNAPSHOT_PREFIX + key
    if _exists(engine, name):
        return name, ""
    failed = _failed_file(engine, key)
    if failed.is_file():
        try:
            reason = read_json(failed).get("reason", "?")
        except (OSError, ValueError):
            reason = "?"
        return None, f"building the warm snapshot {name} failed before ({reason}); remove {failed} to retry"
    lock = Path(engine.state_dir) / WARM_DIR / f"{key}.lock"
    private_dir(lock.parent)
    try:
        with file_lock(lock, blocking=False, what="the warm Python snapshot"):
            if _exists(engine, name):
                return name, ""
            try:
                build(engine, name, spec, progress, adopt)
            except MicroagentError as exc:
                write_json_atomic(failed, {"reason": str(exc)[-500:], "at": time.time()})
                return None, f"building the warm snapshot {name} failed: {exc}"
    except Busy:
        return None, f"the warm snapshot {name} is being built by another process"
    return name, ""


def find(engine: EngineLike, spec: WorkspaceSpec) -> str | None:
    """The warm snapshot for ``spec`` when it is already built (nothing is built: None otherwise)."""
    if ineligible(spec) or not any(str(m.get("name", "")).startswith(SNAPSHOT_PREFIX)
                                   for m in engine.snapshots(internal=True)):
        return None
    try:
        name = SNAPSHOT_PREFIX + snapshot_key(engine, spec)
    except MicroagentError:
        return None
    return name if _exists(engine, name) else None


def _exists(engine: EngineLike, name: str) -> bool:
    return any(m.get("name") == name for m in engine.snapshots(internal=True))


def build(engine: EngineLike, name: str, spec: WorkspaceSpec, progress: Progress | None = None,
          adopt: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Boot a build workspace, start the zygote, wait until its imports are done, snapshot it as ``name``."""
    say = progress or (lambda _m: None)
    ws = f"{BUILD_PREFIX}{name[len(SNAPSHOT_PREFIX):][:8]}-{secrets.token_hex(2)}"
    t0 = time.monotonic()
    say(f"Building the warm Python snapshot {name} (once per image and machine shape): booting {ws}")
    engine.create(ws, _shape(spec))
    try:
        if adopt is not None:
            adopt(ws)
        engine.start(ws, ram_file=True)  # the snapshot keeps this RAM file: clones map it instead of reading it
        src = Path(python_zygote.__file__).read_bytes()
        engine.exec(ws, ["/bin/sh", "-c", f"umask 077; mkdir -p {ZYGOTE_DIR} {KERNEL_DIR}; cat > {ZYGOTE_FILE}"],
                    stdin=src, capture=True, timeout=60)
        say(f"Building the warm Python snapshot {name}: importing ipykernel, numpy, pandas, matplotlib")
        # the kernel the zygote prepares before the snapshot is bound with a key no session has (each session's
        # comes in its own connection file and replaces it)
        placeholder = json.dumps(connection_info(secrets.token_hex(32)))
        start = (f"cd /; setsid python3 {ZYGOTE_FILE} {ZYGOTE_DIR} {shlex.quote(placeholder)} </dev/null "
                 f">{ZYGOTE_DIR}/log 2>&1 & "
                 f"while [ ! -e {ZYGOTE_DIR}/ready ]; do "
                 f"  if ! kill -0 $! 2>/dev/null; then tail -n 20 {ZYGOTE_DIR}/log >&2; exit 1; fi; sleep 0.2; "
                 f"done")
        res = engine.exec(ws, ["/bin/sh", "-c", start], env={"PYTHONUNBUFFERED": "1"}, capture=True,
                          timeout=ZYGOTE_READY_TIMEOUT)
        if res.exit_code != 0:
            err = (res.stderr or b"").decode(errors="replace").strip()[-800:]
            raise MicroagentError(f"the warm Python process did not start (exit {res.exit_code}): {err}")
        say(f"Building the warm Python snapshot {name}: saving it")
        meta = engine.snapshot(ws, name, internal=True)
    finally:
        remove_quietly(engine, ws)
    for old in supersede(engine, name, family(spec)):
        say(f"Removed the warm snapshot {old}: {name} replaces it (same shape, newer image or code)")
    say(f"Warm Python snapshot {name} ready in {time.monotonic() - t0:.1f} s")
    return meta


def create_warm(engine: EngineLike, name: str, snapshot: str, env: dict[str, str] | None,
                disposable: bool = False) -> None:
    """Create workspace ``name`` from the warm ``snapshot`` (its first start resumes the zygote). ``disposable``
    (deleted with its owner, never read by host-side tools): its root disk is a copy-on-write overlay over the
    snapshot's instead of a copy (snapshots/overlay.py)."""
    engine.create(name, from_snapshot=snapshot, env=env or None, hostname=hostname_for(name), disposable=disposable)


def resume(engine: EngineLike, name: str, snapshot: str, create: Callable[[], Any], progress: Progress | None = None
           ) -> str:
    """Make workspace ``name`` from the warm ``snapshot`` with ``create()`` (the caller's create step: a one-shot's,
    a session's with its owner record) and start it; "" once it runs. When that fails, the half-made workspace is
    removed, the snapshot discarded (the next start builds a new one) and the reason returned: the caller boots
    cold."""
    (progress or (lambda _m: None))(f"Resuming the warm Python snapshot {snapshot} as {name}")
    try:
        create()
        engine.start(name)
        return ""
    except BaseException as exc:
        kill_quietly(engine, name)
        delete_quietly(engine, name)
        if not isinstance(exc, MicroagentError):
            raise
        discard(engine, snapshot)
        return f"the warm snapshot {snapshot} could not be resumed ({exc}); it was removed"


def discard(engine: EngineLike, snapshot: str) -> None:
    """Remove a warm snapshot that could not be used (the next start builds a new one)."""
    try:
        engine.remove_snapshot(snapshot)
    except NotFound:
        pass


def for_run(engine: EngineLike, argv: list[str], spec: WorkspaceSpec) -> tuple[str | None, str]:
    """The warm snapshot a one-shot ``run`` of ``argv`` in ``spec`` starts from (built on first need, with
    progress), or None and why not ("" when the run is not a Python one)."""
    if not argv or argv[0] not in PYTHON_COMMANDS or spec.image != PYTHON_REF:
        return None, ""
    if not enabled():
        return None, f"{ENABLED_ENV}=0"
    return warm_snapshot(engine, spec, engine.progress)


def run_argv(argv: list[str]) -> list[str]:
    """The exec that runs ``argv`` (``python3 ARGS…``) in a warm clone: through the zygote when it is there."""
    return ["/bin/sh", "-c", RUN_LAUNCHER, *argv]
