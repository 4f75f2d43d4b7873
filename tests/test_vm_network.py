"""Network policy with real VMs: what a workspace's guest can and cannot reach (issue 10, item 1; issue 16, item 4).

Traffic goes only to 127.0.0.1, to this host's own addresses, and to addresses inside a network namespace this
module creates. Its veth pair gives the host a private link 10.200.N.0/30 and a second, public-looking connected
subnet 45.P.Q.0/30 (a "host subnet": refused); the namespace also holds, each routed from the host by a /32 route
through the veth, a stand-in public address 45.S.T.U (outside every refused range), a benchmarking address in
198.18/15 and a documentation address in 192.0.2/24. Every one of these is checked to route into the veth before any
traffic. The namespace runs HTTP servers and a DNS server on 10.200.N.2:53 that stands in for "the host's
resolver" (named to the engine by $MICROAGENT_RESOLV_CONF) and records every query it gets.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jupyter_conftest_helpers import free_port
from standin_dns import DNS_RESPONDER
from microagent_engine import Engine
from microagent_engine.config import RESOLV_CONF_ENV
from microagent_engine.errors import InvalidArgument, MicroagentError
from microagent_engine.guest.initramfs import compile_static
from microagent_engine.hostinfo import require_tool
from microagent_engine.sandbox import dns
from microagent_engine.network_policy import AllowEntry, NetworkPolicy
from microagent_engine.sandbox.network import Refused, host_addresses, host_networks
from microagent_engine.spec import load_spec

pytestmark = pytest.mark.vm

PROBE_SOURCE = Path(__file__).resolve().parent / "dnsprobe.c"
PROBE = "/tmp/dnsprobe"



class _Token(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.token.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(host: str, port: int, token: str) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((host, port), _Token)
    server.token = token  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _host_get(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode()


@dataclass
class HostServices:
    port: int  # the same port on 127.0.0.1 and on each of the host's own IPv4 addresses
    other_port: int  # a second loopback-only service, never opted in
    addresses: list[str]  # the host's own non-loopback IPv4 addresses

    def token(self, host: str, port: int) -> str:
        return f"host-{host}-{port}"


@pytest.fixture(scope="module")
def host_services(peer_ns: PeerNamespace) -> Iterator[HostServices]:
    """A service only on the host's 127.0.0.1 (and one on each host address), as a Jupyter server would be."""
    port, other = free_port(), free_port()
    addrs = [str(n.network_address) for n in host_addresses() if n.version == 4 and not n.is_loopback]
    hs = HostServices(port, other, addrs)
    servers = [_serve("127.0.0.1", port, hs.token("127.0.0.1", port)),
               _serve("127.0.0.1", other, hs.token("127.0.0.1", other))]
    for addr in addrs:
        servers.append(_serve(addr, port, hs.token(addr, port)))
    for server in servers:  # the host itself reaches every one of them
        host, sport = server.server_address[:2]
        assert _host_get(str(host), int(sport)) == hs.token(str(host), int(sport))
    yield hs
    for server in servers:
        server.shutdown()
        server.server_close()


@dataclass
class PeerNamespace:
    name: str
    private: str  # 10.200.N.2: a private-range host, and the stand-in for the host's resolver (port 53)
    public: str  # 45.S.T.U: stands in for a public address (outside every refused range)
    host_subnet: str  # 45.P.Q.2: in a subnet of one of the host's interfaces
    bench: str  # 198.18.x.y
    doc: str  # 192.0.2.x
    port: int
    other_port: int
    queries: list[str] = field(default_factory=list)  # "NAME TYPE PROTO" per query the DNS server got

    def token(self, port: int) -> str:
        return f"peer-{self.name}-{port}"

    def asked(self, fragment: str) -> list[str]:
        return [q for q in list(self.queries) if fragment in q]


