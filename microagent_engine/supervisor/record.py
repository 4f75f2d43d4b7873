"""The supervisor's part that keeps the workspace's record: state changes (through states.transition), readiness signals,
the ready reply to the engine, console notes, and the final state when the VM is gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ..logfiles import tail_bytes
from ..records import now_iso, signal as readiness
from ..states import transition
from ..textsafe import safe_text

def tail_text(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a guest-written log file (read from its end), made safe to show."""
    text = "\n".join(tail_bytes(path, 8192).decode(errors="replace").splitlines()[-lines:])
    return safe_text(text, 4000, newlines=True)


class StateRecording:
    """Saving the workspace's state record (a part of :class:`~.core.Supervisor`)."""

    # ---- state ---------------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        """Record ``changes`` (a new ``state`` only through :func:`states.transition`)."""
        if "state" in changes:
            changes["state"] = transition(self.state.state, changes["state"])
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.ws.save_state(self.state)

    def save_soon(self) -> None:
        """Save within a second (for counters a guest can drive: one write per burst, not per frame)."""
        if self._save_handle is None:
            def later() -> None:
                self._save_handle = None
                self.save()
            self._save_handle = asyncio.get_running_loop().call_later(1.0, later)

    def set_signal(self, name: str, ready: bool, detail: str = "", error: str = "") -> None:
        self.state.readiness[name] = readiness(ready, detail, error)

    def report_mediation(self, ready: bool, detail: str, error: str) -> None:
        old = self.state.readiness.get("mediationReady", {})
        if (old.get("ready"), old.get("detail"), old.get("error")) != (ready, detail, error):
            self.set_signal("mediationReady", ready, detail, error)
            self.save()

    def notify_ready(self, ok: bool, error: str = "") -> None:
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, (json.dumps({"ok": ok, "error": error}) + "\n").encode())
            os.close(self.ready_fd)
        self.ready_fd = None

    def serial_note(self, text: str) -> None:
        self.serial_log.write(f"\n--- microagent: {text} ---\n".encode())

    def finalize(self) -> None:
        how = self.state.exit_detail
        for name in self.state.readiness:
            # after a channel failure the reason stays on the signals it ended
            kept = self.state.readiness[name].get("error", "") if self.intent == "channel-failed" else ""
            self.set_signal(name, False, "VM not running", kept)
        if self.intent == "kill":
            final, error = "stopped", ""
        elif self.intent == "halt" and self.state.state == "stopping":
            final, error = "halted", ""
        elif self.intent == "stop" and self.state.state == "stopping":
            final, error = "stopped", ""
        elif self.state.state == "failed":
            final, error = "failed", self.state.error
        elif not self.ever_ready:
            final = "failed"
            error = self.state.error or (f"the VM exited during boot ({how}). Last console lines:\n"
                                         + tail_text(self.ws.serial_log))
        else:
            final, error = "failed", f"the VM exited unexpectedly ({how})"
        self.save(state=final, error=error, vm_pid=None, vm_start_time=None, supervisor_pid=None,
                  stopped_at=now_iso())
        self.notify_ready(False, error or f"the VM exited ({how})")
