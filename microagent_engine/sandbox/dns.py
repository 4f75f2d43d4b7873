"""The guest's DNS, answered on the host side (issue 16, item 4).

The guest never reaches a resolver itself: the namespace's rules refuse every private, special-purpose and host
range, resolvers included. Its DNS server is QEMU slirp's 10.0.2.3, which libslirp sends to the address of the first
``nameserver`` in QEMU's ``/etc/resolv.conf`` (with none it refuses the query): the jail gives QEMU one that names
127.0.0.1 (:data:`JAIL_RESOLV_CONF`), so each query lands on 127.0.0.1:53 of the VM's own network namespace. There sit a UDP and a TCP socket of the
supervisor (created inside the namespace, served here, in the host's namespace): :class:`DnsForwarder`.

It answers only well-formed standard queries (one question, class IN, a common type, a host name of valid labels,
at most 512 bytes); anything else is dropped without an answer and counted. Under an allow-list only the names on
it are forwarded, every other name gets NXDOMAIN from here (so a tunnel's labels never leave the host). Forwarded
queries go over plain UDP from the host's namespace to the host's resolvers, with a fresh ID and port each, a
timeout and a bound on queries in flight; answers are rebuilt record by record (names decompressed) and A/AAAA
records whose address lies in a refused range are removed (DNS rebinding). Counters live in
:attr:`DnsForwarder.counters`; refused names are logged, a bounded number of lines per VM run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..network_policy import DNS_PORT as PORT, GUEST_DNS  # noqa: F401 (the guest's resolver)
from ..textsafe import safe_text
from .serving import ServedTasks

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: QEMU's /etc/resolv.conf in its jail: libslirp sends the guest's 10.0.2.3 to its first nameserver (with none it
#: refuses: "network unreachable"), here the namespace's loopback, where the forwarder listens
JAIL_RESOLV_CONF = "nameserver 127.0.0.1\n"
MAX_QUERY = 512  # bytes: a query never needs more (RFC 1035 UDP limit)
MAX_UDP_ANSWER = 512  # bytes to the guest over UDP; larger answers go with TC set (the guest retries over TCP)
MAX_UPSTREAM = 4096  # bytes accepted from an upstream resolver
MAX_UDP_BACKLOG = 64 * 1024  # bytes of answers waiting to be sent to the guest before answers are dropped
MAX_INFLIGHT = 32  # forwarded queries waiting for an upstream answer
MAX_TCP_CLIENTS = 8
MAX_TCP_QUERIES = 64  # per connection
TCP_IDLE = 10.0  # seconds a guest TCP connection may sit without a complete query
UPSTREAM_TIMEOUT = 2.0  # seconds per upstream server
RATE = 50.0  # queries per second accepted, sustained ...
BURST = 200.0  # ... and in a burst
MAX_LOG_LINES = 50  # refused-name lines per forwarder; later ones are only counted
EDNS_SIZE = 1232  # the UDP payload size advertised upstream

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, OPT, SVCB, HTTPS, CAA = 1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 64, 65, 257
QTYPES = frozenset({A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, SVCB, HTTPS, CAA})
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN = 0, 1, 2, 3
_LABEL_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class Malformed(ValueError):
    """A message that is not one this forwarder answers."""


@dataclass(frozen=True)
class Query:
    """One validated guest query."""

    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    question: bytes  # the question section as the guest sent it (echoed in answers)


def _name_wire(name: str) -> bytes:
    out = b""
    name = name.rstrip(".")
    for label in name.split(".") if name else []:
        out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def parse_query(data: bytes) -> Query:
    """``data`` as a standard query, or Malformed: QR=0, opcode QUERY, not truncated, one question, no answer or
    authority records, at most one additional record (an EDNS OPT at the root), class IN, a type of
    :data:`QTYPES`, an uncompressed name of 1-63 byte labels of letters, digits, ``-`` and ``_``, at most 253
    characters, and nothing after the records."""
    if not 12 <= len(data) <= MAX_QUERY:
        raise Malformed("size")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
    if flags & 0x8000 or (flags >> 11) & 0xF or flags & 0x0200 or qd != 1 or an or ns or ar > 1:
        raise Malformed("header")
    pos, labels, length = 12, [], 0
    while True:
        n = data[pos] if pos < len(data) else -1
        if n < 0 or n > 63:  # also compression pointers (0xc0..): a query has no reason for them
            raise Malformed("name")
        pos += 1
        if n == 0:
            break
        label = data[pos:pos + n]
        if len(label) != n or not set(label) <= _LABEL_CHARS:
            raise Malformed("label")
        labels.append(label.decode("ascii").lower())
        length += n + 1
        pos += n
    if not labels or length - 1 > 253 or pos + 4 > len(data):
        raise Malformed("name")
    qtype, qclass = struct.unpack_from("!2H", data, pos)
    question = data[12:pos + 4]
    pos += 4
    if qclass != CLASS_IN or qtype not in QTYPES:
        raise Malformed("type")
    if ar:  # OPT: root name, type 41, class = size, ttl, rdlen, rdata
        if data[pos:pos + 3] != b"\0\0\x29" or pos + 11 > len(data):
            raise Malformed("additional")
        rdlen = struct.unpack_from("!H", data, pos + 9)[0]
        pos += 11 + rdlen
    if pos != len(data):
        raise Malformed("trailing")
    return Query(qid, flags, ".".join(labels), qtype, question)


def reply(query: Query, rcode: int, body: bytes = b"", counts: tuple[int, int, int] = (0, 0, 0),
          flags: int = 0) -> bytes:
    """An answer to ``query``: its ID and question, QR and RA set, RD echoed, ``rcode``, then ``body``."""
    head = 0x8000 | 0x0080 | (query.flags & 0x0100) | (flags & 0x0600) | rcode
    return struct.pack("!6H", query.id, head, 1, *counts) + query.question + body


# ---- answers from upstream ----------------------------------------------------------------------------------


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    """The (possibly compressed) name at ``pos`` and the position after it; Malformed on loops or overruns."""
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        if pos >= len(data):
            raise Malformed("name overrun")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data) or jumps > 32:
                raise Malformed("pointer")
            if end < 0:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            jumps += 1
            continue
        if n & 0xC0:
            raise Malformed("label type")
        pos += 1
        if n == 0:
            break
        label = data[pos:pos + n]
        if len(label) != n:
            raise Malformed("label overrun")
        labels.append(label.decode("latin-1"))
        pos += n
    name = ".".join(labels)
    if len(name) > 253:
        raise Malformed("name length")
    return name, (end if end >= 0 else pos)


def _wire_any(name: str) -> bytes:
    return b"".join(bytes([len(lb)]) + lb.encode("latin-1") for lb in name.split(".") if lb) + b"\0"


# record types whose RDATA holds names that may be compressed (RFC 1035, 2782): (prefix bytes, names, suffix bytes)
_NAMED_RDATA = {NS: (0, 1, 0), CNAME: (0, 1, 0), PTR: (0, 1, 0), MX: (2, 1, 0), SOA: (0, 2, 20), SRV: (6, 1, 0)}


@dataclass
class Filtered:
    """An upstream answer rebuilt for the guest."""

    rcode: int
    flags: int  # AA, TC bits from upstream
    body: bytes
    counts: tuple[int, int, int]
    stripped: int = 0


def filter_answer(data: bytes, query_id: int, question: bytes, refused: Callable[[Address], bool]) -> Filtered:
    """Upstream's answer ``data`` to our query (``query_id``, ``question``) checked and rebuilt without
    compression; A/AAAA records for which ``refused(address)`` holds are dropped, EDNS OPT records too."""
    if len(data) < 12:
        raise Malformed("short answer")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
    if qid != query_id or not flags & 0x8000 or qd != 1:
        raise Malformed("not our answer")
    name, pos = _read_name(data, 12)
    if pos + 4 > len(data) or (_wire_any(name).lower(), data[pos:pos + 4]) != (question[:-4].lower(), question[-4:]):
        raise Malformed("question differs")
    pos += 4
    sections: list[list[bytes]] = [[], [], []]
    stripped = 0
    for section, count in enumerate((an, ns, ar)):
        for _ in range(count):
            owner, pos = _read_name(data, pos)
            if pos + 10 > len(data):
                raise Malformed("record overrun")
            rtype, rclass, ttl, rdlen = struct.unpack_from("!2HIH", data, pos)
            pos += 10
            rdata = data[pos:pos + rdlen]
            if len(rdata) != rdlen:
                raise Malformed("rdata overrun")
            if rtype in _NAMED_RDATA:
                prefix, names, suffix = _NAMED_RDATA[rtype]
                out, at = rdata[:prefix], pos + prefix
                for _ in range(names):
                    target, at = _read_name(data, at)
                    out += _wire_any(target)
                out += data[at:at + suffix]
                if at + suffix != pos + rdlen:
                    raise Malformed("rdata length")
                rdata = out
            pos += rdlen
            if rtype == OPT:
                continue
            if rtype in (A, AAAA):
                if len(rdata) != (4 if rtype == A else 16):
                    raise Malformed("address length")
                if refused(ipaddress.ip_address(rdata)):
                    stripped += 1
                    continue
            sections[section].append(_wire_any(owner) + struct.pack("!2HIH", rtype, rclass, ttl, len(rdata)) + rdata)
    if pos != len(data):
        raise Malformed("trailing")
    counts = (len(sections[0]), len(sections[1]), len(sections[2]))
    return Filtered(flags & 0xF, flags & 0x0600, b"".join(b"".join(s) for s in sections), counts, stripped)


def build_query(qid: int, name: str, qtype: int, edns: bool = True) -> bytes:
    """A recursive query for ``name``/``qtype`` (class IN), with an EDNS OPT advertising :data:`EDNS_SIZE`."""
    opt = b"\0" + struct.pack("!2HIH", OPT, EDNS_SIZE, 0, 0) if edns else b""
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + _name_wire(name) + \
        struct.pack("!2H", qtype, CLASS_IN) + opt


async def ask_upstream(upstreams: Iterable[Address], name: str, qtype: int, question: bytes,
                       refused: Callable[[Address], bool], port: int = PORT) -> Filtered:
    """Ask each upstream in turn (UDP, fresh socket and ID, :data:`UPSTREAM_TIMEOUT` each) until one answers
    well; Malformed/TimeoutError/OSError from the last when none does."""
    loop = asyncio.get_running_loop()
    error: Exception = TimeoutError("no upstream resolver configured")
    for server in upstreams:
        qid = secrets.randbits(16)
        family = socket.AF_INET if server.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (str(server), port))
            await loop.sock_sendall(sock, build_query(qid, name, qtype))
            deadline = time.monotonic() + UPSTREAM_TIMEOUT
            while True:  # a connected UDP socket only hears from the server; skip stray datagrams
                data = await asyncio.wait_for(loop.sock_recv(sock, MAX_UPSTREAM + 1),
                                              max(0.01, deadline - time.monotonic()))
                if len(data) > MAX_UPSTREAM:
                    raise Malformed("oversized answer")
                with contextlib.suppress(Malformed):
                    return filter_answer(data, qid, question, refused)
        except (OSError, TimeoutError, Malformed) as exc:
            error = exc
        finally:
            sock.close()
    raise error


def addresses_in(answer: Filtered, qtype: int) -> list[Address]:
    """The addresses of ``answer``'s answer-section records of ``qtype`` (A or AAAA)."""
    return [addr for addr, _ttl in answer_addresses(answer) if (addr.version == 4) == (qtype == A)]


