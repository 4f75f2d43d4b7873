"""Egress by name: the proxy every TCP connection of a guest with a name allow-list goes through (issue 18).

The namespace's nftables rules redirect the guest's TCP connections (QEMU's slirp opens them as local sockets in
the VM's namespace) to a listening socket of the supervisor on the namespace's 127.0.0.1:EGRESS_PORT, served here
from the host's namespace. For each connection the proxy:

- reads the original destination (``SO_ORIGINAL_DST``) and the client's first bytes (bounded, with a deadline);
- takes the name the client asks for: the TLS ClientHello's SNI, or the HTTP request's ``Host``; no name (an IP
  literal, another protocol) is refused;
- accepts only a name on the allow-list (exact or ``*.suffix``, with its port), and only to an address the engine's
  DNS handed out *for that name* (:class:`Grants`, filled by ``dns.DnsForwarder``): an SNI that does not match the
  name the guest resolved, or an address another name resolved to, is refused (no fronting through a shared IP);
- refuses every private, special-purpose and host range whatever a name resolved to;
- dials the destination itself from the host's namespace and relays both ways with bounded buffers.

Refusals are counted, logged (bounded) and kept as a short list of recent ones for ``status``/``blocked``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..network_policy import NetworkPolicy
from ..secret import Secret
from ..textsafe import safe_text
from .serving import ServedTasks
from .egress_tls import (
    MAX_REQUEST_HEAD,
    MAX_RESPONSE_HEAD,
    LeafCerts,
    TlsServerStream,
    read_head,
    rewrite_head,
    upstream_context,
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

EGRESS_PORT = 15001  # the proxy's port on the namespace's loopback (where nftables redirects guest TCP)
SO_ORIGINAL_DST = 80
MAX_HEAD = 16 * 1024 + 5  # one TLS record (a ClientHello) or an HTTP request head
HEAD_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
CHUNK = 64 * 1024
MAX_CONNECTIONS = 256  # open at once per VM; more are refused
MAX_GRANTS = 4096  # (name, address) pairs remembered per VM
GRANT_MIN_TTL = 300.0  # a guest may cache an answer longer than its TTL: keep the grant at least this long
GRANT_MAX_TTL = 86400.0
MAX_RECENT = 50  # recent refusals kept for status
MAX_LOG_LINES = 200


class Grants:
    """Which addresses the engine's DNS handed out for which names (bounded; entries expire)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_name: dict[str, dict[Address, float]] = {}
        self._count = 0
        self._clock = clock

    def record(self, name: str, addresses: list[tuple[Address, int]]) -> None:
        now = self._clock()
        entry = self._by_name.setdefault(name.lower().rstrip("."), {})
        for addr, ttl in addresses:
            if addr not in entry:
                if self._count >= MAX_GRANTS:
                    self._expire(now)
                if self._count >= MAX_GRANTS:
                    return
                self._count += 1
            entry[addr] = now + min(max(float(ttl), GRANT_MIN_TTL), GRANT_MAX_TTL)

    def allows(self, name: str, addr: Address) -> bool:
        expiry = self._by_name.get(name, {}).get(addr)
        return expiry is not None and expiry > self._clock()

    def _expire(self, now: float) -> None:
        for name in list(self._by_name):
            entry = self._by_name[name]
            for addr in [a for a, t in entry.items() if t <= now]:
                del entry[addr]
                self._count -= 1
            if not entry:
                del self._by_name[name]


# ---- what the client asks for ------------------------------------------------------------------------------


def tls_sni(head: bytes) -> str | None | bool:
    """The SNI host name of a TLS ClientHello in ``head``; None when it is one without SNI; False when ``head``
    is not (yet) a whole ClientHello record. Raises ValueError on a malformed one."""
    if len(head) < 5:
        return False
    if head[0] != 0x16 or head[1] != 3:
        raise ValueError("not a TLS handshake")
    length = struct.unpack_from("!H", head, 3)[0]
    if length > MAX_HEAD - 5:
        raise ValueError("oversize TLS record")
    if len(head) < 5 + length:
        return False
    body = head[5:5 + length]
    if len(body) < 4 or body[0] != 1:
        raise ValueError("not a ClientHello")
    hello_len = int.from_bytes(body[1:4], "big")
    hello = body[4:4 + hello_len]
    if len(hello) != hello_len:
        raise ValueError("a ClientHello spread over records")
    pos = 2 + 32  # client_version, random
    pos += 1 + _byte(hello, pos)  # session id
    pos += 2 + _u16(hello, pos)  # cipher suites
    pos += 1 + _byte(hello, pos)  # compression methods
    if pos == len(hello):
        return None
    end = pos + 2 + _u16(hello, pos)
    pos += 2
    if end != len(hello):
        raise ValueError("extensions length")
    while pos + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!2H", hello, pos)
        pos += 4
        data = hello[pos:pos + ext_len]
        if len(data) != ext_len:
            raise ValueError("extension overrun")
        pos += ext_len
        if ext_type == 0:  # server_name: list of (type, name)
            if len(data) < 5 or data[2] != 0:
                raise ValueError("server_name")
            name_len = _u16(data, 3)
            name = data[5:5 + name_len]
            if len(name) != name_len or name_len == 0:
                raise ValueError("server_name length")
            return name.decode("ascii")
    return None


