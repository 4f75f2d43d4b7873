"""The engine: a facade (:class:`Engine`) over collaborators, one per concern.

- ``store``: workspace records, the truth check against live processes, listing
- ``provision``: create (of a :class:`~microagent_engine.workspace_spec.WorkspaceSpec`) and delete
- ``oneshot``: run (create + start + exec + halt) and its :class:`RunOptions`
- ``warm_python``: the warm Python snapshot (a zygote with pandas imported) that Python one-shots, sessions and
  sandboxed kernels start from
- ``cleanup``: ending a workspace a composite operation made, whatever its state
- ``lifecycle``: start (launch spec, supervisor spawn), halt, stop, kill, quarantine
- ``sessions``: exec, ping, the serial console and its log
- ``transfer``: cp and declared outputs on stopped workspaces
- ``imaging``: pull, commit, prune
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .facade import Engine
    from .oneshot import RunOptions
    from .store import WorkspaceInfo

__all__ = ["Engine", "RunOptions", "WorkspaceInfo"]
#: where each public name lives: imported on first use (the CLI's entry imports ``spawn`` before anything else)
_HOMES = {"Engine": "facade", "RunOptions": "oneshot", "WorkspaceInfo": "store"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
