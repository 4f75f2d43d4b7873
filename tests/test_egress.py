"""The egress proxy's decisions without a VM: what a connection's first bytes ask for (SNI, Host), which names and
addresses are allowed, the grants the DNS hands out, and hostile first bytes (issue 18)."""

from __future__ import annotations

import ipaddress
import random
import ssl

import pytest

from microagent_engine.errors import InvalidArgument
from microagent_engine.network_policy import PRESETS, AllowEntry, NetworkPolicy
from microagent_engine.sandbox import egress
from microagent_engine.sandbox.egress import EgressProxy, Grants, http_host, requested_name, tls_sni


def client_hello(server_hostname: str | None) -> bytes:
    """The ClientHello a real TLS client (Python's ssl, OpenSSL) sends first."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sni_of_real_client_hellos() -> None:
    assert tls_sni(client_hello("pypi.org")) == "pypi.org"
    assert requested_name(client_hello("files.pythonhosted.org")) == "files.pythonhosted.org"
    assert tls_sni(client_hello(None)) is None  # no SNI: no name
    hello = client_hello("pypi.org")
    for cut in (0, 3, 5, 40, len(hello) - 1):
        assert tls_sni(hello[:cut]) is False  # not yet whole: read more
    with pytest.raises(ValueError):
        tls_sni(b"\x16\x03\x01\xff\xff" + b"\0" * 10)  # a record longer than any ClientHello we read


def test_host_of_http_requests() -> None:
    assert http_host(b"GET / HTTP/1.1\r\nHost: example.com:8080\r\nX: y\r\n\r\n") == "example.com"
    assert http_host(b"GET / HTTP/1.0\r\n\r\n") is None  # no Host: no name
    assert http_host(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") is None  # two: ambiguous, no name
    assert http_host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n") == "2001:db8::1"
    assert http_host(b"GET / HTTP/1.1\r\nHo") is False
    for bad in (b"\x00\x01garbage\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n", b"GET / SPDY/3\r\n\r\n"):
        with pytest.raises(ValueError):
            requested_name(bad)


def test_hostile_first_bytes_only_raise_value_error() -> None:
    rng = random.Random(18)
    seeds = [client_hello("pypi.org"), b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n"]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            requested_name(bytes(data[:rng.randint(0, len(data))]))
        except (ValueError, UnicodeDecodeError):
            pass


def test_names_wildcards_ports_and_presets() -> None:
    policy = NetworkPolicy.parse({"allow": ["@pypi", "*.example.com:8443", "api.test", "45.33.32.0/24"]})
    assert [str(e) for e in policy.names] == [*PRESETS["@pypi"], "*.example.com:8443", "api.test"]
    assert policy.allows_name("pypi.org", 443) and not policy.allows_name("pypi.org", 80)
    assert policy.allows_name("a.example.com", 8443) and policy.allows_name("b.a.example.com", 8443)
    assert not policy.allows_name("example.com") and not policy.allows_name("evilexample.com")
    assert policy.allows_name("API.test.", 1234)  # any port, case and a final dot do not matter
    assert not policy.allows_name("other.test")
    assert NetworkPolicy().allows_name("anything.test")  # no allow-list: the public internet
    assert NetworkPolicy.parse({"allow": ["45.33.32.0/24"]}).allows_name("pypi.org") is False  # addresses only
    for bad in ("*.com", "*", "a.*.example.com", "@nope", "*.example.com/24"):
        with pytest.raises(InvalidArgument):
            AllowEntry.expand(bad)
    grown = policy.with_allowed(["@npm"])
    assert grown.allows_name("registry.npmjs.org", 443) and not policy.allows_name("registry.npmjs.org")
    with pytest.raises(InvalidArgument, match="already reaches the public internet"):
        NetworkPolicy().with_allowed(["pypi.org"])


def test_grants_expire_and_are_bounded() -> None:
    now = [0.0]
    grants = Grants(clock=lambda: now[0])
    a, b = ipaddress.ip_address("151.101.0.223"), ipaddress.ip_address("151.101.64.223")
    grants.record("PyPI.org.", [(a, 30)])
    assert grants.allows("pypi.org", a) and not grants.allows("pypi.org", b)
    assert not grants.allows("files.pythonhosted.org", a)  # granted for one name, not for another
    now[0] = egress.GRANT_MIN_TTL + 1  # a short TTL still lasts the minimum, then expires
    assert not grants.allows("pypi.org", a)
    for i in range(egress.MAX_GRANTS + 100):  # a flood of answers never grows the table past its bound
        grants.record(f"n{i}.test", [(ipaddress.ip_address(i + 1 << 8), 60)])
    assert grants._count <= egress.MAX_GRANTS


def test_decisions() -> None:
    policy = NetworkPolicy.parse({"allow": ["@pypi", "echo.test:8080"]})
    grants = Grants()
    public, other = ipaddress.ip_address("45.1.2.3"), ipaddress.ip_address("45.1.2.4")
    grants.record("pypi.org", [(public, 60)])
    grants.record("echo.test", [(other, 60)])
    proxy = EgressProxy(policy, grants, lambda addr: addr.is_private, lambda line: None)
    assert proxy.decide("pypi.org", public, 443) == ""
    assert "not handed out" in proxy.decide("pypi.org", other, 443)  # fronting through another name's address
    assert "not handed out" in proxy.decide("files.pythonhosted.org", public, 443)  # never resolved
    assert "not on the allow-list" in proxy.decide("evil.test", public, 443)
    assert "port 80 is not allowed" in proxy.decide("pypi.org", public, 80)
    assert "IP literal" in proxy.decide("45.1.2.3", public, 443)
    assert "no host name" in proxy.decide(None, public, 443)
    grants.record("pypi.org", [(ipaddress.ip_address("10.1.2.3"), 60)])
    assert "range no workspace reaches" in proxy.decide("pypi.org", ipaddress.ip_address("10.1.2.3"), 443)


def test_secret_values_are_read_on_the_host_with_clear_errors(tmp_path) -> None:
    from microagent_engine.errors import NotFound
    from microagent_engine.secret import Secret, parse_secret_flag

    assert parse_secret_flag("TOKEN=file:/a@b@api.example.com,*.example.org") == Secret(
        "TOKEN", ("api.example.com", "*.example.org"), "file:/a@b")  # a path may hold '@': hosts come last
    assert Secret("T", ("api.example.com",)).read_value({"T": "v1"}) == "v1"
    assert Secret("T", ("api.example.com",), "env:OTHER").read_value({"OTHER": "v2"}) == "v2"
    with pytest.raises(NotFound, match=r"\$T is not set"):
        Secret("T", ("api.example.com",)).read_value({})
    for data, why in ((b"\xff\xfe", "not UTF-8"), (b"x" * 20000, "larger than"), (b"a\nb", "line break"),
                      (b"", "empty")):
        path = tmp_path / "value"
        path.write_bytes(data)
        with pytest.raises(InvalidArgument, match=why):
            Secret("T", ("api.example.com",), f"file:{path}").read_value()
    for bad in ("T@10.0.0.1", "T@api.example.com:443", "T@", "1T@api.example.com", "T=ftp:x@api.example.com"):
        with pytest.raises(InvalidArgument):
            parse_secret_flag(bad)