_PEER_SERVER = """
import http.server, json, socket, socketserver, struct, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.token.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
dns_addr, table = sys.argv[1], json.loads(sys.argv[2])
lock = threading.Lock()
def heard(name, qtype, proto):
    with lock:
        print("Q", name, qtype, proto, flush=True)
""" + DNS_RESPONDER + """
class T(socketserver.BaseRequestHandler):
    def handle(self):
        n = struct.unpack("!H", self.request.recv(2))[0]; q = b""
        while len(q) < n: q += self.request.recv(n - len(q))
        out = answer(q, "tcp"); self.request.sendall(struct.pack("!H", len(out)) + out)
tcp = socketserver.ThreadingTCPServer((dns_addr, 53), T)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp.serve_forever, daemon=True).start()
for port, token in zip(sys.argv[3::2], sys.argv[4::2]):
    s = http.server.ThreadingHTTPServer(("0.0.0.0", int(port)), H); s.token = token
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _distinct(make: Callable[[], str], avoid: Callable[[str], bool]) -> str:
    for _ in range(100):
        addr = make()
        if not avoid(addr):
            return addr
    raise AssertionError("no free test address")


@pytest.fixture(scope="module")
def peer_ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerNamespace]:
    """A network namespace of this module's own, reached from the host over a veth pair; HTTP servers and the
    stand-in resolver inside; $MICROAGENT_RESOLV_CONF names that resolver while the module runs."""
    require_tool("ip")
    tag = secrets.token_hex(3)
    r = secrets.randbelow
    n, p = r(250) + 1, r(250) + 1
    ns, host_if, ns_if = f"ma-test-{tag}", f"mth{tag}", f"mtn{tag}"
    taken = {str(a.network_address) for a in host_addresses()} | {
        str(g.network_address) for g in host_networks() if g.prefixlen in (32, 128)}
    private, host_subnet = f"10.200.{n}.2", f"45.{p}.{r(64) * 4}.2"
    public = _distinct(lambda: f"45.{p + 1}.{r(256)}.{r(250) + 2}", taken.__contains__)
    bench = f"198.{18 + r(2)}.{r(256)}.{r(250) + 2}"
    doc = _distinct(lambda: f"192.0.2.{r(150) + 100}", taken.__contains__)
    table = {"good.example": [public], "rebind.example": ["10.1.2.3", "127.0.0.1", public]}
    proc = None
    conf = tmp_path_factory.mktemp("resolv") / "resolv.conf"
    conf.write_text(f"nameserver {private}\n")
    saved_env = os.environ.get(RESOLV_CONF_ENV)
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"10.200.{n}.1/30", "dev", host_if)
        _ip("addr", "add", f"{host_subnet[:-1]}1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for cidr in (f"{private}/30", f"{host_subnet}/30", f"{public}/32", f"{bench}/32", f"{doc}/32"):
            _ip("-n", ns, "addr", "add", cidr, "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        for addr in (public, bench, doc):
            _ip("route", "add", f"{addr}/32", "via", private, "dev", host_if)
        for addr in (private, public, host_subnet, bench, doc):  # never send test traffic anywhere but in here
            route = _ip("-j", "route", "get", addr)
            assert json.loads(route)[0]["dev"] == host_if, route
        peer = PeerNamespace(ns, private, public, host_subnet, bench, doc, free_port(), free_port())
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _PEER_SERVER, private,
                                 json.dumps(table), str(peer.port), peer.token(peer.port), str(peer.other_port),
                                 peer.token(peer.other_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout and proc.stdout.readline() == b"ready\n"

        def record(stream=proc.stdout) -> None:
            for line in stream:
                peer.queries.append(line.decode().removeprefix("Q ").strip())
        threading.Thread(target=record, daemon=True).start()
        for addr in (private, public, host_subnet, bench, doc):  # the host itself reaches every one
            assert _host_get(addr, peer.port) == peer.token(peer.port)
        os.environ[RESOLV_CONF_ENV] = str(conf)  # the supervisors started from here on inherit it
        yield peer
    finally:
        if saved_env is None:
            os.environ.pop(RESOLV_CONF_ENV, None)
        else:
            os.environ[RESOLV_CONF_ENV] = saved_env
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _fetch(engine: Engine, name: str, host: str, port: int, host_header: str = "") -> str:
    """The body the guest gets from http://host:port/ ('' when it cannot connect), with a Host header when given.
    busybox nc: the image's static busybox wget crashes in getaddrinfo."""
    request = r'printf "GET / HTTP/1.0\r\n$2\r\n" | nc -w 5 "$0" "$1"'
    header = f"Host: {host_header}\\r\\n" if host_header else ""
    result = engine.exec(name, ["sh", "-c", request, host, str(port), header], timeout=60)
    return result.stdout.split(b"\r\n\r\n", 1)[-1].decode(errors="replace") if result.ok else ""


