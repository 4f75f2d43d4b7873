"""A small client of the Registry HTTP API v2 on urllib, and the content-addressed blob cache it fills.

Pulls follow the anonymous (or Basic-authenticated) Bearer token flow of ``WWW-Authenticate``, pick one platform
out of manifest lists / OCI indexes, follow redirects (blobs often answer 307, and the token is not sent on), and
verify the digest and size of every manifest and blob. Blobs land in ``<state_dir>/blobs/sha256/<hex>`` through a
``.partial`` file that later pulls resume with ``Range:``; a per-digest flock makes concurrent pulls share work.

Credentials come from ``$MICROAGENT_AUTH_FILE`` or Docker's ``config.json``: ``{"auths": {"HOST": {"auth":
base64("user:password")}}}`` (``username``/``password`` keys work too).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import HostError, NotFound
from ..fsutil import file_lock, open_private
from ..errors import AuthError, ImageError
from .reference import DOCKER_DOMAIN, DOCKER_IO_ENV, PYTHON_REF, ImageRef, docker_io_endpoint

AUTH_FILE_ENV = "MICROAGENT_AUTH_FILE"
DOCKER_INDEX_HOST = "index.docker.io"  # the key ``docker login`` stores Docker Hub credentials under
DEFAULT_PLATFORM = "linux/amd64"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 * 1024 * 1024
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def from_json(cls, d: dict[str, Any], what: str) -> "Descriptor":
        digest, size = d.get("digest", ""), d.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest) or not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: descriptor has an unsupported digest {digest!r} or size {size!r} "
                             "(only sha256 is supported)")
        return cls(str(d.get("mediaType", "")), digest, size)


@dataclass
class ResolvedImage:
    """One platform's image: its manifest digest (the image id), config blob and layer descriptors."""

    id: str
    config: dict[str, Any]
    layers: list[Descriptor]
    platform: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- manifest helpers shared with local sources ---------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def media_type(doc: dict[str, Any], header: str = "") -> str:
    mt = doc.get("mediaType") or header.split(";")[0].strip()
    if not mt and "manifests" in doc:
        mt = OCI_INDEX
    elif not mt and "layers" in doc:
        mt = OCI_MANIFEST
    return mt


def platform_string(p: dict[str, Any]) -> str:
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return s + (f"/{p['variant']}" if p.get("variant") else "")


def select_platform(index: dict[str, Any], platform: str, what: str) -> Descriptor:
    """The index entry for ``platform`` (``os/arch[/variant]``), skipping attestation manifests."""
    want = platform.split("/")
    seen: list[str] = []
    for entry in index.get("manifests") or []:
        p = entry.get("platform") or {}
        if p.get("os") == "unknown" or p.get("architecture") == "unknown":
            continue  # buildkit attestations
        if entry.get("mediaType") not in MANIFEST_TYPES + INDEX_TYPES + ("",):
            continue
        seen.append(platform_string(p))
        if p.get("os") == want[0] and p.get("architecture") == want[1] and (
                len(want) < 3 or p.get("variant") == want[2]):
            return Descriptor.from_json(entry, what)
    raise NotFound(f"{what} has no image for platform {platform} (it has: {', '.join(seen) or 'none'}); "
                   "pick a reference that supports it")


def layers_of(manifest: dict[str, Any], what: str) -> tuple[Descriptor, list[Descriptor]]:
    if manifest.get("schemaVersion") != 2 or "config" not in manifest:
        raise ImageError(f"{what}: unsupported manifest (schema {manifest.get('schemaVersion')!r}); only Docker "
                         "v2 schema 2 and OCI manifests are supported, re-push the image with a current tool")
    config = Descriptor.from_json(manifest["config"], what)
    layers = [Descriptor.from_json(d, what) for d in manifest.get("layers") or []]
    for d in layers:
        if "nondistributable" in d.media_type or "foreign" in d.media_type:
            raise ImageError(f"{what}: layer {d.digest} is a foreign (non-distributable) layer; not supported")
    return config, layers


def image_platform(config: dict[str, Any]) -> str:
    return platform_string({k: config.get(k) for k in ("os", "architecture", "variant")})


class HashingReader:
    """Reads through ``fh`` hashing and counting; ``check()`` raises unless digest and size match."""

    def __init__(self, fh: BinaryIO, digest: str, size: int, what: str) -> None:
        self.fh, self.digest, self.size, self.what = fh, digest, size, what
        self.h = hashlib.sha256()
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.h.update(data)
        self.n += len(data)
        return data

    def check(self) -> None:
        while self.read(1 << 20):
            pass
        got = "sha256:" + self.h.hexdigest()
        if self.n != self.size or got != self.digest:
            raise ImageError(f"{self.what}: blob {self.digest} is corrupt (got {self.n} bytes with digest {got}, "
                             f"expected {self.size} bytes); the source is damaged, rebuild or re-push it")


# --- progress --------------------------------------------------------------------------------------------------

