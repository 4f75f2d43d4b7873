"""A warm pool of sandboxed-kernel VMs: workspaces already resumed from the warm Python snapshot, running, that a
new kernel takes instead of resuming one while the notebook waits.

One pool per process (the jupyter server's, where the provisioner runs), keyed by what a kernel's workspace is asked
to be (its :class:`WorkspaceSpec` and guest environment: a VM is only ever handed to a kernel of the same request).
After a kernel starts, the pool is refilled behind it to the provisioner's ``pool_size`` (0: no pool) in a
background thread with its own :class:`Engine` (the kernel's engine reports its own launch's progress). Pooled VMs
are owned by this process (:mod:`.session_owner`): if it dies they are swept like any session's, and at a normal
exit they are removed. A pooled VM holds no secret of any kernel: each kernel gets its own connection key when it
starts in it, and the notebook's files are copied in only then.
"""

from __future__ import annotations

import atexit
import json
import secrets
import threading
from typing import Any

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.workspace_spec import WorkspaceSpec

from .session_owner import remove_workspace
from .warm_python import start_session_workspace

_lock = threading.Lock()
_ready: dict[tuple[str, str], list[str]] = {}  # (state dir, request key) -> running pooled workspaces
_filling: set[tuple[str, str]] = set()
_atexit: list[bool] = []


def request_key(spec: WorkspaceSpec, env: dict[str, str]) -> str:
    """What a pooled VM must match: the workspace request and the guest's environment."""
    return json.dumps([spec.to_json(), sorted(env.items())], sort_keys=True, default=str)


def take(engine: Engine, key: str) -> str | None:
    """A running pooled workspace for ``key`` (now the caller's), or None when the pool has none."""
    while True:
        with _lock:
            names = _ready.get((str(engine.state_dir), key)) or []
            if not names:
                return None
            name = names.pop(0)
        try:
            if engine.status(name).state.state == "running":
                return name
        except MicroagentError:
            pass
        remove_workspace(engine, name)  # it went away while pooled (killed from the CLI): try the next


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
            try:
                warm_from, why = start_session_workspace(engine, name, spec, dict(env), owned=True,
                                                         owner={"kind": "pool"})
            except MicroagentError as exc:
                remove_workspace(engine, name)
                if on_error is not None:
                    on_error(f"the warm pool could not prepare a VM: {exc}")
                return
            if warm_from is None:  # a cold VM is no faster than starting one when asked: do not keep it
                remove_workspace(engine, name)
                if on_error is not None:
                    on_error(f"the warm pool stays empty: {why}")
                return
            with _lock:
                _ready.setdefault(slot, []).append(name)
    finally:
        with _lock:
            _filling.discard(slot)


def pooled(engine: Engine) -> list[str]:
    """The pooled (not yet taken) workspaces of ``engine``'s state dir."""
    with _lock:
        return [n for (sd, _k), names in _ready.items() if sd == str(engine.state_dir) for n in names]


def drain() -> None:
    """Remove every pooled VM of this process (at exit; tests)."""
    with _lock:
        slots = {sd: list(names) for (sd, _k), names in _ready.items()}
        _ready.clear()
    for sd, names in slots.items():
        engine = Engine(sd)
        for name in names:
            remove_workspace(engine, name)
