"""Whether a published host port can be bound now, and why not (for the engine's checks before a start and for the
supervisor's real binds). Light on purpose: the CLI imports it without the supervisor's asyncio side."""

from __future__ import annotations

import errno
import socket
from typing import Iterable

from .errors import PortUnavailable
from .model import Publish


def port_error(item: Publish, exc: OSError) -> str:
    """Why ``item``'s host address cannot be bound, and what to do."""
    where = item.host_address
    if exc.errno == errno.EADDRINUSE:
        return (f"host port {where} is already in use (another program or workspace listens there); free it, "
                f"or publish another host port (e.g. -p {item.host_port + 1 if item.host_port < 65535 else 0}:"
                f"{item.guest_port}, or -p 0:{item.guest_port} for any free port)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot publish on {where}: {item.host_ip} is not an address of this host; use 127.0.0.1"
    if exc.errno == errno.EACCES:
        return f"cannot publish on {where}: ports below 1024 need privileges; publish a port from 1024 up"
    return f"cannot publish on {where}: {exc.strerror or exc}"


def check_publish_free(items: Iterable[Publish]) -> None:
    """PortUnavailable naming the first fixed host port that cannot be bound right now (a quick check before
    anything is created or started; the supervisor's bind is the real one)."""
    for item in items:
        if not item.host_port:
            continue
        family = socket.AF_INET6 if ":" in item.host_ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((item.host_ip, item.host_port))
                sock.listen(1)
            except OSError as exc:
                raise PortUnavailable(port_error(item, exc)) from None