def _slirp_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "slirp4netns"], check=False, capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _host_ruleset() -> str:
    return subprocess.run([require_tool("nft"), "list", "ruleset"], check=False, capture_output=True, text=True).stdout


def _probe(engine: Engine, name: str, proto: str, addr: str, port: int, *payloads: bytes) -> str:
    """The guest's dnsprobe output: a reply as hex, or timeout/closed/error: ..."""
    argv = [PROBE, proto, addr, str(port), *(p.hex() for p in payloads)]
    return engine.exec(name, argv, timeout=60).stdout.decode(errors="replace").strip()


def _install_probe(engine: Engine, name: str) -> None:
    binary = compile_static(engine.state_dir, PROBE_SOURCE.read_bytes(), "dnsprobe").read_bytes()
    r = engine.exec(name, ["sh", "-c", 'cat > "$1" && chmod 755 "$1"', "sh", PROBE], stdin=binary)
    assert r.exit_code == 0, r.stderr


def _query(qid: int, name: str, qtype: int = dns.A) -> bytes:
    return dns.build_query(qid, name, qtype, edns=False)


def _answer(out: str, qid: int, name: str, qtype: int = dns.A) -> tuple[int, list[str]]:
    """(rcode, addresses) of the guest's reply ``out`` (hex) to our query ``qid`` for ``name``."""
    assert out and not out.startswith(("timeout", "closed", "error")), out
    data = bytes.fromhex(out)
    question = _query(qid, name, qtype)[12:]
    got = dns.filter_answer(data, qid, question, lambda a: False)
    return got.rcode, [str(a) for a in dns.addresses_in(got, qtype)]


@dataclass
class Running:
    name: str
    ruleset_before: str
    slirp_before: set[int]


def _boot(engine: Engine, name: str, network: object = None) -> Running:
    ruleset_before, slirp_before = _host_ruleset(), _slirp_pids()
    engine.create(name, profile="tiny", network=network)
    engine.start(name)
    _install_probe(engine, name)
    return Running(name, ruleset_before, slirp_before)


@pytest.fixture(scope="module")
def default_vm(engine: Engine, peer_ns: PeerNamespace, host_services: HostServices) -> Iterator[Running]:
    """One workspace with the default policy (public internet only), shared by the tests that only probe it."""
    vm = _boot(engine, "net-default")
    yield vm
    engine.kill(vm.name)
    assert _slirp_pids() - vm.slirp_before == set()  # nothing left behind
    assert _host_ruleset() == vm.ruleset_before  # the host's nftables ruleset was never touched
    engine.delete(vm.name)


@pytest.fixture(scope="module")
def allow_vm(engine: Engine, peer_ns: PeerNamespace, host_services: HostServices) -> Iterator[Running]:
    """One workspace with an allow-list (an address, a host name) and an opted-in host port."""
    policy = NetworkPolicy.parse({"mode": "user", "allow": [f"{peer_ns.public}:{peer_ns.port}",
                                                            f"good.example:{peer_ns.other_port}"],
                                  "hostPorts": [host_services.port]})
    vm = _boot(engine, "net-allow", policy)
    yield vm
    try:
        engine.kill(vm.name)
    finally:
        engine.delete(vm.name)


def test_default_workspace_reaches_public_only(engine: Engine, host_services: HostServices,
                                               peer_ns: PeerNamespace, default_vm: Running) -> None:
    name, hs = default_vm.name, host_services
    info = engine.status(name)
    assert info.to_json()["networkPolicy"] == {"mode": "user", "allow": [], "hostPorts": []}
    # the uplink works: a (stand-in) public address answers, so every refusal below is the policy's
    assert _fetch(engine, name, peer_ns.public, peer_ns.port) == peer_ns.token(peer_ns.port)
    assert _fetch(engine, name, "10.0.2.2", hs.port) == ""  # QEMU's alias for host loopback
    assert _fetch(engine, name, "10.0.2.2", hs.other_port) == ""
    for addr in hs.addresses:  # the host's own addresses
        assert _fetch(engine, name, addr, hs.port) == ""
    assert _fetch(engine, name, peer_ns.private, peer_ns.port) == ""  # a private-range host
    assert _fetch(engine, name, "169.254.169.254", 80) == ""  # metadata (rejected inside the namespace)
    assert len(_slirp_pids() - default_vm.slirp_before) == 1  # one uplink process per running workspace
    assert _host_ruleset() == default_vm.ruleset_before
    facts = json.loads((info.dir.run_dir / "network.json").read_text())
    assert facts["dnsServers"] == [peer_ns.private] and facts["dns"]["guestServer"] == dns.GUEST_DNS
    dns_rules = [line.strip() for line in facts["ruleset"].splitlines() if "dport 53" in line]
    assert dns_rules and all(r.startswith('oifname "lo" ip daddr 127.0.0.1 ') for r in dns_rules)  # the forwarder


