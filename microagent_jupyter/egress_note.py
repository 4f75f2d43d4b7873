"""After a cell, tell the user what the sandbox refused and how to allow it (the guest's own error is often a
bare ``ConnectionResetError`` or ``Name or service not known``)."""

from __future__ import annotations

import sys
import time

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.textsafe import safe_text

MAX_NAMED = 5


class RefusalWatch:
    """Notes refusals of workspace ``name`` made from now on (a cheap read of its egress report)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.name, self.since = engine, name, time.time()

    def refused(self) -> list[tuple[str, str]]:
        """(entry as --allow takes it, reason) of the refusals since this watch began, once each."""
        try:
            report = self.engine.egress(self.name)
        except MicroagentError:
            return []
        out: dict[str, str] = {}
        for item in (report.get("egress") or {}).get("recentBlocked") or []:
            if not isinstance(item, dict) or float(item.get("at") or 0) < self.since or not item.get("name"):
                continue
            port = item.get("port")
            entry = f"{safe_text(str(item['name']), 120)}" + (f":{int(port)}" if isinstance(port, int) else "")
            out.setdefault(entry, safe_text(str(item.get("reason", "")), 160))
        return list(out.items())[:MAX_NAMED]

    def report(self) -> None:
        """Write a note to the cell's stderr when something was refused."""
        refused = self.refused()
        if not refused:
            return
        lines = [f"microagent: the sandbox refused {entry} ({why})" for entry, why in refused]
        names = [entry for entry, why in refused if "allow-list" in why]
        if names:
            lines.append(f"microagent: to allow: %microagent allow {self.name} {' '.join(names)}")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
