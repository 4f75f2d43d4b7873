"""The engine: a facade (:class:`Engine`) over collaborators, one per concern.

- ``store``: workspace records, the truth check against live processes, listing
- ``provision``: create (of a :class:`~microagent_engine.workspace_spec.WorkspaceSpec`) and delete
- ``oneshot``: run (create + start + exec + halt) and its :class:`RunOptions`
- ``warm_python``: the warm Python snapshot (a zygote with pandas imported) that Python one-shots, sessions and
  sandboxed kernels start from
- ``cleanup``: ending a workspace a composite operation made, whatever its state
- ``lifecycle``: start (launch spec, attached disks), halt, stop, kill, quarantine
- ``spawn``: the supervisor's spawn, and the CLI's standby for it (forked before the CLI's imports)
- ``sessions``: exec, ping, the serial console and its log
- ``transfer``: cp and declared outputs on stopped workspaces
- ``imaging``: pull, commit, prune
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:
    from .facade import Engine
    from .oneshot import RunOptions
    from .store import WorkspaceInfo

__all__ = ["Engine", "RunOptions", "WorkspaceInfo"]
#: where each public name lives: imported on first use (the CLI's entry imports ``spawn`` before anything else)
_HOMES = {"Engine": "facade", "RunOptions": "oneshot", "WorkspaceInfo": "store"}

__getattr__ = lazy_getattr(globals(), _HOMES)