def test_special_ranges_and_host_subnets_refused(engine: Engine, peer_ns: PeerNamespace,
                                                 default_vm: Running) -> None:
    """198.18/15, 192.0.2/24 and an address in a subnet of the host's own interface, each served inside the test's
    namespace (the host reaches all of them), are refused to the guest; the stand-in public address is not."""
    name = default_vm.name
    assert _fetch(engine, name, peer_ns.public, peer_ns.port) == peer_ns.token(peer_ns.port)
    for addr in (peer_ns.bench, peer_ns.doc, peer_ns.host_subnet):
        assert _fetch(engine, name, addr, peer_ns.port) == "", addr


def test_host_networks_hold_subnets_and_gateways(peer_ns: PeerNamespace) -> None:
    """Read from the host's namespace, no traffic: its connected subnets, its gateways and its addresses."""
    nets = host_networks()
    refused = Refused(nets)
    for addr in (peer_ns.host_subnet, peer_ns.private, peer_ns.bench, peer_ns.doc, "192.0.0.8", "240.1.2.3",
                 "2001:db8::1", "64:ff9b:1::1", "100::1", "2001:2::1"):
        assert refused(ipaddress.ip_address(addr)), addr
    assert not refused(ipaddress.ip_address(peer_ns.public))
    gateways = [json.loads(_ip("-j", "route", "get", addr))[0].get("gateway") for addr in (peer_ns.public,)]
    assert all(ipaddress.ip_network(g) in nets for g in gateways if g)  # the route's gateway itself
    host_if_net = ipaddress.ip_network(f"{peer_ns.host_subnet}/30", strict=False)
    assert host_if_net in nets  # the whole subnet, not only the host's /32


def test_guest_never_reaches_a_resolver_directly(engine: Engine, peer_ns: PeerNamespace,
                                                  default_vm: Running) -> None:
    """(a) UDP and TCP to the host's resolver fail from the guest; the same query through 10.0.2.3 is answered
    (by the forwarder, which asked that resolver), and the resolver only ever heard the forwarder."""
    name = default_vm.name
    assert _probe(engine, name, "tcp", peer_ns.private, 53, _query(1, "direct-tcp.example")).startswith("error")
    out = _probe(engine, name, "udp", peer_ns.private, 53, _query(2, "direct-udp.example"))
    assert out.startswith(("timeout", "error")), out
    rcode, addrs = _answer(_probe(engine, name, "udp", dns.GUEST_DNS, 53, _query(3, "good.example")), 3,
                           "good.example")
    assert (rcode, addrs) == (dns.NOERROR, [peer_ns.public])
    assert peer_ns.asked("good.example 1 udp")  # the rendezvous: the resolver has heard from the forwarder
    assert peer_ns.asked("direct") == []


def test_answers_into_refused_ranges_are_stripped(engine: Engine, peer_ns: PeerNamespace,
                                                  default_vm: Running) -> None:
    """(f) DNS rebinding: the resolver answers 10.1.2.3, 127.0.0.1 and a public address; the guest gets only the
    public one, over UDP and TCP."""
    for proto, qid in (("udp", 11), ("tcp", 12)):
        out = _probe(engine, default_vm.name, proto, dns.GUEST_DNS, 53, _query(qid, "rebind.example"))
        assert _answer(out, qid, "rebind.example") == (dns.NOERROR, [peer_ns.public]), proto


