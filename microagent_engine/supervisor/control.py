"""The supervisor's part that acts on the running VM when asked: quarantine, pause and resume, halt, stop and kill,
and QMP commands."""

from __future__ import annotations

import asyncio
from typing import Any

from ..protocol import FrameType, HaltMode, NetworkMode
from ..states import allows, refusal
from .guest_tasks import STOP_TIMEOUT
from ..backends.qmp import qmp_command
from .timing import HALT_TIMEOUT

class VmControl:
    """Controls of the running VM (a part of :class:`~.core.Supervisor`)."""

    async def quarantine(self) -> dict[str, Any]:
        if not allows("quarantine", self.state.state):
            return {"ok": False, "error": refusal("quarantine", self.state.state, self.ws.name)}
        if self.net is not None:
            self.net.sever()
        if self.launch.network == NetworkMode.USER and not await self.qmp("set_link", {"name": "net0", "up": False}):
            return {"ok": False, "error": "could not take the network link down through QMP"}
        if self.mediation:
            self.mediation.sever("workspace quarantined")
        self.ports.sever()
        self.set_signal("mediationReady", False, "quarantined", "workspace quarantined")
        self.save(state="quarantined", error="quarantined: network and mediation severed; halt, stop or kill "
                                              "it before starting again")
        return {"ok": True, "state": "quarantined"}

    async def pause(self, pause: bool) -> dict[str, Any]:
        """pause: stop the vCPUs (QMP ``stop``), keeping memory and processes; resume: ``cont``."""
        op = "pause" if pause else "resume"
        if not pause and (self.asleep or self.state.state == "sleeping"):
            return await self.wake()
        if not allows(op, self.state.state):
            return {"ok": False, "error": refusal(op, self.state.state, self.ws.name)}
        if not await self.qmp("stop" if pause else "cont"):
            return {"ok": False, "error": f"QEMU did not {'stop' if pause else 'continue'} the VM through QMP"}
        self.pings.clear()  # the guest could not answer pings while paused
        if pause:
            self.set_signal("execReady", False, "paused", "workspace paused; resume it to run commands")
        else:
            self.set_signal("execReady", True, "resumed")
        self.save(state="paused" if pause else "running")
        return {"ok": True, "state": self.state.state}

    async def end_vm(self, how: str, timeout: float | None = None) -> dict[str, Any]:
        """halt (graceful, via the agent), stop (ask once, wait 5 s, no escalation) or kill (hard)."""
        if self.exited.is_set():
            return {"ok": True, "state": self.state.state}
        if how == "kill":
            self.intent = "kill"
            self.wake_requested.set()  # a sleeping workspace's boot loop ends instead of waking
            if self.proc and self.proc.returncode is None:
                self.proc.kill()
            if self.net is not None:
                self.net.kill_uplink()
            await self.exited.wait()
            return {"ok": True, "state": self.state.state}
        if not allows(how, self.state.state):
            return {"ok": False, "error": refusal(how, self.state.state, self.ws.name)}
        self.intent = how
        self.save(state="stopping")
        if self.proc is None or self.proc.returncode is not None:  # between restarts
            await self.exited.wait()
            return {"ok": True, "state": self.state.state}
        if how == "halt":
            sent = self.to_agent(FrameType.HALT, 0, HaltMode.HALT.encode())
            limit = timeout or HALT_TIMEOUT
        else:
            sent = self.to_agent(FrameType.HALT, 0, HaltMode.POWEROFF.encode())
            limit = timeout or STOP_TIMEOUT
        if not sent:
            await self.qmp("system_powerdown")
        try:
            await asyncio.wait_for(self.exited.wait(), limit)
        except asyncio.TimeoutError:
            error = (f"{how}: the guest did not shut down within {limit:.0f} s; it is still running. "
                     f"Run 'microagent kill {self.ws.name}' to force it off")
            self.save(state="failed", error=error)
            return {"ok": False, "error": error, "state": "failed"}
        return {"ok": True, "state": self.state.state}

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> bool:
        return await qmp_command(self.ws.qmp_socket, command, arguments)
