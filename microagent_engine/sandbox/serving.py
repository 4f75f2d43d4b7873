"""What the supervisor's network servers (the guest's DNS, the egress proxy) share: servers and the tasks they
spawned, stopped together (quarantine) and awaited on close."""

from __future__ import annotations

import asyncio
from typing import Any


class ServedTasks:
    """A mixin: ``_servers`` (asyncio servers or transports) and ``_tasks`` (their connections' tasks)."""

    _servers: list[Any]
    _tasks: set[asyncio.Task[Any]]

    def stop(self) -> None:
        """Stop serving: close the servers and cancel what is in flight."""
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks)
        self.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._servers = []
