"""The workspace state machine: its states, which actions each state allows, and which state changes exist.

This is the one place these rules live. Code checks an action with :func:`require` (or reads
:func:`allowed_actions`) and changes a state only through :func:`transition`; ``status --json`` and the REST API
carry ``actions`` so the notebook widgets and the JupyterLab panel show exactly what the engine would accept.
"""

from __future__ import annotations

from .errors import InvalidState

STATES = ("prepared", "starting", "running", "paused", "stopping", "halted", "stopped", "failed", "quarantined",
          "sleeping")
STARTABLE = ("prepared", "halted", "stopped", "failed")
#: a supervisor and (usually) a VM are alive; sleeping: the supervisor (with every stream and port) but no VM, its
#: memory saved in a file; an exec, a published port's traffic or resume wakes it
ACTIVE = ("starting", "running", "paused", "stopping", "quarantined", "sleeping")
#: the guest agent answers execs
EXEC_STATES = ("running", "quarantined")
READINESS_SIGNALS = ("guestReady", "execReady", "shellReady", "mediationReady")
#: every action a front-end may offer, in display order (then the ones only the engine's API takes)
ACTIONS = ("start", "pause", "resume", "sleep", "snapshot", "halt", "stop", "kill", "quarantine", "delete", "exec",
           "cp", "publish", "commit", "output")

#: the states each state may move to (a record is born ``prepared``); every change goes through transition()
TRANSITIONS: dict[str | None, tuple[str, ...]] = {
    None: ("prepared",),
    "prepared": ("starting", "failed", "stopped"),
    "halted": ("starting", "failed", "stopped"),
    "stopped": ("starting", "failed", "stopped"),
    "failed": ("starting", "failed", "stopped"),
    # a VM boots, comes up, is halted, stopped or killed while booting, or fails (a restart boots it again)
    "starting": ("starting", "running", "stopping", "stopped", "halted", "failed"),
    "running": ("running", "paused", "quarantined", "stopping", "starting", "stopped", "failed", "sleeping"),
    "paused": ("paused", "running", "stopping", "stopped", "failed", "sleeping"),
    "sleeping": ("starting", "failed", "stopped"),
    "quarantined": ("quarantined", "stopping", "stopped", "failed"),
    "stopping": ("stopping", "halted", "stopped", "failed", "starting"),
}


def allowed_actions(state: str, vm_alive: bool = False) -> list[str]:
    """The actions the engine accepts for a workspace in ``state`` (``vm_alive``: a VM process still runs)."""
    allowed = {
        "start": state in STARTABLE and not vm_alive,
        "pause": state == "running",  # the VM's vCPUs stop; its memory and processes stay as they are
        "resume": state in ("paused", "sleeping"),
        # memory saved to a file and the VM ended (host memory freed); the next exec, port traffic or resume wakes it
        "sleep": state in ("running", "paused"),
        # memory, device state and disks saved with the VM stopped briefly; it runs on (or stays paused) after
        "snapshot": state in ("running", "paused"),
        "halt": state in EXEC_STATES or state == "starting",
        "stop": state in EXEC_STATES or state == "starting",
        "kill": state in ACTIVE or state == "failed" or vm_alive,
        "quarantine": state == "running",
        "delete": state not in ACTIVE and not vm_alive,
        "exec": state in EXEC_STATES or state == "sleeping",  # a sleeping one is woken by it
        # a file: through the agent while it runs (a sleeping one wakes for it), else from its disks
        "cp": (state not in ACTIVE and not vm_alive) or state in EXEC_STATES or state == "sleeping",
        # read from its disks (declared outputs, cp of a workspace that is neither running nor stopped)
        "output": state not in ACTIVE and not vm_alive,
        "publish": state in ("running", "starting"),
        "commit": state in ("halted", "stopped", "prepared", "failed") and not vm_alive,
    }
    return [a for a in ACTIONS if allowed[a]]


def refusal(action: str, state: str, name: str, vm_alive: bool = False, what: str = "") -> str:
    """Why ``action`` (named ``what`` to the user, default the action) is refused for workspace ``name`` in
    ``state``, with the next step."""
    what = what or action
    ws = f"workspace {name!r}"
    if action == "start":
        if state in ACTIVE:
            return f"{ws} is already {state}"
        if vm_alive:
            return f"{ws} is {state} but its VM is still running; run 'microagent kill {name}' first"
        return f"{ws} is {state}; halt, stop or kill it before start"
    if action == "exec":
        hint = (f"start it first: microagent start {name}" if "start" in allowed_actions(state, vm_alive) else
                f"resume it first: microagent resume {name}" if state == "paused" else "wait or kill it")
        return f"{ws} is {state}, not running; {hint}"
    if action in ("pause", "resume"):
        need = "paused" if action == "resume" else "running"
        return f"{ws} is {state}; only a {need} workspace can be {action}d"
    if action in ("snapshot", "sleep"):
        done = "snapshotted" if action == "snapshot" else "put to sleep"
        return f"{ws} is {state}; only a running or paused workspace can be {done} (microagent start {name})"
    if action == "quarantine":
        return f"{ws} is {state}; only a running workspace can be quarantined"
    if action in ("halt", "stop") and state == "sleeping":
        return f"{ws} is sleeping; resume it first (microagent resume {name}), or kill it"
    if action in ("halt", "stop"):
        return f"{ws} is {state}, not running" if state in STARTABLE else f"{ws} is {state}; use kill to force it off"
    if action == "kill":
        return f"{ws} is {state}, not running"
    if action == "publish":
        return f"{ws} is {state}; ports can be published only while it runs (microagent start {name})"
    if action == "delete":
        return f"{ws} is {state} and its VM is still running; halt, stop or kill it first"
    if action in ("cp", "commit", "output"):
        if state == "sleeping":
            return (f"{ws} is sleeping (its saved memory holds disk pages not written yet); {what} needs it halted: "
                    f"microagent resume {name}, then microagent halt {name}")
        if vm_alive or state in ACTIVE:
            return (f"{ws} is {state}; {what} works only while it is not running: halt it first "
                    f"(microagent halt {name})")
        return f"{ws} is {state}; halt or stop it before {what}"
    return f"{ws} is {state}; {what} is not possible now"


def allows(action: str, state: str, vm_alive: bool = False) -> bool:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    return action in allowed_actions(state, vm_alive)


def require(action: str, state: str, name: str, vm_alive: bool = False, what: str = "") -> None:
    """InvalidState, naming the next step, unless ``action`` is allowed for workspace ``name`` in ``state``."""
    if not allows(action, state, vm_alive):
        raise InvalidState(refusal(action, state, name, vm_alive, what))


def transition(current: str | None, new: str) -> str:
    """``new``, when a workspace in ``current`` (None: a new record) may move there; InvalidState otherwise."""
    if new not in STATES:
        raise ValueError(f"unknown state {new!r}")
    if new not in TRANSITIONS.get(current, ()):
        raise InvalidState(f"a workspace cannot go from {current or 'nothing'} to {new}")
    return new
