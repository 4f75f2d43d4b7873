"""Network policy with real VMs: what a default workspace's guest can and cannot reach (issue 10, item 1).

Traffic goes only to 127.0.0.1, to this host's own addresses, and to addresses inside a network namespace this
module creates (a veth pair with a private 10.200.N.0/30 and a documentation-range 198.51.100.M/30 that stands in
for "the public internet"; its route is checked to point at the veth before any traffic). Nothing leaves the
machine; no DNS lookups.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, MicroagentError
from microagent_engine.hostinfo import require_tool
from microagent_engine.sandbox.network import AllowEntry, NetworkPolicy, host_addresses
from microagent_engine.spec import load_spec

pytestmark = pytest.mark.vm


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


@pytest.fixture
def host_services() -> Iterator[HostServices]:
    """A service only on the host's 127.0.0.1 (and one on each host address), as a Jupyter server would be."""
    port, other = _free_port(), _free_port()
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
    private: str  # 10.200.N.2: a private-range host
    public: str  # 198.51.100.M: stands in for a public address
    port: int
    other_port: int

    def token(self, port: int) -> str:
        return f"peer-{self.name}-{port}"


_PEER_SERVER = """
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.token.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
servers = []
for port, token in zip(sys.argv[1::2], sys.argv[2::2]):
    s = http.server.ThreadingHTTPServer(("0.0.0.0", int(port)), H); s.token = token
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def peer_ns() -> Iterator[PeerNamespace]:
    """A network namespace of this test's own, reached from the host over a veth pair; HTTP servers inside."""
    require_tool("ip")
    tag = secrets.token_hex(3)
    n, m = secrets.randbelow(250) + 1, secrets.randbelow(60) * 4
    ns, host_if, ns_if = f"ma-test-{tag}", f"mth{tag}", f"mtn{tag}"
    private, public = f"10.200.{n}.2", f"198.51.100.{m + 2}"
    proc = None
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"10.200.{n}.1/30", "dev", host_if)
        _ip("addr", "add", f"198.51.100.{m + 1}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for cidr in (f"{private}/30", f"{public}/30"):
            _ip("-n", ns, "addr", "add", cidr, "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        for addr in (private, public):  # never send test traffic anywhere but into this namespace
            route = _ip("-j", "route", "get", addr)
            assert json.loads(route)[0]["dev"] == host_if, route
        peer = PeerNamespace(ns, private, public, _free_port(), _free_port())
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _PEER_SERVER,
                                 str(peer.port), peer.token(peer.port), str(peer.other_port),
                                 peer.token(peer.other_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout and proc.stdout.readline() == b"ready\n"
        for addr in (private, public):  # the host itself reaches both
            assert _host_get(addr, peer.port) == peer.token(peer.port)
        yield peer
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _fetch(engine: Engine, name: str, host: str, port: int) -> str:
    """The body the guest gets from http://host:port/ ('' when it cannot connect). busybox nc: the image's
    static busybox wget crashes in getaddrinfo."""
    request = r'printf "GET / HTTP/1.0\r\n\r\n" | nc -w 5 "$0" "$1"'
    result = engine.exec(name, ["sh", "-c", request, host, str(port)], timeout=60)
    return result.stdout.split(b"\r\n\r\n", 1)[-1].decode(errors="replace") if result.ok else ""


def _slirp_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "slirp4netns"], check=False, capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _host_ruleset() -> str:
    return subprocess.run([require_tool("nft"), "list", "ruleset"], check=False, capture_output=True, text=True).stdout


def test_default_workspace_reaches_public_only(engine: Engine, host_services: HostServices,
                                               peer_ns: PeerNamespace) -> None:
    ruleset_before, slirp_before = _host_ruleset(), _slirp_pids()
    name = "net-default"
    engine.create(name, profile="tiny")
    try:
        info = engine.start(name)
        assert info.to_json()["networkPolicy"] == {"mode": "user", "allow": [], "hostPorts": []}
        hs = host_services
        # the uplink works: a (stand-in) public address answers, so every refusal below is the policy's
        assert _fetch(engine, name, peer_ns.public, peer_ns.port) == peer_ns.token(peer_ns.port)
        assert _fetch(engine, name, "10.0.2.2", hs.port) == ""  # QEMU's alias for host loopback
        assert _fetch(engine, name, "10.0.2.2", hs.other_port) == ""
        for addr in hs.addresses:  # the host's own addresses
            assert _fetch(engine, name, addr, hs.port) == ""
        assert _fetch(engine, name, peer_ns.private, peer_ns.port) == ""  # a private-range host
        assert _fetch(engine, name, "169.254.169.254", 80) == ""  # metadata (rejected inside the namespace)
        assert len(_slirp_pids() - slirp_before) == 1  # one uplink process per running workspace
    finally:
        engine.kill(name)
    assert _slirp_pids() - slirp_before == set()  # nothing left behind
    assert _host_ruleset() == ruleset_before  # the host's nftables ruleset was never touched
    engine.delete(name)


def test_host_port_opt_in_allow_list_and_quarantine(engine: Engine, host_services: HostServices,
                                                    peer_ns: PeerNamespace) -> None:
    hs = host_services
    name = "net-optin"
    policy = NetworkPolicy.parse({"mode": "user", "allow": [f"{peer_ns.public}:{peer_ns.port}"],
                                  "hostPorts": [hs.port]})
    engine.create(name, profile="tiny", network=policy)
    try:
        info = engine.start(name)
        assert info.to_json()["networkPolicy"] == policy.to_json()
        assert _fetch(engine, name, "10.0.2.2", hs.port) == hs.token("127.0.0.1", hs.port)  # opted in
        assert _fetch(engine, name, "10.0.2.2", hs.other_port) == ""  # nothing else on the host's loopback
        assert _fetch(engine, name, peer_ns.public, peer_ns.port) == peer_ns.token(peer_ns.port)  # allowed
        assert _fetch(engine, name, peer_ns.public, peer_ns.other_port) == ""  # narrowed by the allow-list
        assert _fetch(engine, name, peer_ns.private, peer_ns.port) == ""
        engine.quarantine(name)
        assert _fetch(engine, name, "10.0.2.2", hs.port) == ""
        assert _fetch(engine, name, peer_ns.public, peer_ns.port) == ""
    finally:
        engine.kill(name)
    engine.delete(name)


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
    assert str(AllowEntry.parse("203.0.113.7:443")) == "203.0.113.7/32:443"
    assert str(AllowEntry.parse("[2001:db8::/32]:443")) == "[2001:db8::/32]:443"
    assert AllowEntry.parse("PyPI.org:443") == AllowEntry("pypi.org", 443)
    for bad, why in (("10.1.2.3", "never reachable"), ("127.0.0.1:80", "--allow-host-port"),
                     ("169.254.169.254", "never reachable"), ("fd00::1", "never reachable"),
                     ("example.com:0", "port number"), ("a b", "neither"), ("1.2.3.4:99999", "port number")):
        with pytest.raises(InvalidArgument, match=why):
            AllowEntry.parse(bad)
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


def test_cli_and_spec_surfaces(cli, tmp_path: Path) -> None:
    spec = tmp_path / "microagent.yaml"
    spec.write_text("name: net-spec\nprofile: tiny\nnetwork: {mode: user, allow: ['203.0.113.0/24:443'], "
                    "hostPorts: [8888]}\n")
    proc = cli("--json", "create", "-f", str(spec), "--allow-host-port", "9999")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # flags merge key by key over the spec's block: hostPorts replaced, allow kept
    assert out["networkPolicy"] == {"mode": "user", "allow": ["203.0.113.0/24:443"], "hostPorts": [9999]}
    status = cli("status", "net-spec")
    assert "Network: user (allow-list only: 203.0.113.0/24:443; host ports 9999 at 10.0.2.2)" in status.stdout.decode()
    assert cli("delete", "net-spec", "--yes").returncode == 0
    bad = cli("create", "net-bad", "--allow", "192.168.1.0/24")
    assert bad.returncode == 2 and b"never reachable" in bad.stderr and b"Traceback" not in bad.stderr
    spec.write_text("network: isolated\n")  # the string form stays valid
    assert load_spec(spec).to_create_kwargs()["network"] == {"mode": "isolated", "allow": [], "hostPorts": []}
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
