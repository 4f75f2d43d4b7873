"""What each of the supervisor's collaborators may use of it: one narrow interface per role.

The collaborators (the client hub, the guest tasks, the port relay, live snapshots, template boots) are given the
running supervisor, but each sees only its role below, so none imports ``core`` and the snapshots package needs
no ``Supervisor``; a type checker holds them to it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..model import LaunchSpec
    from ..network_policy import NetworkPolicy
    from ..protocol import ExitStatus
    from ..records import WorkspaceDir, WorkspaceState
    from ..sandbox.network import NetworkSandbox


class Recorded(Protocol):
    """The workspace's record and console notes."""

    ws: WorkspaceDir
    state: WorkspaceState
    launch: LaunchSpec

    def save(self, **changes: Any) -> None: ...
    def serial_note(self, text: str) -> None: ...


class AgentChannel(Recorded, Protocol):
    """Frames to the guest agent, on streams this supervisor allocates."""

    asleep: bool  # the VM sleeps (or is waking): frames are held and wake it (sleeping.py)

    def to_agent(self, ftype: int, stream: int, payload: bytes = b"") -> bool: ...
    def new_stream(self) -> int: ...
    def exec_allowed(self) -> bool: ...
    async def agent_drained(self) -> None: ...
    def drop_frame(self, ftype: int, stream: int, why: str) -> None: ...


class TaskHost(AgentChannel, Protocol):
    """For setup and the entrypoint (guest_tasks.py)."""

    intent: str | None
    vm_exited: asyncio.Event

    def to_console(self, data: bytes) -> None: ...
    def wants_restart(self, entrypoint_status: ExitStatus | None) -> bool: ...
    def kill_vm(self) -> None: ...


class ClientHost(AgentChannel, Protocol):
    """For the control socket's clients (clients.py)."""

    net: NetworkSandbox | None
    network_policy: NetworkPolicy
    ports: Any  # the PortRelay: its control()

    def to_serial(self, data: bytes) -> None: ...
    async def quarantine(self) -> dict[str, Any]: ...
    async def pause(self, pause: bool) -> dict[str, Any]: ...
    async def sleep(self) -> dict[str, Any]: ...
    async def end_vm(self, how: str, timeout: float | None = None) -> dict[str, Any]: ...


class LiveVM(Recorded, Protocol):
    """For a live snapshot of the running VM (snapshots/live.py)."""

    snapshotting: bool
    pings: dict[int, float]
    ram_file: str | None

    async def end_vm(self, how: str, timeout: float | None = None) -> dict[str, Any]: ...


class TemplateBoot(Recorded, Protocol):
    """For a boot from (or the making of) a template (snapshots/warm.py)."""

    net: NetworkSandbox | None

    def disk_argv(self, argv: list[str]) -> list[str]: ...
    def enforce_network(self) -> None: ...
    async def on_serial(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...
