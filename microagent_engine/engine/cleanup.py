"""Ending a workspace that a composite operation (``run``, a warm snapshot's build) made, whatever state it is in."""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import GuestError, MicroagentError, NotFound


class _Engine(Protocol):
    def status(self, name: str) -> Any: ...
    def halt(self, name: str) -> Any: ...
    def kill(self, name: str) -> Any: ...
    def delete(self, name: str) -> None: ...


def finish(engine: _Engine, name: str, force: bool = False) -> None:
    """Halt (``force``: kill) the workspace's VM if it still runs."""
    try:
        info = engine.status(name)
        if not info.dir.supervisor_alive():
            return
        if force:
            engine.kill(name)
        else:
            try:
                engine.halt(name)
            except GuestError:
                engine.kill(name)
    except NotFound:
        pass


def delete_quietly(engine: _Engine, name: str) -> None:
    try:
        engine.delete(name)
    except MicroagentError:
        pass


def kill_quietly(engine: _Engine, name: str) -> None:
    """Kill workspace ``name``'s VM if it runs; nothing is raised."""
    try:
        finish(engine, name, force=True)
    except MicroagentError:
        pass


def remove_quietly(engine: _Engine, name: str) -> None:
    """Kill (if it runs) and delete workspace ``name``; nothing is raised."""
    kill_quietly(engine, name)
    delete_quietly(engine, name)
