"""A one-shot QMP client: connect to the VM's QMP socket, negotiate, run one command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any


async def qmp_command(socket_path: Path, command: str, arguments: dict[str, Any] | None = None) -> bool:
    """Run ``command`` through QMP; True if QEMU answered it with a ``return``."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        await reader.readline()
        ok = True
        for cmd, args in (("qmp_capabilities", None), (command, arguments)):
            msg: dict[str, Any] = {"execute": cmd, **({"arguments": args} if args else {})}
            writer.write(json.dumps(msg).encode() + b"\n")
            await writer.drain()
            while True:  # skip asynchronous events until the command's answer
                answer = json.loads(await reader.readline() or b"{}")
                if "event" not in answer:
                    break
            ok = ok and "return" in answer
        writer.close()
        return ok
    except (OSError, ValueError):
        return False
