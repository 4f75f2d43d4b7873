"""Egress by name and secrets that never enter the guest, with a real VM and a stand-in internet (issue 18).

Traffic goes only to 127.0.0.1 and to addresses inside a network namespace this module creates: a veth pair gives
the host a private link 10.200.N.0/30 (the far end, 10.200.N.2, runs the stand-in for the host's resolver, named to
the engine by $MICROAGENT_RESOLV_CONF) and routes two stand-in public addresses 45.x.y.z into it. There an HTTPS
server with its own test CA (trusted by the engine's egress proxy through $MICROAGENT_EGRESS_CA_BUNDLE, and by the
guest because the test adds it there) answers for pypi.org, files.pythonhosted.org, echo.test and other.test: a
PEP 503 index with one small wheel, and /echo, which records each request's headers for the test (and answers
only "ok", so a secret never travels back into the guest).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from microagent_engine import Engine, WorkspaceSpec
from microagent_engine.config import RESOLV_CONF_ENV
from microagent_engine.errors import InvalidArgument, NotFound
from microagent_engine.hostinfo import require_tool
from microagent_engine.sandbox.egress_tls import CA_BUNDLE_ENV
from microagent_engine.sandbox.network import host_addresses, host_networks
from microagent_engine.secret import Secret
from standin_dns import DNS_RESPONDER

pytestmark = pytest.mark.vm

NAMES = ("pypi.org", "files.pythonhosted.org", "echo.test", "other.test")


def _test_ca(directory: Path) -> tuple[Path, Path]:
    """A CA of the test's own and a server certificate for NAMES: (ca.pem, server.pem with its key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "microagent test internet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, server_path = directory / "ca.pem", directory / "server.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
                            + cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, server_path