def answer_addresses(answer: Filtered) -> list[tuple[Address, int]]:
    """(address, TTL) of every A and AAAA record in ``answer``'s answer section (whatever its owner: a CNAME
    chain's addresses are the queried name's)."""
    out: list[tuple[Address, int]] = []
    pos, body = 0, answer.body
    for _ in range(answer.counts[0]):
        _owner, pos = _read_name(body, pos)
        rtype, _class, ttl, rdlen = struct.unpack_from("!2HIH", body, pos)
        pos += 10
        if rtype in (A, AAAA):
            out.append((ipaddress.ip_address(body[pos:pos + rdlen]), ttl))
        pos += rdlen
    return out


async def resolve(upstreams: Iterable[Address], name: str, refused: Callable[[Address], bool]) -> list[Address]:
    """``name``'s A and AAAA addresses from ``upstreams``, refused ones removed ([] when it does not resolve)."""
    out: list[Address] = []
    servers = list(upstreams)
    for qtype in (A, AAAA):
        question = _name_wire(name) + struct.pack("!2H", qtype, CLASS_IN)
        with contextlib.suppress(OSError, TimeoutError, Malformed):
            out += addresses_in(await ask_upstream(servers, name, qtype, question, refused), qtype)
    return out


# ---- the forwarder -----------------------------------------------------------------------------------------