def test_malformed_queries_are_dropped(engine: Engine, peer_ns: PeerNamespace, default_vm: Running) -> None:
    """(d) Malformed and oversize queries get no answer and never reach the resolver: on one UDP socket they go
    first, a good query last, and the first answer the guest gets is the good one's."""
    good = _query(0x7777, "good.example")
    two_questions = bytearray(_query(0x101, "m-two.example") + _query(0, "m-two2.example")[12:])
    two_questions[5] = 2
    chaos = _query(0x102, "m-chaos.example")[:-2] + b"\x00\x03"  # QCLASS CH
    response = bytearray(_query(0x103, "m-resp.example"))
    response[2] |= 0x80  # QR: an answer, not a query
    bad_label = _query(0x104, "m-bad.example").replace(b"m-bad", b"m/bad")
    oversize = _query(0x105, "m-big.example") + b"\0" * 600
    bad_type = _query(0x106, "m-type.example", 255)  # ANY
    long_name = _query(0x107, ".".join(["m-long" + "x" * 57] * 4) + ".example")  # > 253 characters
    out = _probe(engine, default_vm.name, "udp", dns.GUEST_DNS, 53, bytes(two_questions), chaos, bytes(response),
                 bad_label, oversize, bad_type, long_name, b"\xff" * 40, good)
    assert _answer(out, 0x7777, "good.example") == (dns.NOERROR, [peer_ns.public])
    assert _probe(engine, default_vm.name, "tcp", dns.GUEST_DNS, 53, chaos) == "closed"
    assert peer_ns.asked("m-") == []


def test_allow_list_answers_only_its_names(engine: Engine, peer_ns: PeerNamespace, allow_vm: Running) -> None:
    """(b) Under an allow-list the guest's DNS answers names on it and NXDOMAIN for the rest, logged."""
    name = allow_vm.name
    for proto, qid in (("udp", 21), ("tcp", 22)):
        out = _probe(engine, name, proto, dns.GUEST_DNS, 53, _query(qid, "good.example"))
        assert _answer(out, qid, "good.example") == (dns.NOERROR, [peer_ns.public])
        out = _probe(engine, name, proto, dns.GUEST_DNS, 53, _query(qid, "not-listed.example"))
        assert _answer(out, qid, "not-listed.example") == (dns.NXDOMAIN, [])
    assert peer_ns.asked("not-listed") == []
    log = (engine.status(name).dir.run_dir / "network.log").read_text()
    assert "NXDOMAIN for not-listed.example" in log
    # the allowed name reaches the address its DNS answer gave, on its port, by name (Host) only: through the
    # egress proxy, which refuses the same address asked for without a name
    token = peer_ns.token(peer_ns.other_port)
    assert _fetch(engine, name, peer_ns.public, peer_ns.other_port, "good.example") == token
    assert _fetch(engine, name, peer_ns.public, peer_ns.other_port) == ""
    assert _fetch(engine, name, peer_ns.public, peer_ns.other_port, "bad.example") == ""


def test_dns_tunnel_never_leaves_the_host(engine: Engine, peer_ns: PeerNamespace, allow_vm: Running) -> None:
    """(c) Many long random labels under a name not on the list: every one gets NXDOMAIN from the host side and
    none reaches the resolver (the last query, an allowed one, is the rendezvous: the resolver has heard it)."""
    def label() -> str:
        return secrets.token_hex(31)
    tunnel = [f"{label()}.{label()}.{label()}.t.exfil.example" for _ in range(24)]
    out = _probe(engine, allow_vm.name, "udp", dns.GUEST_DNS, 53,
                 *(_query(0x200 + i, t, dns.TXT) for i, t in enumerate(tunnel)))
    assert _answer(out, 0x200, tunnel[0], dns.TXT)[0] == dns.NXDOMAIN
    out = _probe(engine, allow_vm.name, "tcp", dns.GUEST_DNS, 53, _query(0x300, tunnel[1]))
    assert _answer(out, 0x300, tunnel[1])[0] == dns.NXDOMAIN
    before = len(peer_ns.asked("good.example 1"))
    out = _probe(engine, allow_vm.name, "udp", dns.GUEST_DNS, 53, *(_query(0x400 + i, t) for i, t in
                                                                     enumerate(tunnel[2:])), _query(0x4ff,
                                                                                                    "good.example"))
    _wait_for(lambda: len(peer_ns.asked("good.example 1")) > before, "the allowed query to reach the resolver")
    assert peer_ns.asked("exfil") == []


