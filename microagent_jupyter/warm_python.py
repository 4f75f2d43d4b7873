"""Warm Python sessions: a workspace snapshot per Python image with the heavy imports done (E2B's "ready command").

The snapshot (``pywarm-<key>``) is taken of a build workspace in which :mod:`.guest_zygote` runs with ipykernel,
IPython, zmq, numpy, pandas and matplotlib imported and waits for requests. A session made from it by
``Engine.create(from_snapshot=...)`` resumes with that process alive; :class:`~.guest_kernel.GuestKernel`'s launcher
asks it for a kernel, which it forks off with the session's own connection file: each session has its own HMAC key
and ports, none of which are in the snapshot; the clone path reseeds the guest clock and kernel RNG, the fork reseeds
Python's and numpy's generators.

The key covers everything that makes a snapshot fit a session: the image's identity (its base file, or its id),
the added packages, the session's network, profile, memory and cpus, and the zygote and launcher code. The machine
shape (kernel, initramfs, QEMU, devices) is checked by the engine when the clone starts: a mismatch there discards
the snapshot and the session boots cold. Built on first need under a lock (with progress), kept as an internal
snapshot (not in the user's snapshot list); a failed build is remembered (``<state-dir>/pywarm/<key>.failed``) so
later sessions go cold at once with the reason, until the inputs change or the file is removed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microagent_engine import Engine
from microagent_engine.config import hostname_for
from microagent_engine.errors import Busy, MicroagentError, NotFound
from microagent_engine.fsutil import file_lock, private_dir, read_json, write_json_atomic
from microagent_engine.images.builtin import PYTHON_REF, builtin_base, is_builtin
from microagent_engine.workspace_spec import WorkspaceSpec

from . import guest_kernel
from .guest_kernel import GUEST_DIR, ZYGOTE_DIR, ZYGOTE_LAUNCHER
from .session_owner import record_owner, remove_workspace

SNAPSHOT_PREFIX = "pywarm-"
BUILD_PREFIX = "pywarm-build-"
WARM_DIR = "pywarm"
ZYGOTE_FILE = f"{ZYGOTE_DIR}/zygote.py"
ZYGOTE_READY_TIMEOUT = 600.0  # the imports take tens of seconds under TCG on a busy host
#: what may differ between a snapshot's build and the session that uses it (``env`` reaches the resumed guest)
_KEY_FIELDS = ("image", "packages", "profile", "memory_mib", "cpus", "network")
SESSION_DEFAULTS = WorkspaceSpec(image=PYTHON_REF, network="isolated")

Progress = Callable[[str], None]


def _code_version() -> str:
    src = (Path(__file__).with_name("guest_zygote.py").read_bytes() + ZYGOTE_LAUNCHER.encode()
           + Path(guest_kernel.__file__).read_bytes())
    return hashlib.sha256(src).hexdigest()[:16]


def session_spec(spec: WorkspaceSpec | None = None) -> WorkspaceSpec:
    """A Python session's workspace: ``spec`` over the sessions' defaults (the Python image, no network)."""
    return SESSION_DEFAULTS.merged(spec)


def ineligible(spec: WorkspaceSpec) -> str:
    """Why a session created with ``spec`` cannot start from a warm snapshot ("" when it can)."""
    if spec.attachments:
        return "volumes are attached (a snapshot covers the root disk only)"
    other = sorted(k for k in spec.given() if k not in _KEY_FIELDS and k != "env")
    if other:
        return f"the session sets {', '.join(other)}"
    return ""


def image_identity(engine: Engine, spec: WorkspaceSpec) -> Any:
    """What identifies the session's image content (a built-in image's base file, or a pulled image's id)."""
    ref = spec.image or PYTHON_REF
    if is_builtin(ref):
        base = builtin_base(ref, engine.state_dir, spec.packages or (), engine.progress)
        st = base.path.stat()
        return [base.ref, base.path.name, st.st_size, st.st_mtime_ns]
    return [ref, engine.images.ensure(str(ref)).id]


def _shape(spec: WorkspaceSpec) -> WorkspaceSpec:
    """The fields of ``spec`` a warm snapshot is built with (and keyed by)."""
    return WorkspaceSpec(**{k: getattr(spec, k) for k in _KEY_FIELDS})