@dataclass
class DnsForwarder(ServedTasks):
    """Serves the guest's DNS on a UDP and a listening TCP socket (both inside the VM's namespace) from the
    host's namespace. ``allowed(name)`` decides which names are forwarded (the others get NXDOMAIN); each answer
    forwarded for a name is reported to ``on_answer(name, [(address, ttl), ...])`` (the egress proxy's grants)."""

    upstreams: list[Address]
    allowed: Callable[[str], bool]
    refused: Callable[[Address], bool]
    log: Callable[[str], None]
    on_answer: Callable[[str, list[tuple[Address, int]]], None] | None = None
    on_refuse: Callable[[str], None] = lambda name: None  # a refused name (for the report, at once)
    upstream_port: int = PORT
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("queries", "forwarded", "answered", "refusedNames", "malformed", "dropped", "strippedRecords",
         "upstreamFailures", "truncated"), 0))
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _servers: list[Any] = field(default_factory=list)
    _inflight: int = 0
    _tokens: float = BURST
    _stamp: float = field(default_factory=time.monotonic)
    _logged: int = 0

    async def start(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        udp.setblocking(False)
        tcp.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._servers.append(transport)
        self._servers.append(await asyncio.start_server(self._tcp_client, sock=tcp))

    # admission
    def _admit(self, data: bytes) -> Query | None:
        """The query in ``data`` if it is well formed and within the rate, else None (counted)."""
        now = time.monotonic()
        self._tokens = min(BURST, self._tokens + (now - self._stamp) * RATE)
        self._stamp = now
        if self._tokens < 1:
            self.counters["dropped"] += 1
            return None
        self._tokens -= 1
        self.counters["queries"] += 1
        try:
            return parse_query(data)
        except Malformed:
            self.counters["malformed"] += 1
            return None

    async def answer(self, query: Query) -> bytes | None:
        """The reply to ``query`` (None: drop it, too many in flight)."""
        if not self.allowed(query.name):
            self.counters["refusedNames"] += 1
            self.on_refuse(query.name)
            if self._logged < MAX_LOG_LINES:
                self._logged += 1
                more = " (further refused names are only counted)" if self._logged == MAX_LOG_LINES else ""
                self.log(f"dns: NXDOMAIN for {safe_text(query.name, 120)} (type {query.qtype}): not on the "
                         f"allow-list{more}")
            return reply(query, NXDOMAIN)
        if self._inflight >= MAX_INFLIGHT:
            self.counters["dropped"] += 1
            return None
        self._inflight += 1
        self.counters["forwarded"] += 1
        try:
            got = await ask_upstream(self.upstreams, query.name, query.qtype, query.question, self.refused,
                                     self.upstream_port)
        except (OSError, TimeoutError, Malformed):
            self.counters["upstreamFailures"] += 1
            return reply(query, SERVFAIL)
        finally:
            self._inflight -= 1
        self.counters["answered"] += 1
        self.counters["strippedRecords"] += got.stripped
        if self.on_answer is not None and query.qtype in (A, AAAA):
            with contextlib.suppress(Malformed, struct.error, ValueError):
                self.on_answer(query.name, answer_addresses(got))
        return reply(query, got.rcode, got.body, got.counts, got.flags)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or sum(1 for t in self._tasks if t.get_name() == "dns-tcp") >= MAX_TCP_CLIENTS:
            self.counters["dropped"] += 1
            writer.close()
            return
        task.set_name("dns-tcp")
        self._tasks.add(task)
        try:
            for _ in range(MAX_TCP_QUERIES):
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                size = struct.unpack("!H", head)[0]
                if size > MAX_QUERY:
                    self.counters["malformed"] += 1
                    return
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                query = self._admit(data)
                if query is None:
                    return  # a connection that sent garbage is closed, without an answer
                out = await self.answer(query)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, fwd: DnsForwarder) -> None:
        self.fwd = fwd
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = self.fwd._admit(data)
        if query is not None:
            self.fwd.spawn(self._answer(query, addr))

    async def _answer(self, query: Query, addr: Any) -> None:
        out = await self.fwd.answer(query)
        if out is None or self.transport is None:
            return
        if self.transport.get_write_buffer_size() > MAX_UDP_BACKLOG:  # slirp is not reading: never pile up
            self.fwd.counters["dropped"] += 1
            return
        if len(out) > MAX_UDP_ANSWER:
            self.fwd.counters["truncated"] += 1
            out = reply(query, out[3] & 0xF, flags=0x0200)  # TC: ask again over TCP
        with contextlib.suppress(OSError):
            self.transport.sendto(out, addr)


def resolv_conf_servers(path: os.PathLike[str] | str) -> list[Address]:
    """The ``nameserver`` addresses of a resolv.conf (loopback ones included: the forwarder asks them from the
    host's namespace), unspecified ones left out."""
    out: list[Address] = []
    with contextlib.suppress(OSError):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh.read(65536).splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        addr = ipaddress.ip_address(parts[1].split("%")[0])
                        if not addr.is_unspecified and addr not in out:
                            out.append(addr)
    return out[:3]
