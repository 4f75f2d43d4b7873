"""The engine's error hierarchy. Every message says what was wrong and what to do instead."""

from __future__ import annotations


class MicroagentError(Exception):
    """Base class of every error the engine raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InvalidArgument(MicroagentError):
    """A name, flag or value the user gave is not acceptable."""

    exit_code = 2


class NotFound(MicroagentError):
    """A workspace, volume or file that was named does not exist."""


class AlreadyExists(MicroagentError):
    """Creating something whose name is taken."""


class InvalidState(MicroagentError):
    """The operation is not allowed in the workspace's current state."""


class Busy(MicroagentError):
    """Another operation holds the lock this one needs."""


class HostError(MicroagentError):
    """The host lacks a tool or capability (qemu, kernel, e2fsprogs, KVM...)."""

    exit_code = 3


class GuestError(MicroagentError):
    """The VM or its agent failed: boot timeout, crash, lost channel."""


class ExecTimeout(MicroagentError):
    """Waiting for the guest took longer than allowed."""


class ProtocolError(GuestError):
    """The peer sent bytes that are not a valid frame (from the guest: treated as hostile, the channel ends)."""


class VolumeInUse(InvalidState):
    """The volume is attached to a running workspace."""


class SpecError(InvalidArgument):
    """A spec file is unreadable or invalid. ``line`` is 1-based; ``line``/``field`` are None when unknown."""

    def __init__(self, problem: str, *, file: object, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.problem = file, line, field, problem
        where = f"{file}:{line}" if line is not None else f"{file}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


class ImageError(MicroagentError):
    """An image is malformed, fails verification, or a registry answered something unusable."""


class AuthError(ImageError):
    """A registry refused our credentials (or wants some and we have none)."""


class PortUnavailable(AlreadyExists):
    """A host port to publish cannot be bound (in use, or the address is not on this host)."""
