"""The workspace state machine: its states, and which actions each state allows.

This is the one place these rules live. The engine checks them before acting; ``status --json`` and the REST API
carry ``actions`` so the notebook widgets and the JupyterLab panel show exactly what the engine would accept.
"""

from __future__ import annotations

STATES = ("prepared", "starting", "running", "paused", "stopping", "halted", "stopped", "failed", "quarantined")
STARTABLE = ("prepared", "halted", "stopped", "failed")
#: a supervisor and (usually) a VM are alive
ACTIVE = ("starting", "running", "paused", "stopping", "quarantined")
#: the guest agent answers execs
EXEC_STATES = ("running", "quarantined")
READINESS_SIGNALS = ("guestReady", "execReady", "shellReady", "mediationReady")
#: every action a front-end may offer, in display order
ACTIONS = ("start", "pause", "resume", "snapshot", "halt", "stop", "kill", "quarantine", "delete", "exec", "cp")


def allowed_actions(state: str, vm_alive: bool = False) -> list[str]:
    """The actions the engine accepts for a workspace in ``state`` (``vm_alive``: a VM process still runs)."""
    allowed = {
        "start": state in STARTABLE and not vm_alive,
        "pause": state == "running",  # the VM's vCPUs stop; its memory and processes stay as they are
        "resume": state == "paused",
        # memory, device state and disks saved with the VM stopped briefly; it runs on (or stays paused) after
        "snapshot": state in ("running", "paused"),
        "halt": state in EXEC_STATES,
        "stop": state in EXEC_STATES,
        "kill": state in ACTIVE or state == "failed" or vm_alive,
        "quarantine": state == "running",
        "delete": state not in ACTIVE and not vm_alive,
        "exec": state in EXEC_STATES,
        "cp": state not in ACTIVE and not vm_alive,
    }
    return [a for a in ACTIONS if allowed[a]]
