"""TLS for secrets (issue 18): the workspace's CA, certificates for the bound hosts, and the relay that puts a
secret's value into the request headers of a connection to a bound host.

The CA is made when the workspace is created (key 0600 in its directory, never in the guest); the guest trusts
its certificate (added to the rootfs's CA bundle). For a connection whose SNI is bound to a secret, the proxy
completes the TLS handshake itself with a certificate for that name signed by the CA, opens its own verified TLS
connection to the destination (the system's CAs, plus ``$MICROAGENT_EGRESS_CA_BUNDLE``), and relays one HTTP/1.x
request: placeholders in its header lines become the values; ``Connection: close`` is set on the request and the
response, so every request comes on a fresh connection and passes here. The body and the response pass as they
are.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl
import tempfile
from collections import OrderedDict
from pathlib import Path

from ..errors import HostError

CA_CERT = "egress-ca.crt"
CA_KEY = "egress-ca.key"
CA_BUNDLE_ENV = "MICROAGENT_EGRESS_CA_BUNDLE"  # extra CAs the proxy trusts for upstream TLS (a private PKI)
MAX_REQUEST_HEAD = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
MAX_LEAVES = 64
CHUNK = 64 * 1024
HEAD_TIMEOUT = 30.0


def make_ca(directory: Path, name: str) -> bytes:
    """Write a new CA (certificate and 0600 key) for workspace ``name`` into ``directory``; its certificate PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"microagent egress CA for {name}"[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_path = directory / CA_KEY
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    (directory / CA_CERT).write_bytes(pem)
    return pem


#: where guests look for trusted CAs (Debian and its derivatives; Python, pip, requests and curl read it there)
GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_CA_FILE = "/usr/local/share/ca-certificates/microagent-egress.crt"


def trust_ca(rootfs: Path, ca_pem: bytes) -> None:
    """Add the CA to the guest's trusted CAs in ``rootfs``: appended to its CA bundle (created when missing) and
    kept beside its local CAs, so update-ca-certificates in the guest keeps it."""
    from ..storage import debugfs

    bundle = debugfs.read_file(rootfs, GUEST_CA_BUNDLE) if debugfs.exists(rootfs, GUEST_CA_BUNDLE) else b""
    with tempfile.TemporaryDirectory() as tmp:
        for guest, data in ((GUEST_CA_BUNDLE, bundle.rstrip(b"\n") + (b"\n" if bundle else b"") + ca_pem),
                            (GUEST_CA_FILE, ca_pem)):
            path = Path(tmp) / "ca"
            path.write_bytes(data)
            debugfs.copy_in(rootfs, path, guest, mode=0o644)


class LeafCerts:
    """Server contexts for bound host names, minted on first use from the workspace's CA (bounded cache)."""

    def __init__(self, directory: Path, work_dir: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            self._ca = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            self._ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise HostError(f"the workspace's egress CA cannot be read ({exc}); recreate the workspace") from None
        self._dir = work_dir
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def context_for(self, host: str) -> ssl.SSLContext:
        ctx = self._contexts.get(host)
        if ctx is not None:
            self._contexts.move_to_end(host)
            return ctx
        ctx = self._mint(host)
        self._contexts[host] = ctx
        while len(self._contexts) > MAX_LEAVES:
            self._contexts.popitem(last=False)
        return ctx

    def _mint(self, host: str) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
                .issuer_name(self._ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self._ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._dir / f"leaf-{os.getpid()}-{len(self._contexts)}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(path)
        finally:
            path.unlink()
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def upstream_context() -> ssl.SSLContext:
    """The proxy's own TLS client context: verified against the system's CAs and ``$MICROAGENT_EGRESS_CA_BUNDLE``."""
    ctx = ssl.create_default_context()
    extra = os.environ.get(CA_BUNDLE_ENV)
    if extra:
        ctx.load_verify_locations(cafile=extra)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class TlsServerStream:
    """The server side of a TLS connection over asyncio streams whose first bytes (the ClientHello) were already
    read (a memory BIO, so nothing is read twice)."""

    def __init__(self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 first: bytes) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._reader, self._writer = reader, writer
        self._in.write(first)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> bool:
        data = await self._reader.read(CHUNK)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client closed during the TLS handshake") from None

    async def read(self, n: int = CHUNK) -> bytes:
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        self._obj.write(data)
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._obj.unwrap()
        with contextlib.suppress(Exception):
            await self._flush()


async def read_head(read: object, limit: int, first: bytes = b"") -> tuple[bytes, bytes]:
    """(head through the blank line, what followed it) from ``read`` (an async read function); ValueError when
    the head is larger than ``limit`` or the stream ends before it."""
    buf = first
    while b"\r\n\r\n" not in buf:
        if len(buf) > limit:
            raise ValueError("HTTP head too large")
        more = await asyncio.wait_for(read(CHUNK), HEAD_TIMEOUT)  # type: ignore[operator]
        if not more:
            raise ValueError("the stream ended inside the HTTP head")
        buf += more
    end = buf.index(b"\r\n\r\n") + 4
    if end > limit:
        raise ValueError("HTTP head too large")
    return buf[:end], buf[end:]


def rewrite_head(head: bytes, replace: dict[bytes, bytes]) -> bytes:
    """``head`` (request or status line, headers, blank line) with each placeholder replaced in the header lines
    (not in the first line) and ``Connection: close`` set."""
    lines = head[:-4].split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        if line.split(b":", 1)[0].strip().lower() in (b"connection", b"keep-alive", b"proxy-connection"):
            continue
        for placeholder, value in replace.items():
            line = line.replace(placeholder, value)
        out.append(line)
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"