class ProgressBar:
    """A one-line byte counter on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int, start: int = 0) -> None:
        self.label, self.total, self.done = label, total, start
        self.enabled = total >= 1 << 20 and sys.stderr.isatty()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled and (time.monotonic() - self._last > 0.1 or self.done >= self.total):
            self._last = time.monotonic()
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done / 1e6:7.1f}/{self.total / 1e6:.1f} MB")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- blob cache ------------------------------------------------------------------------------------------------

class BlobCache:
    """Verified blobs under ``root/sha256/<hex>``; partial downloads are ``root/sha256/.<hex>.partial``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest.split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def digests(self) -> list[str]:
        d = self.root / "sha256"
        return sorted(f"sha256:{p.name}" for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    @contextlib.contextmanager
    def locked(self, digest: str) -> Iterator[None]:
        with file_lock(self.root / "locks" / f"{digest.split(':', 1)[1]}.lock", what=f"blob {digest}"):
            yield

    def store(self, desc: Descriptor, fetch: Callable[[int], tuple[BinaryIO, bool]], label: str,
              attempts: int = 3) -> Path:
        """Fill the cache with ``desc`` via ``fetch(offset) -> (stream, resumed)``; resumes ``.partial`` files."""
        from http.client import HTTPException

        final = self.path(desc.digest)
        if final.exists():
            return final
        with self.locked(desc.digest):
            if final.exists():
                return final
            partial = final.with_name(f".{final.name}.partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(attempts):
                try:
                    self._download(desc, partial, fetch, label)
                    break
                except ImageError:
                    with contextlib.suppress(FileNotFoundError):
                        partial.unlink()
                    raise
                except (OSError, HTTPException) as exc:  # dropped mid-stream: resume
                    if attempt == attempts - 1:
                        raise HostError(f"downloading {label} ({desc.digest}) failed: {exc}; run the command again "
                                        "to resume") from None
            check = HashingReader(open(partial, "rb"), desc.digest, desc.size, label)
            try:
                check.check()
            except ImageError:
                partial.unlink()
                raise
            finally:
                check.fh.close()
            os.replace(partial, final)
            return final

    @staticmethod
    def _download(desc: Descriptor, partial: Path, fetch: Callable[[int], tuple[BinaryIO, bool]], label: str) -> None:
        offset = partial.stat().st_size if partial.exists() else 0
        if offset >= desc.size:
            return  # complete (or too long: the digest check catches it)
        stream, resumed = fetch(offset)
        bar = ProgressBar(label, desc.size, offset if resumed else 0)
        try:
            with open_private(partial, "ab" if resumed else "wb") as out:
                written = offset if resumed else 0
                while chunk := stream.read(1 << 20):
                    written += len(chunk)
                    if written > desc.size:
                        raise ImageError(f"{label}: blob {desc.digest} is larger than the {desc.size} bytes its "
                                         "manifest declares; the registry or image is corrupt")
                    out.write(chunk)
                    bar.update(len(chunk))
            if written < desc.size:  # urllib reports a dropped connection as a short read
                raise ConnectionError(f"the connection closed after {written} of {desc.size} bytes")
        finally:
            stream.close()
            bar.close()


# --- credentials ----------------------------------------------------------------------------------------------

def auth_file() -> Path:
    """``$MICROAGENT_AUTH_FILE``, else ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    env = os.environ.get(AUTH_FILE_ENV)
    if env:
        return Path(env).expanduser()
    docker = os.environ.get("DOCKER_CONFIG")
    return (Path(docker).expanduser() if docker else Path.home() / ".docker") / "config.json"


def _host_of(key: str) -> str:
    key = key.strip()
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0]


def credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from the auth file, or None."""
    path = auth_file()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read registry credentials from {path} ({exc}); fix the file or point "
                        f"{AUTH_FILE_ENV} at another one") from None
    names = {registry}
    if registry == docker_io_endpoint():
        # credentials saved under docker.io (``docker login`` writes https://index.docker.io/v1/) apply to the
        # endpoint serving it (Docker Hub's, or the mirror $MICROAGENT_DOCKER_IO_REGISTRY names)
        names |= {DOCKER_DOMAIN, DOCKER_INDEX_HOST}
    for key, entry in (doc.get("auths") or {}).items():
        if _host_of(key) not in names or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthError(f"{path}: auths.{key}.auth is not base64 of 'user:password'; fix it") from None
            return user, pw
        if entry.get("username"):
            return str(entry["username"]), str(entry.get("password", ""))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}


# --- the client -----------------------------------------------------------------------------------------------