def snapshot_key(engine: Engine, spec: WorkspaceSpec) -> str:
    """The warm snapshot's key for a session created with ``spec`` (the magic's and the kernel's alike)."""
    fields = session_spec(_shape(spec)).to_json()
    fields.pop("image", None)
    blob = json.dumps({"image": image_identity(engine, spec), **fields, "code": _code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _failed_file(engine: Engine, key: str) -> Path:
    return Path(engine.state_dir) / WARM_DIR / f"{key}.failed"


def warm_snapshot(engine: Engine, spec: WorkspaceSpec, progress: Progress | None = None
                  ) -> tuple[str | None, str]:
    """The name of the warm snapshot for ``spec`` (built now if missing), or None and why not."""
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
                build(engine, name, spec, progress)
            except MicroagentError as exc:
                write_json_atomic(failed, {"reason": str(exc)[-500:], "at": time.time()})
                return None, f"building the warm snapshot {name} failed: {exc}"
    except Busy:
        return None, f"the warm snapshot {name} is being built by another session"
    return name, ""


def _exists(engine: Engine, name: str) -> bool:
    return any(m.get("name") == name for m in engine.snapshots(internal=True))


def build(engine: Engine, name: str, spec: WorkspaceSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Boot a build workspace, start the zygote, wait until its imports are done, snapshot it as ``name``."""
    say = progress or (lambda _m: None)
    ws = f"{BUILD_PREFIX}{name[len(SNAPSHOT_PREFIX):][:8]}-{secrets.token_hex(2)}"
    t0 = time.monotonic()
    say(f"Building the warm Python snapshot {name} (once per image and machine shape): booting {ws}")
    engine.create(ws, session_spec(_shape(spec)))
    try:
        record_owner(engine, ws, kind="build")
        engine.start(ws)
        src = Path(__file__).with_name("guest_zygote.py").read_bytes()
        engine.exec(ws, ["/bin/sh", "-c", f"umask 077; mkdir -p {ZYGOTE_DIR} {GUEST_DIR}; cat > {ZYGOTE_FILE}"],
                    stdin=src, capture=True, timeout=60)
        say(f"Building the warm Python snapshot {name}: importing ipykernel, numpy, pandas, matplotlib")
        start = (f"cd /; setsid python3 {ZYGOTE_FILE} {ZYGOTE_DIR} </dev/null >{ZYGOTE_DIR}/log 2>&1 & "
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
        remove_workspace(engine, ws)
    say(f"Warm Python snapshot {name} ready in {time.monotonic() - t0:.1f} s")
    return meta


def create_warm(engine: Engine, name: str, snapshot: str, env: dict[str, str] | None) -> None:
    """Create session workspace ``name`` from the warm ``snapshot`` (its first start resumes the zygote)."""
    engine.create(name, from_snapshot=snapshot, env=env or None, hostname=hostname_for(name))


def discard(engine: Engine, snapshot: str) -> None:
    """Remove a warm snapshot that could not be used (the next session builds a new one)."""
    try:
        engine.remove_snapshot(snapshot)
    except NotFound:
        pass


def start_session_workspace(engine: Engine, name: str, spec: WorkspaceSpec, env: dict[str, str] | None,
                            *, owned: bool, progress: Progress | None = None, warm: bool = True,
                            owner: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """Create and start the session workspace ``name``: a clone of the warm snapshot when one fits (built on first
    need), else a cold create + boot. ``owned``: record this process as its owner (swept when it dies), described
    by ``owner`` (:func:`~.session_owner.record_owner`'s keywords). Returns the snapshot used (None: cold) and why
    it booted cold."""
    say = progress or (lambda _m: None)
    spec = session_spec(spec)
    snap, reason = warm_snapshot(engine, spec, progress) if warm else (None, "warm start disabled")
    if snap is not None:
        try:
            say(f"Resuming the warm Python snapshot {snap} as {name}")
            create_warm(engine, name, snap, env)
            if owned:
                record_owner(engine, name, **(owner or {}))
            engine.start(name)
            return snap, ""
        except MicroagentError as exc:
            remove_workspace(engine, name)
            discard(engine, snap)
            reason = f"the warm snapshot {snap} could not be resumed ({exc}); it was removed"
    say(f"Cold start of {name}: {reason}")
    engine.create(name, spec.merged(WorkspaceSpec(env=env or None)))
    if owned:
        record_owner(engine, name, **(owner or {}))
    say(f"Booting {name}")
    engine.start(name)
    return None, reason


def prepare(engine: Engine, progress: Progress | None = None) -> str:
    """``microagent prepare python``: build the built-in Python image and the one warm snapshot the magic and the
    sandboxed kernel start from (each once; a second call finds them); what was prepared, in a line."""
    say = progress or (lambda _m: None)
    spec = session_spec()
    say(f"Preparing {PYTHON_REF}: the image (built once per package set)")
    base = builtin_base(PYTHON_REF, engine.state_dir, (), say)
    snap, why = warm_snapshot(engine, spec, say)
    if snap is None:
        raise MicroagentError(f"the warm Python snapshot could not be prepared: {why}")
    return f"{PYTHON_REF} is ready: image {base.path.name}, warm snapshot {snap} (first sessions start from it)"