def test_host_port_opt_in_allow_list_and_quarantine(engine: Engine, host_services: HostServices,
                                                    peer_ns: PeerNamespace, allow_vm: Running) -> None:
    hs, name = host_services, allow_vm.name
    assert engine.status(name).to_json()["networkPolicy"]["hostPorts"] == [hs.port]
    assert _fetch(engine, name, "10.0.2.2", hs.port) == hs.token("127.0.0.1", hs.port)  # opted in
    assert _fetch(engine, name, "10.0.2.2", hs.other_port) == ""  # nothing else on the host's loopback
    assert _fetch(engine, name, peer_ns.public, peer_ns.port) == peer_ns.token(peer_ns.port)  # allowed
    assert _fetch(engine, name, peer_ns.host_subnet, peer_ns.port) == ""  # not on the list
    assert _fetch(engine, name, peer_ns.private, peer_ns.port) == ""
    engine.quarantine(name)
    assert _fetch(engine, name, "10.0.2.2", hs.port) == ""
    assert _fetch(engine, name, peer_ns.public, peer_ns.port) == ""
    assert _probe(engine, name, "tcp", dns.GUEST_DNS, 53, _query(0x500, "good.example")).startswith(
        ("error", "closed", "timeout"))


def test_isolated_has_no_nic(engine: Engine) -> None:
    name = "net-isolated"
    engine.create(name, profile="tiny", network="isolated")
    try:
        engine.start(name)
        assert engine.status(name).to_json()["networkPolicy"]["mode"] == "isolated"
        result = engine.exec(name, ["ls", "/sys/class/net"])
        assert result.ok and result.stdout.split() == [b"lo"]
    finally:
        engine.kill(name)
    engine.delete(name)


def test_policy_validation() -> None:
    assert str(AllowEntry.parse("45.33.32.7:443")) == "45.33.32.7/32:443"
    assert str(AllowEntry.parse("[2a00:1450::/32]:443")) == "[2a00:1450::/32]:443"
    assert AllowEntry.parse("PyPI.org:443") == AllowEntry("pypi.org", 443)
    for bad, why in (("10.1.2.3", "never reachable"), ("127.0.0.1:80", "--allow-host-port"),
                     ("169.254.169.254", "never reachable"), ("fd00::1", "never reachable"),
                     ("example.com:0", "port number"), ("a b", "neither"), ("1.2.3.4:99999", "port number"),
                     ("198.18.0.0/15", "never reachable"), ("192.0.2.1", "never reachable"),
                     ("203.0.113.0/24:443", "never reachable"), ("[2001:db8::1]:80", "never reachable"),
                     ("64:ff9b:1::/48", "never reachable")):
        with pytest.raises(InvalidArgument, match=why):
            AllowEntry.parse(bad)
    with pytest.raises(InvalidArgument, match="guest's DNS"):
        NetworkPolicy.parse({"hostPorts": [53]})
    with pytest.raises(InvalidArgument, match="isolated has no network device"):
        NetworkPolicy.parse({"mode": "isolated", "hostPorts": [8888]})
    with pytest.raises(InvalidArgument, match="unknown field"):
        NetworkPolicy.parse({"mode": "user", "ports": [1]})
    with pytest.raises(InvalidArgument, match="unknown network mode"):
        NetworkPolicy.parse("bridge")
    p = NetworkPolicy.parse({"allow": ["0.0.0.0/0"], "hostPorts": ["8888"]})
    assert p.to_json() == {"mode": "user", "allow": ["0.0.0.0/0"], "hostPorts": [8888]}
    assert NetworkPolicy.from_json(p.to_json()) == p
    assert NetworkPolicy.parse("none").mode == "isolated"


def test_dns_messages_are_checked_and_bounded() -> None:
    """No VM: the parser's rules, a compression loop from upstream, and a flood against a resolver that never
    answers (real sockets on 127.0.0.1): queries in flight stay bounded, the rest is dropped and counted."""
    assert dns.parse_query(_query(1, "Pypi.ORG.")).name == "pypi.org"
    for bad in (b"", b"\0" * 11, _query(1, "x" * 64 + ".example"), _query(1, "a.example") + b"\0",
                _query(1, "a.example", 255), _query(1, "a.example")[:-1]):
        with pytest.raises(dns.Malformed):
            dns.parse_query(bad)
    q = _query(9, "loop.example")
    loop = struct.pack("!6H", 9, 0x8180, 1, 1, 0, 0) + q[12:] + b"\xc0\x1e\xc0\x1e" + b"\0" * 10
    with pytest.raises(dns.Malformed):
        dns.filter_answer(loop, 9, q[12:], lambda a: False)

    async def flood() -> dict[str, int]:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))  # a resolver that never answers: every forwarded query stays in flight
        fwd = dns.DnsForwarder([ipaddress.ip_address("127.0.0.1")], lambda name: True, lambda a: False, lambda line: None,
                               upstream_port=silent.getsockname()[1])
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        await fwd.start(udp, tcp)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as guest:
            for i in range(300):
                guest.sendto(_query(i, f"n{i}.example"), udp.getsockname())
                for _ in range(100000):  # until the forwarder has decided on it (a bound against hangs only)
                    if fwd.counters["forwarded"] + fwd.counters["dropped"] > i:
                        break
                    await asyncio.sleep(0)
        counters = dict(fwd.counters)
        await fwd.close()
        silent.close()
        tcp.close()
        return counters

    counters = asyncio.run(flood())
    assert counters["forwarded"] == dns.MAX_INFLIGHT
    assert counters["dropped"] == 300 - dns.MAX_INFLIGHT  # by the rate bound or the in-flight bound