class RegistryClient:
    """Resolves references to manifests and fetches blobs into a :class:`BlobCache`."""

    def __init__(self, blobs: BlobCache, progress: Progress | None = None, platform: str = DEFAULT_PLATFORM,
                 timeout: float = 60.0) -> None:
        self.blobs = blobs
        self.progress = progress or (lambda _m: None)
        self.platform = platform
        self.timeout = timeout
        self._auth: dict[str, str] = {}  # registry -> Authorization header value
        import urllib.request  # with http.client and email: ~8 ms a command that contacts no registry skips

        self._opener = urllib.request.build_opener()

    # transport
    def _open(self, ref: ImageRef, url: str, headers: dict[str, str], what: str) -> Any:
        """GET ``url`` answering a 401 challenge once; raises NotFound/AuthError/HostError/ImageError."""
        import urllib.error
        import urllib.request

        for attempt in (0, 1):
            req = urllib.request.Request(url, headers=headers)
            if ref.registry in self._auth:
                req.add_unredirected_header("Authorization", self._auth[ref.registry])
            try:
                return self._opener.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 401 and attempt == 0:
                    self._authenticate(ref, exc.headers.get("WWW-Authenticate", ""))
                    continue
                self._http_error(ref, exc.code, what)
            except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                hint = (f"; offline, use a mirror ({DOCKER_IO_ENV}=host:port) or the built-in Python image "
                        f"(--image {PYTHON_REF})" if ref.domain == DOCKER_DOMAIN else "")
                raise HostError(f"cannot reach registry {ref.registry} ({reason}); check the address, that the "
                                f"registry is running and your network (plain-http registries must be listed in "
                                f"$MICROAGENT_INSECURE_REGISTRIES){hint}") from None
        raise AssertionError("unreachable")

    def _http_error(self, ref: ImageRef, code: int, what: str) -> None:
        if code in (401, 403):
            creds = credentials(ref.registry)
            hint = (f"the credentials for {ref.registry} in {auth_file()} were rejected; fix them" if creds else
                    f"no credentials for {ref.registry} in {auth_file()}; add auths.\"{ref.registry}\".auth "
                    f"(base64 of user:password) there or set $MICROAGENT_AUTH_FILE")
            raise AuthError(f"registry {ref.registry} denied access to {ref.repository} (HTTP {code}): the "
                            f"repository does not exist or needs credentials: {hint}")
        if code == 404:
            raise NotFound(f"{what} not found on {ref.registry} (HTTP 404); check the name and tag")
        raise ImageError(f"registry {ref.registry} answered HTTP {code} for {what}; try again later")

    def _authenticate(self, ref: ImageRef, challenge: str) -> None:
        import urllib.error
        import urllib.request

        scheme, params = parse_challenge(challenge)
        creds = credentials(ref.registry)
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        if scheme == "basic":
            if not basic:
                self._http_error(ref, 401, str(ref))
            self._auth[ref.registry] = basic  # type: ignore[assignment]
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"registry {ref.registry} asked for unsupported authentication {challenge!r}")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url)
        if basic:
            req.add_unredirected_header("Authorization", basic)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                doc = load_json(resp.read(MAX_MANIFEST), f"token answer of {params['realm']}")
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                self._http_error(ref, exc.code, str(ref))
            raise ImageError(f"token service {params['realm']} answered HTTP {exc.code}; try again later") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
            host = urllib.parse.urlsplit(params["realm"]).netloc
            raise HostError(f"cannot reach the token service {host} of registry {ref.registry} "
                            f"({getattr(exc, 'reason', exc)}); check your network") from None
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise AuthError(f"token service {params['realm']} returned no token")
        self._auth[ref.registry] = f"Bearer {token}"

    # manifests
    def _manifest(self, ref: ImageRef, reference: str) -> tuple[str, dict[str, Any], str]:
        what = f"image {ref}" if reference == ref.reference else f"manifest {reference} of {ref}"
        with self._open(ref, f"{ref.base_url}/manifests/{reference}", {"Accept": ACCEPT}, what) as resp:
            data = resp.read(MAX_MANIFEST + 1)
            ctype = resp.headers.get("Content-Type", "")
        if len(data) > MAX_MANIFEST:
            raise ImageError(f"{what}: manifest is larger than {MAX_MANIFEST} bytes; refusing it")
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise ImageError(f"{what}: the registry sent a manifest whose digest is {digest}; it is corrupt "
                             "or the registry is misbehaving")
        return digest, load_json(data, what), ctype

    def resolve(self, ref: ImageRef) -> ResolvedImage:
        """Manifest (digest-verified), platform choice and config blob of ``ref``."""
        self.progress(f"Resolving {ref}")
        digest, doc, ctype = self._manifest(ref, ref.reference)
        mt = media_type(doc, ctype)
        if mt in INDEX_TYPES:
            desc = select_platform(doc, self.platform, f"image {ref}")
            digest, doc, ctype = self._manifest(ref, desc.digest)
            mt = media_type(doc, ctype)
        if mt not in MANIFEST_TYPES:
            raise ImageError(f"image {ref}: unsupported manifest type {mt!r}; only Docker v2 schema 2 and OCI "
                             "images can be pulled")
        config_desc, layers = layers_of(doc, f"image {ref}")
        config = load_json(self.blob(ref, config_desc, "config").read_bytes(), f"config of image {ref}")
        return ResolvedImage(digest, config, layers, image_platform(config), str(ref.with_digest(digest)),
                             {"config_digest": config_desc.digest})

    # blobs
    def blob(self, ref: ImageRef, desc: Descriptor, label: str = "") -> Path:
        url = f"{ref.base_url}/blobs/{desc.digest}"

        def fetch(offset: int) -> tuple[BinaryIO, bool]:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp = self._open(ref, url, headers, f"blob {desc.digest} of {ref}")
            return resp, resp.status == 206

        return self.blobs.store(desc, fetch, label or desc.digest[7:19])