def _byte(data: bytes, pos: int) -> int:
    if pos >= len(data):
        raise ValueError("truncated")
    return data[pos]


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise ValueError("truncated")
    return int(struct.unpack_from("!H", data, pos)[0])


def http_host(head: bytes) -> str | None | bool:
    """The ``Host`` of an HTTP/1.x request head in ``head`` (without its port); None when the request has none;
    False when the head is not complete yet. Raises ValueError when ``head`` is not an HTTP request."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        if len(head) >= MAX_HEAD or (head and not head[:1].isalpha()):
            raise ValueError("not an HTTP request")
        return False
    lines = head[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise ValueError("not an HTTP request line")
    hosts = [line.split(b":", 1)[1].strip() for line in lines[1:] if line[:5].lower() == b"host:"]
    if len(hosts) != 1:
        return None
    host = hosts[0].decode("ascii", errors="strict")
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def requested_name(head: bytes) -> str | None | bool:
    """The name a connection's first bytes ask for (SNI or Host), None if none, False if more bytes are needed.
    ValueError for anything that is neither TLS nor HTTP."""
    if head[:1] == b"\x16":
        return tls_sni(head)
    return http_host(head)


def original_destination(sock: socket.socket) -> tuple[Address, int]:
    """Where the guest meant to connect before nftables redirected it here (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return ipaddress.IPv4Address(raw[4:8]), port


# ---- the proxy ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundSecret:
    """A secret with the placeholder the guest holds and the value the proxy puts in its place."""

    secret: Secret
    placeholder: str
    value: str = field(repr=False)


@dataclass
class EgressProxy(ServedTasks):
    """Serves the redirected connections of one VM (see the module docstring). TLS to a host bound to one of
    ``secrets`` is terminated with ``leaves`` and its request headers get the values (egress_tls.py)."""

    policy: NetworkPolicy
    grants: Grants
    refused: Callable[[Address], bool]
    log: Callable[[str], None]
    secrets: list[BoundSecret] = field(default_factory=list)
    leaves: LeafCerts | None = None
    on_refuse: Callable[[], None] = lambda: None  # the report is rewritten at once (a notebook shows it)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("connections", "allowed", "blocked", "bytesOut", "bytesIn", "secretRequests"), 0))
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_RECENT))
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _servers: list[Any] = field(default_factory=list)
    _logged: int = 0

    async def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._servers.append(await asyncio.start_server(self._client, sock=sock))

    def remember(self, name: str | None, addr: Address | None, port: int | None, reason: str) -> str:
        """Keep a refusal in the recent list (the report shows it); the name as shown."""
        shown = safe_text(name, 253) if name else (str(addr) if addr else "?")
        self.recent.append({"name": shown, "address": str(addr) if addr else None, "port": port, "reason": reason,
                            "at": time.time()})
        self.on_refuse()
        return shown

    def _refuse(self, name: str | None, addr: Address | None, port: int | None, reason: str) -> None:
        self.counters["blocked"] += 1
        shown = self.remember(name, addr, port, reason)
        if self._logged < MAX_LOG_LINES:
            self._logged += 1
            self.log(f"egress: refused {shown}:{port} ({addr}): {reason}")

    def decide(self, name: str | None, addr: Address, port: int) -> str:
        """Why a connection for ``name`` to ``addr``:``port`` is refused ("" when it is allowed)."""
        if self.refused(addr):
            return "the address is in a range no workspace reaches"
        if name is None:
            return "no host name (an IP literal or a protocol other than TLS and HTTP)"
        try:
            ipaddress.ip_address(name)
            return "an IP literal, not a name"
        except ValueError:
            pass
        name = name.lower().rstrip(".")
        if not self.policy.allows_name(name, port):
            if self.policy.allows_name(name):
                return f"port {port} is not allowed for this name"
            return "the name is not on the allow-list"
        if not self.grants.allows(name, addr):
            return "the address was not handed out for this name by the workspace's DNS"
        return ""

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:
            writer.close()
            return
        self.counters["connections"] += 1
        if len(self._tasks) >= MAX_CONNECTIONS:
            self._refuse(None, None, None, f"more than {MAX_CONNECTIONS} connections at once")
            writer.close()
            return
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            addr, port = original_destination(writer.get_extra_info("socket"))
            head, name = await self._read_head(reader)
            if name is False:
                self._refuse(None, addr, port, "the client sent no TLS ClientHello or HTTP request in time")
                return
            reason = self.decide(name if isinstance(name, str) else None, addr, port)
            if reason:
                self._refuse(name if isinstance(name, str) else None, addr, port, reason)
                return
            host = str(name).lower().rstrip(".")
            bound = [b for b in self.secrets if b.secret.bound_to(host)]
            if bound and head[:1] == b"\x16" and self.leaves is not None:
                self.counters["allowed"] += 1
                await self._with_secrets(reader, writer, head, host, addr, port, bound)
                return
            try:
                up_reader, upstream = await asyncio.wait_for(asyncio.open_connection(str(addr), port),
                                                             CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self._refuse(str(name), addr, port, f"could not connect ({exc.__class__.__name__})")
                return
            self.counters["allowed"] += 1
            upstream.write(head)
            self.counters["bytesOut"] += len(head)
            await asyncio.gather(self._pipe(reader, upstream, "bytesOut"), self._pipe(up_reader, writer, "bytesIn"))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    async def _with_secrets(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: bytes,
                            host: str, addr: Address, port: int, bound: list[BoundSecret]) -> None:
        """TLS to a host bound to secrets: terminate it, relay one request with the values in its headers."""
        assert self.leaves is not None
        client = TlsServerStream(self.leaves.context_for(host), reader, writer, hello)
        try:
            await asyncio.wait_for(client.handshake(), TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._refuse(host, addr, port, f"the guest's TLS handshake with the egress proxy failed ({exc}); does "
                                           f"the guest trust the workspace's CA?")
            return
        try:
            up_reader, upstream = await asyncio.wait_for(asyncio.open_connection(
                str(addr), port, ssl=upstream_context(), server_hostname=host), CONNECT_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._refuse(host, addr, port, f"could not connect with verified TLS ({exc.__class__.__name__})")
            await client.close()
            return
        try:
            head, rest = await read_head(client.read, MAX_REQUEST_HEAD)
            values = {b.placeholder.encode(): b.value.encode() for b in bound}
            self.counters["secretRequests"] += 1
            upstream.write(rewrite_head(head, values) + rest)
            self.counters["bytesOut"] += len(head) + len(rest)

            async def up() -> None:
                while data := await client.read(CHUNK):
                    upstream.write(data)
                    self.counters["bytesOut"] += len(data)
                    await upstream.drain()

            async def down() -> None:
                resp, more = await read_head(up_reader.read, MAX_RESPONSE_HEAD)
                await client.write(rewrite_head(resp, {}) + more)
                self.counters["bytesIn"] += len(resp) + len(more)
                while data := await up_reader.read(CHUNK):
                    await client.write(data)
                    self.counters["bytesIn"] += len(data)

            sending = asyncio.ensure_future(up())
            try:
                await down()
            finally:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
            await client.close()
        except (OSError, ValueError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                upstream.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[bytes, str | None | bool]:
        head = b""
        deadline = asyncio.get_running_loop().time() + HEAD_TIMEOUT
        while True:
            try:
                name = requested_name(head) if head else False
            except (ValueError, UnicodeDecodeError):
                return head, None
            if name is not False or len(head) >= MAX_HEAD:
                return head, name
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return head, False
            try:
                more = await asyncio.wait_for(reader.read(MAX_HEAD - len(head)), left)
            except TimeoutError:
                return head, False
            if not more:
                return head, False
            head += more

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str) -> None:
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                self.counters[counter] += len(data)
                await dst.drain()  # backpressure: never more than one chunk buffered per direction
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()

    def report(self) -> dict[str, Any]:
        """Counters and the recent refusals (for status)."""
        return {**self.counters, "open": len(self._tasks), "recentBlocked": list(self.recent)}
