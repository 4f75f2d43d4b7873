"""A warm pool of sandboxed kernels: workspaces already resumed from the warm Python snapshot, each with its guest
kernel started and answering, that a new notebook kernel takes instead of preparing one while the notebook waits.

One pool per process (the jupyter server's, where the provisioner runs), keyed by what a kernel's workspace is asked
to be (its :class:`WorkspaceSpec` and guest environment: a VM is only ever handed to a kernel of the same request).
After a kernel starts, the pool is refilled behind it to the provisioner's ``pool_size`` (0: no pool) in a
background thread with its own :class:`Engine` (the kernel's engine reports its own launch's progress). Pooled VMs
are owned by this process (:mod:`.session_owner`): if it dies they are swept like any session's, and at a normal
exit they are removed. A pooled kernel has its own random connection key, which never leaves the host side (the
provisioner's relay re-signs for the frontend with the notebook's key); the notebook's files are copied in, and the
kernel moved into them, only when it is taken.
"""

from __future__ import annotations

import atexit
import json
import secrets
import threading
from typing import Any

import os

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.workspace_spec import WorkspaceSpec

from .guest_kernel import GuestKernel
from .session_owner import remove_workspace
from .warm_python import start_session_workspace

#: the default pool size (the tests turn the pool off but where they test it)
POOL_ENV = "MICROAGENT_KERNEL_POOL"

def default_size() -> int:
    """``$MICROAGENT_KERNEL_POOL``, else 1: kernels kept ready per kind of workspace; also whether a notebook's
    ``%%microagent python`` session is prepared when the extension loads (0: neither)."""
    try:
        return max(0, int(os.environ.get(POOL_ENV, "1")))
    except ValueError:
        return 1


_lock = threading.Lock()
#: (state dir, request key) -> running pooled workspaces and their answering kernels
_ready: dict[tuple[str, str], list[tuple[str, GuestKernel]]] = {}
_filling: set[tuple[str, str]] = set()
_atexit: list[bool] = []


def request_key(spec: WorkspaceSpec, env: dict[str, str]) -> str:
    """What a pooled VM must match: the workspace request and the guest's environment."""
    return json.dumps([spec.to_json(), sorted(env.items())], sort_keys=True, default=str)


def take(engine: Engine, key: str) -> tuple[str, GuestKernel] | None:
    """A pooled workspace for ``key`` and its running kernel (now the caller's), or None when the pool has none."""
    while True:
        with _lock:
            entries = _ready.get((str(engine.state_dir), key)) or []
            if not entries:
                return None
            name, kernel = entries.pop(0)
        try:
            if kernel.alive and engine.status(name).state.state == "running":
                return name, kernel
        except MicroagentError:
            pass
        _discard(engine, name, kernel)  # it went away while pooled (killed from the CLI): try the next


def _discard(engine: Engine, name: str, kernel: GuestKernel | None) -> None:
    if kernel is not None:
        try:
            kernel.stop(timeout=3)
        except MicroagentError:
            pass
    remove_workspace(engine, name)


def refill(engine: Engine, key: str, spec: WorkspaceSpec, env: dict[str, str], size: int,
           on_error: Any = None) -> None:
    """Bring the pool for ``key`` up to ``size`` running VMs, in a background thread (one per key at a time)."""
    slot = (str(engine.state_dir), key)
    with _lock:
        if size <= 0 or slot in _filling or len(_ready.get(slot, [])) >= size:
            return
        _filling.add(slot)
        if not _atexit:
            atexit.register(drain)
            _atexit.append(True)
    threading.Thread(target=_fill, args=(Engine(engine.state_dir), slot, spec, env, size, on_error),
                     name="microagent-kernel-pool", daemon=True).start()


def _fill(engine: Engine, slot: tuple[str, str], spec: WorkspaceSpec, env: dict[str, str], size: int,
          on_error: Any) -> None:
    try:
        while True:
            with _lock:
                if len(_ready.get(slot, [])) >= size:
                    return
            name = f"nbk-pool-{secrets.token_hex(3)}"
            kernel: GuestKernel | None = None
            try:
                warm_from, why = start_session_workspace(engine, name, spec, dict(env), owned=True,
                                                         owner={"kind": "pool"})
                if warm_from is None:  # a cold VM is no faster than starting one when asked: do not keep it
                    raise MicroagentError(f"no warm snapshot ({why})")
                kernel = GuestKernel(engine, name)
                kernel.launch()
                kernel.wait_ready_raw(kernel.host_info)
                kernel.warm_up()
            except MicroagentError as exc:
                _discard(engine, name, kernel)
                if on_error is not None:
                    on_error(f"the warm pool could not prepare a kernel: {exc}")
                return
            with _lock:
                _ready.setdefault(slot, []).append((name, kernel))
    finally:
        with _lock:
            _filling.discard(slot)


def pooled(engine: Engine) -> list[str]:
    """The pooled (not yet taken) workspaces of ``engine``'s state dir."""
    with _lock:
        return [n for (sd, _k), entries in _ready.items() if sd == str(engine.state_dir) for n, _ in entries]


def drain() -> None:
    """Stop and remove every pooled kernel and VM of this process (at exit; tests)."""
    with _lock:
        slots = [(sd, list(entries)) for (sd, _k), entries in _ready.items()]
        _ready.clear()
    for sd, entries in slots:
        engine = Engine(sd)
        for name, kernel in entries:
            _discard(engine, name, kernel)
