"""A workspace's egress while it runs: what its DNS and egress proxy refused, and widening its allow-list."""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any

from ..client import SupervisorConnection
from ..errors import GuestError, InvalidArgument
from ..records import read_egress_report
from ..workspace_spec import WorkspaceSpec
from .context import EngineContext
from .store import WorkspaceInfo


class Egress:
    """``egress`` (the report) and ``allow``."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def report(self, name: str) -> dict[str, Any]:
        """The workspace's policy, and while it runs its DNS and egress counters and recent refusals."""
        info = self.ctx.store.status(name)
        live = read_egress_report(info.dir.egress_report) if info.running else None
        return {"name": name, "live": info.running, "networkPolicy": info.config.network_policy.to_json(),
                "networkSummary": info.config.network_policy.describe(), **(live or {"dns": None, "egress": None})}

    def allow(self, name: str, entries: builtins.list[str]) -> WorkspaceInfo:
        """Add ``entries`` (as ``--allow`` takes them) to the workspace's allow-list: recorded, and applied to its
        running VM at once (rules, DNS, egress proxy)."""
        if not entries:
            raise InvalidArgument(f"give what to allow, e.g. microagent allow {name} pypi.org or @pypi")
        info = self.ctx.store.status(name)
        cfg = info.config
        policy = cfg.network_policy.with_allowed(list(entries))  # validates, names the next step
        if info.running and info.dir.supervisor_alive():
            with SupervisorConnection(info.dir.control_socket) as conn:
                reply = conn.control("allow", {"entries": list(entries)}, reply_timeout=30)
            if not reply.get("ok"):
                raise GuestError(f"the running workspace refused the change: {reply.get('error', '?')}")
        cfg.network_policy = policy
        cfg.spec = {**cfg.spec, **WorkspaceSpec(network=policy).to_json()}
        cfg.network = policy.backend_mode
        info.dir.save_config(dataclasses.replace(cfg))
        return self.ctx.store.status(name)