def test_cli_and_spec_surfaces(cli, tmp_path: Path) -> None:
    spec = tmp_path / "microagent.yaml"
    spec.write_text("name: net-spec\nprofile: tiny\nnetwork: {mode: user, allow: ['45.33.32.0/24:443'], "
                    "hostPorts: [8888]}\n")
    proc = cli("--json", "create", "-f", str(spec), "--allow-host-port", "9999")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # flags merge key by key over the spec's block: hostPorts replaced, allow kept
    assert out["networkPolicy"] == {"mode": "user", "allow": ["45.33.32.0/24:443"], "hostPorts": [9999]}
    status = cli("status", "net-spec")
    assert "Network: user (allow-list only: 45.33.32.0/24:443; host ports 9999 at 10.0.2.2)" in status.stdout.decode()
    assert cli("delete", "net-spec", "--yes").returncode == 0
    bad = cli("create", "net-bad", "--allow", "192.168.1.0/24")
    assert bad.returncode == 2 and b"never reachable" in bad.stderr and b"Traceback" not in bad.stderr
    spec.write_text("network: isolated\n")  # the string form stays valid
    assert load_spec(spec).workspace_spec().network.to_json() == {"mode": "isolated", "allow": [], "hostPorts": []}
    spec.write_text("name: net-bad2\nnetwork: {mode: isolated, hostPorts: [1]}\n")
    bad = cli("create", "-f", str(spec))
    assert bad.returncode == 2 and b"network" in bad.stderr and b"Traceback" not in bad.stderr


def _wait_for(predicate: Callable[[], bool], what: str, limit: float = 120) -> None:
    """Poll until ``predicate()`` holds (a generous bound against hangs, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_restart_rebuilds_network_and_nothing_outlives_the_supervisor(engine: Engine,
                                                                      host_services: HostServices) -> None:
    hs = host_services
    name = "net-restart"
    slirp_before = _slirp_pids()
    engine.create(name, profile="tiny", restart="on-failure", network={"hostPorts": [hs.port]})
    try:
        first = engine.start(name).state
        assert first.vm_pid
        assert _fetch(engine, name, "10.0.2.2", hs.port) == hs.token("127.0.0.1", hs.port)
        uplinks = _slirp_pids() - slirp_before
        assert len(uplinks) == 1
        os.kill(first.vm_pid, signal.SIGKILL)  # a crash: the supervisor restarts the VM with a fresh namespace

        def restarted() -> bool:
            st = engine.status(name).state
            return st.restart_count == 1 and st.state == "running" and st.vm_pid != first.vm_pid
        _wait_for(restarted, "the restart")
        assert _fetch(engine, name, "10.0.2.2", hs.port) == hs.token("127.0.0.1", hs.port)
        assert _fetch(engine, name, "10.0.2.2", hs.other_port) == ""
        now = _slirp_pids() - slirp_before
        assert len(now) == 1 and not now & uplinks  # the old uplink went with the old VM
        supervisor = engine.status(name).state.supervisor_pid
        assert supervisor
        os.kill(supervisor, signal.SIGKILL)  # even a killed supervisor leaves no uplink behind
        _wait_for(lambda: not (_slirp_pids() - slirp_before), "slirp4netns to exit")
    finally:
        try:
            engine.kill(name)
        except MicroagentError:
            pass  # the supervisor was killed on purpose
    engine.delete(name)
