"""What a workspace's guest may reach: its :class:`NetworkPolicy` (mode, allow-list, host ports) and the ranges no
policy opens. Pure data and validation; ``sandbox.network`` enforces it on the host."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from .config import NETWORK_CHOICES, NETWORK_MODES
from .errors import InvalidArgument

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = NETWORK_CHOICES
BACKEND_MODES = NETWORK_MODES  # policy/config spelling -> VMSpec.network
HOST_GATEWAY = "10.0.2.2"  # where the guest reaches an opted-in host port (QEMU slirp's host alias)
MAX_HOST_PORTS = 32
MAX_ALLOW = 256
GUEST_DNS = "10.0.2.3"  # QEMU slirp's DNS address, as the guest sees it (answered by the engine's forwarder)
DNS_PORT = 53

# Every special-purpose range that is not globally reachable, from IANA's two registries (source:
# https://www.iana.org/assignments/iana-ipv4-special-registry/ and .../iana-ipv6-special-registry/, as of 2024-12),
# plus multicast and the deprecated or IPv4-embedding ranges. A few registry entries inside a refused block are
# globally reachable (192.0.0.9/32, 192.0.0.10/32, 2001:1::1/128, 2001:3::/32, 2001:4:112::/48, 2001:20::/28,
# 2001:30::/28): the whole block is refused anyway (a workspace has no use for anycast PCP/TURN, AMT or ORCHID).
BLOCKED_V4 = (
    "0.0.0.0/8",  # "this network" (RFC 791)
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private use (RFC 1918)
    "100.64.0.0/10",  # shared address space, carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",  # loopback (RFC 1122)
    "169.254.0.0/16",  # link-local, cloud metadata 169.254.169.254 (RFC 3927)
    "192.0.0.0/24",  # IETF protocol assignments, incl. DS-Lite 192.0.0.0/29 (RFC 6890, 7335)
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation TEST-NET-1/2/3 (RFC 5737)
    "192.88.99.0/24",  # deprecated 6to4 relay anycast (RFC 7526)
    "198.18.0.0/15",  # benchmarking (RFC 2544)
    "224.0.0.0/4",  # multicast (RFC 5771)
    "240.0.0.0/4",  # reserved (RFC 1112), and limited broadcast 255.255.255.255/32 (RFC 919)
)
BLOCKED_V6 = (
    "::/128", "::1/128",  # unspecified, loopback (RFC 4291)
    "::/96",  # deprecated IPv4-compatible addresses (RFC 4291): they embed IPv4
    "::ffff:0:0/96",  # IPv4-mapped (RFC 4291)
    "64:ff9b::/96", "64:ff9b:1::/48",  # IPv4/IPv6 translation (RFC 6052, 8215): a NAT64 would reach IPv4 behind
    "100::/64",  # discard-only (RFC 6666)
    "2001::/23",  # IETF protocol assignments, incl. Teredo 2001::/32 (RFC 2928, 4380)
    "2001:db8::/32", "3fff::/20",  # documentation (RFC 3849, 9637)
    "2002::/16",  # 6to4 (RFC 3056): embeds IPv4
    "5f00::/16",  # segment routing SIDs (RFC 9602)
    "fc00::/7",  # unique local (RFC 4193)
    "fe80::/10", "fec0::/10",  # link-local (RFC 4291), deprecated site-local (RFC 3879)
    "ff00::/8",  # multicast (RFC 4291)
)
_BLOCKED = tuple(ipaddress.ip_network(n) for n in BLOCKED_V4 + BLOCKED_V6)
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?",
                       re.IGNORECASE)

# ---- the policy --------------------------------------------------------------------------------------------


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{what}: expected a port number from 1 to 65535, got {value!r}")
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgument(f"{what}: {value!r} is not a port number from 1 to 65535")
    return int(text)


#: allow-list presets: the names a common tool needs (HTTPS only); ``--allow @pypi``
PRESETS: dict[str, tuple[str, ...]] = {
    "@pypi": ("pypi.org:443", "files.pythonhosted.org:443"),
    "@github": ("github.com:443", "api.github.com:443", "codeload.github.com:443", "*.githubusercontent.com:443"),
    "@huggingface": ("huggingface.co:443", "*.huggingface.co:443", "*.hf.co:443"),
    "@npm": ("registry.npmjs.org:443",),
    "@conda": ("conda.anaconda.org:443", "repo.anaconda.com:443"),
}
ALLOW_SYNTAX = "CIDR|NAME|*.SUFFIX[:PORT] or a preset (" + ", ".join(PRESETS) + ")"


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry: a CIDR (or address), a host name or a ``*.suffix`` wildcard of names, optionally one
    port. Names are enforced by name (the engine's DNS and egress proxy), never turned into address rules."""

    target: str  # normalised CIDR, a lower-case host name, or "*." + a lower-case suffix
    port: int | None = None

    @property
    def is_name(self) -> bool:
        return self.network is None

    def matches(self, name: str, port: int | None = None) -> bool:
        """Whether host ``name`` (lower-case, no trailing dot) on ``port`` (None: any) is this entry's."""
        if self.network is not None or (port is not None and self.port is not None and port != self.port):
            return False
        if self.target.startswith("*."):
            return name.endswith(self.target[1:]) and len(name) > len(self.target) - 1
        return name == self.target

    @classmethod
    def expand(cls, text: Any) -> tuple["AllowEntry", ...]:
        """The entries of ``text``: a preset's (``@pypi``), or the one entry :meth:`parse` reads."""
        if isinstance(text, str) and text.strip().startswith("@"):
            preset = PRESETS.get(text.strip().lower())
            if preset is None:
                raise InvalidArgument(f"unknown allow preset {text.strip()!r}; the presets are {', '.join(PRESETS)}")
            return tuple(cls.parse(item) for item in preset)
        return (cls.parse(text),)

    @property
    def network(self) -> IPNetwork | None:
        """The CIDR, or None for a host name."""
        try:
            return ipaddress.ip_network(self.target)
        except ValueError:
            return None

    @classmethod
    def parse(cls, text: Any) -> AllowEntry:
        """``CIDR``, ``ADDRESS``, ``HOST`` with optional ``:PORT``; IPv6 with a port as ``[CIDR]:PORT``."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(f"allow entry {text!r}: expected {ALLOW_SYNTAX}, e.g. 151.101.0.0/16:443, "
                                  f"pypi.org:443, *.example.com or @pypi")
        raw = text.strip()
        target, port = raw, None
        if raw.startswith("["):
            inner, sep, rest = raw[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise InvalidArgument(f"allow entry {raw!r}: write an IPv6 address with a port as [ADDR]:PORT")
            target, port = inner, (_port(rest[1:], f"allow entry {raw!r}") if rest else None)
        elif raw.count(":") == 1:
            target, _, port_text = raw.partition(":")
            port = _port(port_text, f"allow entry {raw!r}")
        try:
            net: IPNetwork | None = ipaddress.ip_network(target, strict=False)
        except ValueError:
            net = None
        if net is None:
            wildcard = target.startswith("*.")
            name = target[2:] if wildcard else target
            if ("/" in name or "*" in name or not _HOSTNAME.fullmatch(name) or name.replace(".", "").isdigit()
                    or (wildcard and "." not in name.rstrip("."))):
                raise InvalidArgument(f"allow entry {raw!r}: {target!r} is neither a CIDR, an IP address, a host "
                                      f"name nor a wildcard *.SUFFIX with at least two labels (e.g. *.example.com)")
            return cls(("*." if wildcard else "") + name.lower().rstrip("."), port)
        for blocked in _BLOCKED:
            if net.version == blocked.version and net.subnet_of(blocked):  # type: ignore[arg-type]
                raise InvalidArgument(
                    f"allow entry {raw!r} lies inside {blocked}, which is never reachable from a workspace (the "
                    f"allow-list only narrows public egress). For a service on this host's loopback use "
                    f"--allow-host-port PORT (spec: network.hostPorts); the guest reaches it at {HOST_GATEWAY}:PORT")
        return cls(str(net), port)

    def __str__(self) -> str:
        if self.port is None:
            return self.target
        return f"[{self.target}]:{self.port}" if ":" in self.target else f"{self.target}:{self.port}"


@dataclass(frozen=True)
class NetworkPolicy:
    """What a workspace's guest may reach. ``isolated``: no NIC. ``user``: NAT to the public internet only,
    narrowed by ``allow`` when it is not empty; ``host_ports`` opt in to ``host 127.0.0.1:PORT`` at
    ``10.0.2.2:PORT``."""

    mode: str = "user"
    allow: tuple[AllowEntry, ...] = ()
    host_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"unknown network mode {self.mode!r}; use 'user' or 'isolated'")
        if self.mode == "isolated" and (self.allow or self.host_ports):
            raise InvalidArgument("network mode isolated has no network device, so an allow-list or host ports "
                                  "mean nothing; drop them or use mode user")
        if len(self.allow) > MAX_ALLOW:
            raise InvalidArgument(f"the allow-list has {len(self.allow)} entries; at most {MAX_ALLOW} are allowed "
                                  f"(use CIDRs to cover ranges)")
        if len(self.host_ports) > MAX_HOST_PORTS:
            raise InvalidArgument(f"{len(self.host_ports)} host ports requested; at most {MAX_HOST_PORTS}")
        if len(set(self.host_ports)) != len(self.host_ports):
            raise InvalidArgument(f"host ports {list(self.host_ports)} repeat a port; give each once")
        if DNS_PORT in self.host_ports:
            raise InvalidArgument(f"host port {DNS_PORT} cannot be opted in: it is the guest's DNS, answered by the "
                                  f"engine at {GUEST_DNS}")

    @property
    def names(self) -> tuple[AllowEntry, ...]:
        """The allow-list's name entries (exact and wildcard): enforced by the engine's DNS and egress proxy."""
        return tuple(e for e in self.allow if e.is_name)

    def allows_name(self, name: str, port: int | None = None) -> bool:
        """Whether the guest may resolve (``port`` None) or connect by ``name`` (on ``port``). Without an
        allow-list every name is allowed."""
        if not self.allow:
            return True
        name = name.lower().rstrip(".")
        return any(e.matches(name, port) for e in self.names)

    def with_allowed(self, entries: list[str]) -> "NetworkPolicy":
        """This policy with ``entries`` added to its allow-list (an empty list would open everything: it must
        already have one)."""
        if self.mode != "user":
            raise InvalidArgument("an isolated workspace has no network device; nothing can be allowed")
        if not self.allow:
            raise InvalidArgument("this workspace already reaches the public internet (no allow-list to extend)")
        added = tuple(e for text in entries for e in AllowEntry.expand(text))
        return NetworkPolicy(self.mode, tuple(dict.fromkeys(self.allow + added)), self.host_ports)

    @property
    def backend_mode(self) -> str:
        """``VMSpec.network``/``WorkspaceConfig.network``: ``user`` or ``none``."""
        return BACKEND_MODES[self.mode]

    @classmethod
    def parse(cls, value: NetworkPolicy | str | dict[str, Any] | None) -> NetworkPolicy:
        """A policy from a mode string (``user``, ``isolated``; ``none`` = isolated), a spec/JSON mapping
        (``mode``, ``allow``, ``hostPorts``) or a policy; None gives the default (``user``)."""
        if value is None:
            return cls()
        if isinstance(value, NetworkPolicy):
            return value
        if isinstance(value, str):
            if value not in BACKEND_MODES:
                raise InvalidArgument(f"unknown network mode {value!r}; use 'user' or 'isolated'")
            return cls("isolated" if value == "none" else value)
        if not isinstance(value, dict):
            raise InvalidArgument(f"network: expected a mode (user|isolated) or a mapping with mode, allow, "
                                  f"hostPorts; got {type(value).__name__}")
        unknown = sorted(set(value) - {"mode", "allow", "hostPorts"})
        if unknown:
            raise InvalidArgument(f"network: unknown field(s) {', '.join(map(str, unknown))}; the fields are mode, "
                                  f"allow, hostPorts")
        mode = value.get("mode", "user")
        if not isinstance(mode, str):
            raise InvalidArgument(f"network.mode: expected user or isolated, got {mode!r}")
        allow = value.get("allow") or []
        ports = value.get("hostPorts") or []
        for key, items in (("allow", allow), ("hostPorts", ports)):
            if not isinstance(items, list):
                raise InvalidArgument(f"network.{key}: expected a list, got {type(items).__name__}")
        entries = tuple(dict.fromkeys(e for a in allow for e in AllowEntry.expand(a)))  # presets expanded, once
        return cls("isolated" if mode == "none" else mode, entries, tuple(_port(p, "network.hostPorts") for p in ports))

    @classmethod
    def from_flags(cls, mode: str | None, allow: list[str] | None,
                   host_ports: list[int] | None) -> dict[str, Any] | None:
        """The CLI's ``--network``/``--allow``/``--allow-host-port`` as a partial mapping (only the keys given,
        so they merge key by key over a spec's ``network:``); None when no flag was given."""
        out: dict[str, Any] = {}
        if mode is not None:
            out["mode"] = mode
        if allow:
            out["allow"] = list(allow)
        if host_ports:
            out["hostPorts"] = list(host_ports)
        return out or None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow": [str(a) for a in self.allow], "hostPorts": list(self.host_ports)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkPolicy:
        return cls.parse(data)

    def describe(self) -> str:
        """One line for ``status``."""
        if self.mode == "isolated":
            return "isolated (no network device)"
        reach = ("allow-list only: " + ", ".join(map(str, self.allow))) if self.allow else "public internet only"
        ports = f"; host ports {', '.join(map(str, self.host_ports))} at {HOST_GATEWAY}" if self.host_ports else ""
        return f"user ({reach}{ports})"




def policy_of(network: str, stored: dict[str, Any] | None) -> NetworkPolicy:
    """The policy of a workspace config: its stored ``network_policy``, or (configs from before policies) its
    mode with the default restrictions."""
    return NetworkPolicy.from_json(stored) if stored else NetworkPolicy.parse(network)