def _wheel(directory: Path) -> Path:
    """A small pure-Python wheel, tinypkg 1.0."""
    name = "tinypkg-1.0-py3-none-any.whl"
    files = {"tinypkg/__init__.py": b"GREETING = 'hello from tinypkg'\n",
             "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
             "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for p, d in files.items()) + "tinypkg-1.0.dist-info/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p, d in files.items():
            zf.writestr(p, d)
        zf.writestr("tinypkg-1.0.dist-info/RECORD", record)
    path = directory / name
    path.write_bytes(buf.getvalue())
    return path


_SERVER = r"""
import http.server, json, socket, socketserver, ssl, struct, sys, threading
dns_addr, table, server_pem, wheel, public = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
wheel_bytes = open(wheel, "rb").read()
wheel_name = wheel.rsplit("/", 1)[-1]
import hashlib
digest = hashlib.sha256(wheel_bytes).hexdigest()
lock = threading.Lock()
def say(kind, data):
    with lock:
        print(json.dumps([kind, data]), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        host = self.headers.get("Host", "")
        if self.path.startswith("/echo"):
            say("echo", {"host": host, "headers": {k: v for k, v in self.headers.items()}})
            body = b"ok"
        elif self.path.rstrip("/") == "/simple/tinypkg":
            body = (f'<html><body><a href="https://files.pythonhosted.org/packages/{wheel_name}#sha256={digest}">'
                    f'{wheel_name}</a></body></html>').encode()
        elif self.path == f"/packages/{wheel_name}":
            body = wheel_bytes
        else:
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        kind = "text/html" if self.path.startswith("/simple") else "application/octet-stream"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", kind); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class TLS(http.server.ThreadingHTTPServer):
    def get_request(self):
        sock, addr = super().get_request()
        return ctx.wrap_socket(sock, server_side=True), addr
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(server_pem)
def heard(name, qtype, proto):
    say("dns", f"{name} {qtype} {proto}")
""" + DNS_RESPONDER + r"""
threading.Thread(target=udp, daemon=True).start()
srv = TLS((public, 443), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
bulk = http.server.ThreadingHTTPServer((public, 80), H)
threading.Thread(target=bulk.serve_forever, daemon=True).start()
print(json.dumps(["ready", None]), flush=True)
sys.stdin.read()
"""


@dataclass
class Internet:
    ns: str
    resolver: str
    public: str  # pypi.org, files.pythonhosted.org, echo.test, other.test all resolve here
    ca: Path
    events: list[tuple[str, object]] = field(default_factory=list)

    def echoes(self) -> list[dict[str, object]]:
        return [e[1] for e in list(self.events) if e[0] == "echo"]  # type: ignore[misc]

    def asked(self, fragment: str) -> list[str]:
        return [str(e[1]) for e in list(self.events) if e[0] == "dns" and fragment in str(e[1])]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    require_tool("ip")
    tmp = tmp_path_factory.mktemp("internet")
    ca, server_pem = _test_ca(tmp)
    wheel = _wheel(tmp)
    tag, r = secrets.token_hex(3), secrets.randbelow
    n = r(250) + 1
    ns, host_if, ns_if = f"ma-egr-{tag}", f"meh{tag}", f"men{tag}"
    taken = {str(a.network_address) for a in host_addresses()} | {
        str(g.network_address) for g in host_networks() if g.prefixlen in (32, 128)}
    resolver = f"10.200.{n}.2"
    public = next(a for a in (f"45.{r(200) + 20}.{r(256)}.{r(250) + 2}" for _ in range(100)) if a not in taken)
    table = {name: [public] for name in NAMES} | {"inside.test": ["10.1.2.3"]}
    conf = tmp / "resolv.conf"
    conf.write_text(f"nameserver {resolver}\n")
    saved = {k: os.environ.get(k) for k in (RESOLV_CONF_ENV, CA_BUNDLE_ENV)}
    proc = None
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"10.200.{n}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for cidr in (f"{resolver}/30", f"{public}/32"):
            _ip("-n", ns, "addr", "add", cidr, "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("route", "add", f"{public}/32", "via", resolver, "dev", host_if)
        for addr in (resolver, public):  # never send test traffic anywhere but in here
            assert json.loads(_ip("-j", "route", "get", addr))[0]["dev"] == host_if
        world = Internet(ns, resolver, public, ca)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER, resolver,
                                 json.dumps(table), str(server_pem), str(wheel), public],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and json.loads(proc.stdout.readline())[0] == "ready"

        def record(stream=proc.stdout) -> None:
            for line in stream:
                world.events.append(tuple(json.loads(line)))  # type: ignore[arg-type]
        threading.Thread(target=record, daemon=True).start()
        os.environ[RESOLV_CONF_ENV] = str(conf)
        os.environ[CA_BUNDLE_ENV] = str(ca)  # the egress proxy trusts the stand-in's CA for its own TLS
        yield world
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


SECRET_NAME = "ECHO_TOKEN"

_CLIENT = r"""
import json, os, socket, ssl, sys
results = {}
def resolve(name):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)})
    except OSError as exc:
        return f"error: {exc.__class__.__name__}"
def get(addr, sni, host, path, token=""):
    ctx = ssl.create_default_context()
    if sni is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((addr, 443), timeout=20) as raw:
            with ctx.wrap_socket(raw, server_hostname=sni) as s:
                auth = f"Authorization: Bearer {token}\r\n" if token else ""
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        return data.split(b"\r\n", 1)[0].decode()
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {exc.__class__.__name__}"
token = os.environ[sys.argv[1]]
pypi = resolve("pypi.org")
results["pypi"] = pypi
results["other"] = resolve("other.test")
results["inside"] = resolve("inside.test")
addr = pypi[0]
results["index"] = get(addr, "pypi.org", "pypi.org", "/simple/tinypkg/")
results["noSni"] = get(addr, None, "pypi.org", "/simple/tinypkg/")
results["notResolved"] = get(addr, "files.pythonhosted.org", "files.pythonhosted.org", "/simple/tinypkg/")
results["notAllowed"] = get(addr, "other.test", "other.test", "/echo")
results["insideDirect"] = get("10.1.2.3", "inside.test", "inside.test", "/echo")
echo = resolve("echo.test")
results["echoBound"] = get(echo[0], "echo.test", "echo.test", "/echo/bound", token)
results["echoUnbound"] = get(addr, "pypi.org", "pypi.org", "/echo/unbound", token)
results["token"] = token
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def egress_vm(engine: Engine, internet: Internet, python_image: Path) -> Iterator[str]:
    name = "egress-py"
    value = "sk-test-" + secrets.token_hex(20)
    os.environ[SECRET_NAME] = value
    spec = WorkspaceSpec(image="builtin:python", profile="small",
                         network={"mode": "user", "allow": ["@pypi", "echo.test", "inside.test:443"]},
                         secrets=[Secret(SECRET_NAME, ("echo.test",))])
    engine.create(name, spec)
    try:
        engine.start(name)
        # the guest trusts the stand-in's CA, as it would trust a real site's (the proxy never re-signs pypi.org)
        r = engine.exec(name, ["sh", "-c", "cat >> /etc/ssl/certs/ca-certificates.crt"],
                        stdin=internet.ca.read_bytes())
        assert r.exit_code == 0, r.stderr
        yield name
    finally:
        os.environ.pop(SECRET_NAME, None)
        try:
            engine.kill(name)
        finally:
            engine.delete(name)
        assert value not in json.dumps([e for e in engine.list()], default=str)


def _run(engine: Engine, name: str, script: str, *args: str) -> dict[str, object]:
    r = engine.exec(name, ["python3", "-c", script, *args], timeout=300)
    assert r.exit_code == 0, r.stderr.decode(errors="replace")
    return json.loads(r.stdout)


def test_names_sni_and_secrets(engine: Engine, internet: Internet, egress_vm: str) -> None:
    value = os.environ[SECRET_NAME]
    out = _run(engine, egress_vm, _CLIENT, SECRET_NAME)
    assert out["pypi"] == [internet.public]
    assert str(out["other"]).startswith("error")  # NXDOMAIN from the engine's DNS
    assert internet.asked("other.test") == []  # never left the host
    assert str(out["inside"]).startswith("error")  # its only address is in a refused range: stripped
    assert out["index"] == "HTTP/1.1 200 OK"  # an allowed name, resolved by the workspace's DNS
    assert str(out["noSni"]).startswith("refused")  # no name: an IP literal
    assert str(out["notResolved"]).startswith("refused")  # allowed, but the guest never resolved it to this address
    assert str(out["notAllowed"]).startswith("refused")  # a name off the list, on a shared address
    assert str(out["insideDirect"]).startswith("refused")  # a refused range, whatever the name
    assert out["echoBound"] == "HTTP/1.1 200 OK" and out["echoUnbound"] == "HTTP/1.1 200 OK"
    placeholder = str(out["token"])
    assert placeholder.startswith("microagent-secret-") and value not in placeholder
    bound = next(e for e in internet.echoes() if e["headers"].get("Host") == "echo.test")  # type: ignore[union-attr]
    unbound = next(e for e in internet.echoes() if e["headers"].get("Host") == "pypi.org")  # type: ignore[union-attr]
    assert bound["headers"]["Authorization"] == f"Bearer {value}"  # type: ignore[index]
    assert unbound["headers"]["Authorization"] == f"Bearer {placeholder}"  # type: ignore[index]
    report = engine.status(egress_vm).to_json()
    assert value not in json.dumps(report) and placeholder in json.dumps(report["env"])
    # the guest's environment and disk never hold the value (read back and searched on the host)
    r = engine.exec(egress_vm, ["sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null; sync"])
    assert placeholder.encode() in r.stdout and value.encode() not in r.stdout
    import mmap
    with open(engine.status(egress_vm).dir.rootfs, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m.find(value.encode()) == -1
    # nor its memory: a snapshot holds the guest's RAM (the VM runs on)
    from microagent_engine.snapshots.workspace import snapshot_dir

    engine.snapshot(egress_vm, "egress-memory")
    try:
        seen_placeholder = False
        for path in snapshot_dir(engine.state_dir, "egress-memory").rglob("*"):
            if path.is_file() and path.stat().st_size:
                with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
                    assert m.find(value.encode()) == -1, path
                    seen_placeholder = seen_placeholder or m.find(placeholder.encode()) != -1
        assert seen_placeholder  # the scan does see what the guest holds: its environment's placeholder
    finally:
        engine.remove_snapshot("egress-memory")


def test_pip_install_through_the_pypi_preset(engine: Engine, internet: Internet, egress_vm: str) -> None:
    r = engine.exec(egress_vm, ["sh", "-c", "pip install --no-cache-dir --disable-pip-version-check tinypkg "
                                "&& python3 -c 'import tinypkg; print(tinypkg.GREETING)'"], timeout=600)
    assert r.exit_code == 0, (r.stdout + r.stderr).decode(errors="replace")[-2000:]
    assert r.stdout.decode().strip().endswith("hello from tinypkg")


def test_blocked_connections_are_reported(engine: Engine, internet: Internet, egress_vm: str) -> None:
    """status --json counts and lists the refusals (the report is rewritten within a second: wait for it)."""
    deadline = time.monotonic() + 30
    while True:
        report = engine.status(egress_vm).to_json()["egress"]
        if report and report["egress"]["blocked"] >= 3 and report["dns"]["refusedNames"] >= 1:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.5)
    reasons = {e["reason"] for e in report["egress"]["recentBlocked"]}
    assert any("not on the allow-list" in why for why in reasons)
    assert any("not handed out" in why for why in reasons)
    assert report["egress"]["secretRequests"] >= 1


def test_pip_in_a_python_session_allowed_pypi(ip, engine: Engine, internet: Internet, python_image: Path) -> None:
    """``%%microagent python --allow @pypi`` then ``%pip install`` in the session's kernel (the guest trusts the
    stand-in's CA first, sent in with --in, as it would trust pypi.org's real CA)."""
    from IPython.utils.capture import capture_output

    from microagent_jupyter import python_session as PS

    name = "egress-session"
    ip.user_ns["test_ca"] = internet.ca.read_text()
    try:
        ip.run_cell_magic("microagent", f"python --name {name} --allow @pypi --in test_ca",
                          "open('/etc/ssl/certs/ca-certificates.crt', 'a').write(test_ca)")
        with capture_output() as cap:
            ip.run_cell_magic("microagent", f"python --name {name}",
                              "%pip install --no-cache-dir --disable-pip-version-check tinypkg\n"
                              "import tinypkg\nprint(tinypkg.GREETING)")
        assert "hello from tinypkg" in cap.stdout, (cap.stdout, cap.stderr)
    finally:
        PS.stop_all()
        if name in {i.name for i in engine.list()}:
            if engine.status(name).running:
                engine.kill(name)
            engine.delete(name)


def test_secret_rules(engine: Engine) -> None:
    with pytest.raises(InvalidArgument, match="allow-list does not name"):
        WorkspaceSpec(network={"mode": "user", "allow": ["pypi.org"]},
                      secrets=[Secret("T", ("api.example.com",))]).check()
    with pytest.raises(InvalidArgument, match="allow-list does not name"):
        WorkspaceSpec(secrets=[Secret("T", ("api.example.com",))]).check()  # the public internet: no proxy
    with pytest.raises(InvalidArgument, match="not a host name"):
        Secret("T", ("1.2.3.4",))
    spec = WorkspaceSpec(network={"mode": "user", "allow": ["api.example.com"]},
                         secrets=[Secret("MISSING_SECRET_FOR_TEST", ("api.example.com",))])
    engine.create("secret-missing", spec)
    try:
        with pytest.raises(NotFound, match=r"\$MISSING_SECRET_FOR_TEST is not set"):
            engine.start("secret-missing")
        assert engine.status("secret-missing").state.state == "prepared"  # nothing started
    finally:
        engine.delete("secret-missing")


_PROBE_OTHER = ("import socket, ssl, sys\n"
                "try:\n"
                "    addr = socket.getaddrinfo('other.test', 443, socket.AF_INET)[0][4][0]\n"
                "    raw = socket.create_connection((addr, 443), timeout=20)\n"
                "    s = ssl.create_default_context().wrap_socket(raw, server_hostname='other.test')\n"
                "    s.sendall(b'GET /echo/other HTTP/1.1\\r\\nHost: other.test\\r\\nConnection: close\\r\\n\\r\\n')\n"
                "    print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
                "except OSError as exc:\n"
                "    print('refused', exc.__class__.__name__)\n")


def test_notebook_names_what_was_refused(engine: Engine, internet: Internet, egress_vm: str) -> None:
    """After a cell, the notebook says what the sandbox refused and the magic that allows it; the report is
    rewritten at once after a refusal (the watch sees it without waiting for the next second)."""
    from IPython.core.interactiveshell import InteractiveShell

    from microagent_jupyter.egress_note import RefusalWatch

    watch = RefusalWatch(engine, egress_vm)
    out = engine.exec(egress_vm, ["python3", "-c", _PROBE_OTHER]).stdout.decode()
    assert out.startswith("refused"), out  # other.test: NXDOMAIN, so the guest never even connects
    deadline = time.monotonic() + 10
    while not watch.refused():
        assert time.monotonic() < deadline, engine.egress(egress_vm)
        time.sleep(0.1)
    assert "not on the allow-list" in dict(watch.refused()).get("other.test", "")
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "microagent_jupyter")
    text = repr(shell.run_line_magic("microagent", f"--state-dir {engine.state_dir} egress {egress_vm}"))
    assert f"To allow: %microagent allow {egress_vm} other.test" in text


def test_egress_command_and_allow_widen_the_running_workspace(cli, engine: Engine, internet: Internet,
                                                                 egress_vm: str) -> None:
    """Last in the module: other.test is refused, `microagent egress` says so with the command that allows it,
    and `microagent allow` opens it in the running VM at once (rules, DNS and proxy) and in its record."""
    probe = _PROBE_OTHER
    assert engine.exec(egress_vm, ["python3", "-c", probe]).stdout.decode().startswith("refused")
    deadline = time.monotonic() + 30
    while "other.test" not in (out := cli("egress", egress_vm).stdout.decode()):
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
    assert f"To allow: microagent allow {egress_vm} other.test" in out
    r = cli("allow", egress_vm, "other.test:443")
    assert r.returncode == 0, r.stderr
    assert engine.exec(egress_vm, ["python3", "-c", probe]).stdout.decode().strip() == "HTTP/1.1 200 OK"
    assert "other.test:443" in engine.status(egress_vm).config.network_policy.to_json()["allow"]
    r = cli("allow", egress_vm, "10.0.0.0/8")
    assert r.returncode != 0 and b"never reachable" in r.stderr and b"Traceback" not in r.stderr
