"""A workspace's network policy and its enforcement on the host.

Design (issue 10, item 1). QEMU's ``-netdev user`` (libslirp) maps the guest's gateway 10.0.2.2 to the host's
127.0.0.1 and connects to any destination from the host's network namespace, so by itself it reaches host-loopback
services and private networks. Here QEMU runs inside a network namespace of its own:

- QEMU's "host loopback" is then that namespace's loopback, which holds nothing but the listeners of the host ports
  the user opted in to; the supervisor relays each connection to the same port on the host's 127.0.0.1. So the
  guest reaches exactly ``10.0.2.2:PORT`` for each opted-in port and nothing else on the host's loopback.
- The namespace's only uplink is ``slirp4netns --disable-host-loopback`` (a user-mode TCP/IP stack in the host's
  namespace: no bridge, no veth, no host firewall change, works unprivileged through a user namespace).
- nftables rules *inside the namespace* (the host's own ruleset is never touched) reject every special-purpose
  range of IANA's registries that is not globally reachable (loopback, private, CGNAT, ULA, link-local/metadata,
  documentation, benchmarking, reserved, multicast, ...), every subnet of the host's interfaces, its gateways and
  its own addresses, then either accept the rest (public internet) or only the allow-list. An allow-list narrows;
  it never opens a blocked range. Resolvers are no exception: the guest's DNS is answered by the supervisor's
  forwarder (``dns.py``) on the namespace's 127.0.0.1:53, which QEMU's slirp sends the guest's 10.0.2.3 to.

One process per workspace beyond QEMU: slirp4netns, killed at the end of each boot (it also exits by itself when its
exit pipe closes: the supervisor died).
The namespace is held by file descriptors in the supervisor, not by a bind mount or a holder process, so nothing
outlives the supervisor. Alternatives considered: QEMU ``restrict=on`` (drops all egress), passt ``--no-map-gw``
(no allow-list, no port opt-in), a host-side transparent proxy (needs host firewall changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import RESOLV_CONF_ENV
from ..errors import HostError
from ..network_policy import _BLOCKED, IPNetwork, NetworkPolicy
from ..hostinfo import require_tool
from ..records import EGRESS_REPORT
from ..secret import Secret
from . import dns, egress
from .egress_tls import LeafCerts


UPLINK_CIDR = "10.0.3.0/24"  # slirp4netns's network inside the namespace (distinct from QEMU's 10.0.2.0/24)
MAX_RELAYS_PER_PORT = 64
READY_TIMEOUT = 10.0

INSTALL = "apt-get install -y --no-install-recommends slirp4netns nftables (or 'make apt')"


# ---- facts about the host ----------------------------------------------------------------------------------


def host_addresses() -> list[IPNetwork]:
    """Every address of this host's network namespace (from /proc/net/fib_trie and /proc/net/if_inet6)."""
    found: set[IPNetwork] = set()
    with contextlib.suppress(OSError):
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif text.startswith("/32 host LOCAL") and last:
                found.add(ipaddress.ip_network(last))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            found.add(ipaddress.ip_network(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    return sorted(found, key=lambda n: (n.version, n))


def _proc_lines(path: str) -> list[list[str]]:
    with contextlib.suppress(OSError):
        return [line.split() for line in Path(path).read_text().splitlines()]
    return []


def host_networks() -> list[IPNetwork]:
    """Every subnet of this host's interfaces (connected routes and address prefixes, IPv4 and IPv6) and every
    gateway of its routes, read from the host's namespace (/proc/net/route, ipv6_route, if_inet6). Routes through
    a gateway and very short prefixes (VPN-style 0/1 + 128/1 splits) are not "the host's LAN" and are left out."""
    found: set[IPNetwork] = set()
    for row in _proc_lines("/proc/net/route")[1:]:
        if len(row) < 8:
            continue
        with contextlib.suppress(ValueError):
            dest, gateway, mask = (ipaddress.IPv4Address(int(x, 16).to_bytes(4, "little")) for x in
                                   (row[1], row[2], row[7]))
            if int(gateway):
                found.add(ipaddress.ip_network(gateway))
            else:
                net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
                if net.prefixlen >= 8:
                    found.add(net)
    for row in _proc_lines("/proc/net/ipv6_route"):
        if len(row) < 5:
            continue
        with contextlib.suppress(ValueError):
            dest, plen, hop = ipaddress.IPv6Address(bytes.fromhex(row[0])), int(row[1], 16), \
                ipaddress.IPv6Address(bytes.fromhex(row[4]))
            if int(hop):
                found.add(ipaddress.ip_network(hop))
            elif plen >= 16:
                found.add(ipaddress.IPv6Network(f"{dest}/{plen}", strict=False))
    for row in _proc_lines("/proc/net/if_inet6"):
        with contextlib.suppress(ValueError, IndexError):
            found.add(ipaddress.IPv6Network(f"{ipaddress.IPv6Address(bytes.fromhex(row[0]))}/{int(row[2], 16)}",
                                            strict=False))
    found.update(host_addresses())
    return sorted(found, key=lambda n: (n.version, n))


def host_resolvers() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The resolvers the guest's DNS is forwarded to: the ``nameserver`` lines of $MICROAGENT_RESOLV_CONF or
    /etc/resolv.conf (loopback ones too: the forwarder asks them from the host's namespace)."""
    return dns.resolv_conf_servers(os.environ.get(RESOLV_CONF_ENV) or "/etc/resolv.conf")


class Refused:
    """The destinations no workspace reaches: :data:`BLOCKED_V4`/:data:`BLOCKED_V6` and the host's own networks
    (:func:`host_networks`), collapsed; callable on an address (the DNS forwarder strips answers with it)."""

    def __init__(self, host_nets: Iterable[IPNetwork]) -> None:
        nets = list(_BLOCKED) + list(host_nets)
        self.v4 = list(ipaddress.collapse_addresses(n for n in nets if n.version == 4))
        self.v6 = list(ipaddress.collapse_addresses(n for n in nets if n.version == 6))

    def __call__(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(addr in n for n in (self.v4 if addr.version == 4 else self.v6))


def cidr_rules(policy: NetworkPolicy) -> list[tuple[IPNetwork, int | None]]:
    """The allow-list's CIDR entries as (network, port) pairs: opened by address in the namespace's rules. Name
    entries never become address rules: the egress proxy enforces them by name (egress.py)."""
    return [(e.network, e.port) for e in policy.allow if e.network is not None]


def _elements(nets: Iterable[Any]) -> str:
    return "{ " + ", ".join(str(n) for n in nets) + " }"


def render_ruleset(policy: NetworkPolicy, allow: list[tuple[IPNetwork, int | None]], refused: Refused) -> str:
    """The nftables ruleset loaded inside the workspace's namespace (never the host's). On its loopback only the
    DNS forwarder, the egress proxy and the opted-in host ports; then the refused ranges; then the public internet
    or the list. With names on the list, IPv4 TCP that no CIDR entry opens is redirected to the egress proxy."""
    v4, v6 = refused.v4, refused.v6
    reject = ["meta l4proto tcp reject with tcp reset", "reject with icmpx type admin-prohibited"]
    out = [
        "ct state established,related accept",
        f"oifname \"lo\" ip daddr 127.0.0.1 meta l4proto {{ tcp, udp }} th dport {dns.PORT} accept",
        # redirected guest TCP: the output hook still names the original interface, so no oifname here
        *([f"ip daddr 127.0.0.1 tcp dport {egress.EGRESS_PORT} accept"] if policy.names else []),
        *([f"oifname \"lo\" ip daddr 127.0.0.1 tcp dport {_elements(policy.host_ports)} accept"]
          if policy.host_ports else []),
        *[f"oifname \"lo\" {r}" for r in reject],
    ]
    out += [f"ip daddr {_elements(v4)} {r}" for r in reject]
    out += [f"ip6 daddr {_elements(v6)} {r}" for r in reject]
    if not policy.allow:
        out.append("accept")
    for net, port in allow:
        match = f"{'ip' if net.version == 4 else 'ip6'} daddr {net}"
        out.append(f"{match} meta l4proto {{ tcp, udp }} th dport {port} accept" if port else f"{match} accept")
    out += reject
    body = "\n".join(f"    {line}" for line in out)
    nat = ""
    if policy.names:
        cidrs = [f"ip daddr {n}" + (f" tcp dport {p}" if p else "") + " return" for n, p in allow if n.version == 4]
        lines = ['oifname "lo" return', f"ip daddr {_elements(v4)} return", *cidrs,
                 f"meta nfproto ipv4 meta l4proto tcp redirect to :{egress.EGRESS_PORT}"]
        nat = ("  chain nat_output {\n    type nat hook output priority -100; policy accept;\n"
               + "\n".join(f"    {line}" for line in lines) + "\n  }\n")
    return ("table inet microagent {\n" + nat +
            "  chain output {\n    type filter hook output priority 0; policy drop;\n" + body + "\n  }\n"
            "  chain input {\n    type filter hook input priority 0; policy drop;\n"
            "    ct state established,related accept\n    iifname \"lo\" accept\n  }\n}\n")


SEVER_RULESET = ("table inet microagent_sever {\n"
                 "  chain output { type filter hook output priority -100; policy drop; }\n"
                 "  chain input { type filter hook input priority -100; policy drop; }\n}\n")


# ---- namespaces --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _create_namespaces(userns: bool, host_ports: tuple[int, ...], with_dns: bool = False,
                       with_egress: bool = False) -> tuple[dict[str, int], list[socket.socket]]:
    """A new network namespace (inside a new user namespace when not root), held by O_CLOEXEC fds of this
    process, with loopback up and a listening socket on 127.0.0.1:PORT for each host port; ``with_dns`` puts a
    UDP and a listening TCP socket on 127.0.0.1:53 first (the guest's DNS, see dns.py), ``with_egress`` then a
    listening socket on 127.0.0.1:EGRESS_PORT (the egress proxy, see egress.py).

    A short-lived forked child unshares, creates the listeners and passes them back over SCM_RIGHTS; this process
    opens the child's namespace files before letting it exit, so no process or mount keeps the namespace."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    uid, gid = os.geteuid(), os.getegid()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        code = 0
        try:
            ours.close()
            if _libc.unshare(CLONE_NEWNET | (CLONE_NEWUSER if userns else 0)) != 0:
                raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
            if userns:
                Path("/proc/self/setgroups").write_text("deny")
                Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
                Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
            _loopback_up()
            keep: list[socket.socket] = []  # referenced until sent: a collected socket object closes its fd
            if with_dns:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    dsock = socket.socket(socket.AF_INET, kind)
                    dsock.bind(("127.0.0.1", dns.PORT))  # root of this namespace's user namespace may bind 53
                    if kind == socket.SOCK_STREAM:
                        dsock.listen(dns.MAX_TCP_CLIENTS)
                    keep.append(dsock)
            if with_egress:
                esock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                esock.bind(("127.0.0.1", egress.EGRESS_PORT))
                esock.listen(egress.MAX_CONNECTIONS)
                keep.append(esock)
            for port in host_ports:
                lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(("127.0.0.1", port))
                lsock.listen(64)
                keep.append(lsock)
            socket.send_fds(theirs, [b"ok"], [k.fileno() for k in keep])
            theirs.recv(1)  # the parent has opened our namespace files (or died: EOF)
        except BaseException as exc:  # noqa: BLE001 -- report and exit; never return into the parent's code
            with contextlib.suppress(BaseException):
                theirs.sendall(f"error: {exc}".encode())
            code = 1
        os._exit(code)
    theirs.close()
    fds: dict[str, int] = {}
    try:
        msg, got, _flags, _addr = socket.recv_fds(ours, 4096, max(1, len(host_ports) + 2 * with_dns + with_egress))
        if msg != b"ok":
            for fd in got:
                os.close(fd)
            text = msg.decode(errors="replace") or "the namespace helper exited"
            raise HostError(f"could not create the workspace's network namespace ({text}); network policy "
                            f"enforcement needs root or unprivileged user namespaces (see 'microagent doctor'), "
                            f"or use --network isolated")
        listeners = [socket.socket(fileno=fd) for fd in got]
        for kind in (("user", "net") if userns else ("net",)):
            fds[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        ours.send(b"x")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return fds, listeners


def _ns_ino(fd: int) -> int:
    return os.fstat(fd).st_ino


# ---- the runtime -------------------------------------------------------------------------------------------


def _pdeathsig() -> None:
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the supervisor


def network_record(policy: NetworkPolicy, allow: list[tuple[IPNetwork, int | None]], upstreams: list[Any],
                   refused: Refused, notes: list[str], ruleset: str) -> dict[str, Any]:
    """What ``run/network.json`` says of a VM's enforced network (status and doctor read it)."""
    return {
        "policy": policy.to_json(), "allowByAddress": [f"{n}{f':{p}' if p else ''}" for n, p in allow],
        "allowByName": [str(e) for e in policy.names],
        "dns": {"guestServer": dns.GUEST_DNS, "answeredBy": "the supervisor's forwarder (never the guest directly)",
                "names": "all" if not policy.allow else [str(e) for e in policy.names]},
        "egressProxy": f"127.0.0.1:{egress.EGRESS_PORT} in the namespace" if policy.allow else None,
        "dnsServers": [str(r) for r in upstreams], "refused": [str(n) for n in refused.v4 + refused.v6],
        "notes": notes, "ruleset": ruleset}


class NetworkSandbox:
    """The enforcement of one policy for one VM run: namespace, nftables rules, slirp4netns uplink and host-port
    relays. ``open`` before QEMU starts (the namespaces, the DNS and host-port servers); QEMU joins
    ``join_namespaces()`` (or runs with ``preexec``); ``enforce`` (the rules, then the uplink) before the guest runs
    a single instruction: before a cold QEMU starts, or while a restored one is still paused; ``close`` after it
    exits. ``sever`` (quarantine) drops every packet and cuts the uplink and relays."""

    def __init__(self, policy: NetworkPolicy, run_dir: Path) -> None:
        if policy.mode != "user":
            raise ValueError("NetworkSandbox enforces mode user only")
        self.policy = policy
        self.run_dir = run_dir
        self.ns: dict[str, int] = {}
        self.listeners: list[socket.socket] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.relays: set[asyncio.Task[None]] = set()
        self.slirp: subprocess.Popen[bytes] | None = None
        self.exit_w = -1
        self.notes: list[str] = []
        self.severed = False
        self.dns: dns.DnsForwarder | None = None
        self.dns_socks: list[socket.socket] = []
        self.egress_sock: socket.socket | None = None
        self.egress: egress.EgressProxy | None = None
        self.grants = egress.Grants()
        self.refused: Refused | None = None
        self._report_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # a refusal: rewrite the report now
        self.secrets: list[egress.BoundSecret] = []
        self.leaves: LeafCerts | None = None
        self.enforced = False
        self._pending: tuple[list[tuple[IPNetwork, int | None]], list[Any]] | None = None  # for enforce

    @classmethod
    async def open(cls, policy: NetworkPolicy, run_dir: Path, secrets: list[dict[str, Any]] | None = None,
                   secret_values: dict[str, str] | None = None, ca_dir: Path | None = None) -> NetworkSandbox | None:
        """Set up enforcement for ``policy`` (None for isolated: no NIC, nothing to enforce). HostError, with
        what to install, when the host cannot enforce it: the VM then does not start (fail closed). ``secrets``
        ({name, hosts, placeholder}) with their ``secret_values`` (placeholder -> value) go to the egress proxy,
        which terminates TLS to their hosts with the CA in ``ca_dir``. Nothing reaches past the namespace until
        :meth:`enforce`."""
        if policy.mode != "user":
            return None
        box = cls(policy, run_dir)
        if secrets:
            values = secret_values or {}
            missing = [s["name"] for s in secrets if s["placeholder"] not in values]
            if missing or ca_dir is None:
                raise HostError(f"the values of secret(s) {', '.join(missing)} were not handed to the supervisor; "
                                f"start the workspace again")
            box.secrets = [egress.BoundSecret(Secret.from_json({k: v for k, v in s.items() if k != "placeholder"}),
                                              s["placeholder"], values[s["placeholder"]]) for s in secrets]
            box.leaves = LeafCerts(ca_dir, run_dir / "tls")
        try:
            upstreams, refused = host_resolvers(), Refused(host_networks())
            box.refused = refused
            box.start(cidr_rules(policy), [], upstreams, refused)
            await box.serve_host_ports()
            await box.serve_dns(upstreams, refused)
        except BaseException:
            await box.close()
            raise
        return box

    # setup
    def start(self, allow: list[tuple[IPNetwork, int | None]], notes: list[str], upstreams: list[Any],
              refused: Refused) -> None:
        """The namespaces and their listeners (the tools :meth:`enforce` runs are checked now: fail early)."""
        require_tool("slirp4netns")
        require_tool("nft")
        self.notes = notes
        names = bool(self.policy.allow)  # the proxy's socket exists with any allow-list: a name may be added live
        self.ns, socks = _create_namespaces(os.geteuid() != 0, self.policy.host_ports, with_dns=True,
                                            with_egress=names)
        self.dns_socks, socks = socks[:2], socks[2:]
        if names:
            self.egress_sock, socks = socks[0], socks[1:]
        self.listeners = socks
        self._pending = (allow, upstreams)

    def enforce(self) -> None:
        """Load the rules, then start the uplink (once; HostError when either fails: the guest must not run)."""
        if self.enforced:
            return
        if self.severed:
            raise HostError("the workspace was quarantined while it started: its network stays cut")
        assert self._pending is not None and self.refused is not None, "enforce() before open()"
        (allow, upstreams), refused = self._pending, self.refused
        self._nft(require_tool("nft"), ruleset := render_ruleset(self.policy, allow, refused))
        self._start_slirp(require_tool("slirp4netns"))
        record = network_record(self.policy, allow, upstreams, refused, self.notes, ruleset)
        record["uplinkPid"] = self.slirp.pid if self.slirp else None
        (self.run_dir / "network.json").write_text(json.dumps(record, indent=1))
        self.enforced = True

    async def serve_dns(self, upstreams: list[Any], refused: Refused) -> None:
        """Answer the guest's DNS on the namespace's 127.0.0.1:53 (see dns.py); refused names go to network.log."""
        log_path = self.run_dir / "network.log"

        def log(line: str) -> None:
            with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

        self.dns = dns.DnsForwarder(upstreams, lambda name: self.policy.allows_name(name), refused, log,
                                    on_answer=self.grants.record, on_refuse=self._dns_refused)
        udp, tcp = self.dns_socks
        await self.dns.start(udp, tcp)
        if self.egress_sock is not None:
            self.egress = egress.EgressProxy(self.policy, self.grants, refused, log, secrets=self.secrets,
                                             leaves=self.leaves, on_refuse=self._changed.set)
            await self.egress.start(self.egress_sock)
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())

    def _dns_refused(self, name: str) -> None:
        if self.egress is not None:
            self.egress.remember(name, None, None, "the name is not on the allow-list (the guest's DNS answered "
                                                   "NXDOMAIN)")

    def update_policy(self, policy: NetworkPolicy) -> None:
        """Apply a widened ``policy`` to the running VM: its rules (one nft transaction), DNS and proxy."""
        if policy.mode != "user" or self.severed or self.refused is None:
            raise HostError("this workspace's network cannot be changed now (isolated or quarantined)")
        ruleset = render_ruleset(policy, cidr_rules(policy), self.refused)
        self._nft(require_tool("nft"), "table inet microagent\ndelete table inet microagent\n" + ruleset)
        self.policy = policy
        if self.egress is not None:
            self.egress.policy = policy

    def report(self) -> dict[str, Any]:
        """What the guest's DNS and the egress proxy did: counters and the recent refusals."""
        return {"dns": dict(self.dns.counters) if self.dns else {},
                "egress": self.egress.report() if self.egress else None}

    async def _report_loop(self) -> None:
        """Keep ``run/egress.json`` (read by status) current: at once after a refusal, else at most once a second
        and only on change."""
        path, last = self.run_dir / EGRESS_REPORT, ""
        while True:
            self._changed.clear()
            text = json.dumps(self.report())
            if text != last:
                with contextlib.suppress(OSError):
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(text)
                    os.replace(tmp, path)
                last = text
            await asyncio.sleep(0.05)  # at most 20 writes a second, whatever the guest does
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 1.0)

    def _nft(self, nft: str, ruleset: str) -> None:
        proc = subprocess.run([nft, "-f", "-"], input=ruleset.encode(), capture_output=True, check=False,
                              preexec_fn=self.preexec())  # the child only calls setns
        if proc.returncode != 0:
            raise HostError(f"nft could not load the workspace's network rules: "
                            f"{proc.stderr.decode(errors='replace').strip()}; check that the kernel has nf_tables "
                            f"(see 'microagent doctor'), or use --network isolated")

    def _start_slirp(self, slirp: str) -> None:
        ready_r, ready_w = os.pipe()
        exit_r, self.exit_w = os.pipe()
        argv = [slirp, "--configure", "--mtu=65520", "--disable-host-loopback", "--disable-dns",
                f"--cidr={UPLINK_CIDR}", "--enable-sandbox", "--enable-seccomp", f"--ready-fd={ready_w}",
                f"--exit-fd={exit_r}", "--netns-type=path"]
        if "user" in self.ns:
            argv.append(f"--userns-path=/proc/self/fd/{self.ns['user']}")
        argv += [f"/proc/self/fd/{self.ns['net']}", "tap0"]
        try:
            with open(self.run_dir / "network.log", "ab") as log:
                self.slirp = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(ready_w, exit_r, *self.ns.values()), preexec_fn=_pdeathsig)  # noqa: PLW1509
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            ready, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
            ok = bool(ready) and os.read(ready_r, 1) == b"1"
        finally:
            os.close(ready_r)
        if not ok:
            tail = (self.run_dir / "network.log").read_bytes()[-600:].decode(errors="replace").strip()
            raise HostError(f"slirp4netns (the workspace's network uplink) did not come up: {tail or 'no output'} "
                            f"(see 'microagent doctor'), or use --network isolated")

    async def serve_host_ports(self) -> None:
        """Relay connections accepted on the namespace's 127.0.0.1:PORT to the host's 127.0.0.1:PORT."""
        for lsock in self.listeners:
            port = lsock.getsockname()[1]
            lsock.setblocking(False)
            server = await asyncio.start_server(
                lambda r, w, p=port: self._relay(p, r, w), sock=lsock)  # type: ignore[misc]
            self.servers.append(server)

    async def _relay(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self.relays) >= MAX_RELAYS_PER_PORT * max(1, len(self.servers)) or self.severed:
            writer.close()
            return
        self.relays.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            self.relays.discard(task)
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()  # a slow reader slows the writer; nothing piles up here
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                pass

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            self.relays.discard(task)

    # use
    def join_namespaces(self) -> dict[str, str]:
        """Namespace paths for the jailer to setns() into (user first, then net); valid while this lives."""
        return {kind: f"/proc/{os.getpid()}/fd/{fd}" for kind, fd in self.ns.items()}

    def preexec(self, then: Callable[[], None] | None = None) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into the namespace (checked), then runs ``then``."""
        ns = dict(self.ns)
        expected = _ns_ino(ns["net"])

        def enter() -> None:
            if "user" in ns:
                _setns(ns["user"], CLONE_NEWUSER)
            _setns(ns["net"], CLONE_NEWNET)
            if os.stat("/proc/self/ns/net").st_ino != expected:
                raise OSError("not in the workspace's network namespace")
            if then is not None:
                then()

        return enter

    def sever(self) -> None:
        """Quarantine: drop every packet in the namespace, stop the uplink and the host-port relays."""
        self.severed = True
        with contextlib.suppress(HostError, OSError):
            self._nft(require_tool("nft"), SEVER_RULESET)
        self._stop_slirp()
        for server in self.servers:
            server.close()
        for task in list(self.relays):
            task.cancel()
        if self.dns is not None:
            self.dns.stop()
        if self.egress is not None:
            self.egress.stop()

    def kill_uplink(self) -> None:
        """SIGKILL slirp4netns without waiting (a kill of the VM ends it at the same time: its exit, which
        unregisters its tap device, takes 15-30 ms, now beside QEMU's); :meth:`close` reaps it."""
        if self.slirp is not None:  # Popen.kill skips a reaped process and one already gone
            self.slirp.kill()  # it holds nothing that outlives it (no API socket; its sandbox is a namespace)

    def _stop_slirp(self) -> None:
        if self.exit_w >= 0:
            os.close(self.exit_w)  # how slirp4netns learns the supervisor is gone, should it die first
            self.exit_w = -1
        if self.slirp is not None:
            self.kill_uplink()
            self.slirp.wait()
            self.slirp = None

    async def close(self) -> None:
        """Tear everything down: uplink, relays, listeners, namespace fds (the namespace goes with QEMU)."""
        self._stop_slirp()
        for server in self.servers:
            server.close()
        for task in list(self.relays):
            task.cancel()
        if self.relays:
            await asyncio.gather(*self.relays, return_exceptions=True)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._report_task is not None:
            self._report_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._report_task
        if self.dns is not None:
            await self.dns.close()
        if self.egress is not None:
            await self.egress.close()
        for lsock in self.listeners + self.dns_socks + ([self.egress_sock] if self.egress_sock else []):
            lsock.close()
        for fd in self.ns.values():
            os.close(fd)
        self.servers, self.listeners, self.ns, self.dns_socks = [], [], {}, []


# ---- what the host can do ----------------------------------------------------------------------------------


def network_capabilities() -> dict[str, Any]:
    """A ``doctor`` check: can this host enforce network policy (slirp4netns, nft, a network namespace)?"""
    missing = [tool for tool in ("slirp4netns", "nft") if not (shutil.which(tool) or
                                                               shutil.which(tool, path="/usr/sbin:/sbin"))]
    if missing:
        return {"name": "network policy", "ok": False,
                "detail": f"{' and '.join(missing)} missing, so --network user cannot start (isolated works): "
                          f"{INSTALL}"}
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return {"name": "network policy", "ok": False,
                "detail": "/dev/net/tun is not usable by this user (slirp4netns needs it), so --network user cannot "
                          "start (isolated works): run as root, or make it mode 0666 as most distributions do"}
    userns = os.geteuid() != 0
    try:
        fds, _ = _create_namespaces(userns, ())
    except (HostError, OSError) as exc:
        return {"name": "network policy", "ok": False, "detail": str(exc)}
    for fd in fds.values():
        os.close(fd)
    how = "user + network namespace (unprivileged)" if userns else "network namespace (root)"
    upstreams = host_resolvers()
    source = os.environ.get(RESOLV_CONF_ENV) or "/etc/resolv.conf"
    dns_line = (f"guest DNS answered by the engine's forwarder, asking {', '.join(map(str, upstreams))} (from "
                f"{source})" if upstreams else f"guest DNS answers SERVFAIL: no nameserver in {source}")
    return {"name": "network policy", "ok": True,
            "detail": f"enforced: {how}, nftables inside it, slirp4netns uplink without host loopback; {dns_line}",
            "dnsServers": [str(u) for u in upstreams]}
