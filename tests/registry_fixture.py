"""Test helpers: a real registry (Debian's docker-registry) on 127.0.0.1, a pusher, layer builders, and a small
token-auth front (a real Bearer challenge + token service in front of the registry, answering blob GETs with
307 redirects to the registry itself)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jupyter_conftest_helpers import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_600_000_000
DIR_MTIME = 1_000_000_000



def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """``docker-registry serve`` with filesystem storage in ``root``; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, root: Path) -> None:
        if not os.path.exists(REGISTRY_BIN):
            raise RuntimeError("docker-registry is missing; install it: apt-get install -y docker-registry")
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = root / "storage"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Registry":
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n")
        self.log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "registry.log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()

    def blob_file(self, digest: str) -> Path:
        h = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"

    # pushing
    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(req) as resp:
            loc = resp.headers["Location"]
        if loc.startswith("/"):
            loc = f"http://{self.host}{loc}"
        loc += ("&" if "?" in loc else "?") + f"digest={digest}"
        req = urllib.request.Request(loc, method="PUT", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 201, resp.status
        return digest

    def push_manifest(self, repo: str, ref: str, doc: dict[str, Any]) -> str:
        data = json.dumps(doc, sort_keys=True).encode()
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{ref}", method="PUT", data=data,
                                     headers={"Content-Type": doc["mediaType"]})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 201, resp.status
        return sha(data)

    def push_image(self, repo: str, tag: str | None, image: "Image") -> str:
        """Push ``image``'s blobs and manifest; returns the manifest digest."""
        for blob in [image.config_bytes] + [data for _, data in image.layers]:
            self.push_blob(repo, blob)
        doc = image.manifest()
        digest = sha(json.dumps(doc, sort_keys=True).encode())
        return self.push_manifest(repo, tag or digest, doc)


# --- images ------------------------------------------------------------------------------------------------------

@dataclass
class Image:
    layers: list[tuple[str, bytes]]  # (media type, blob)
    arch: str = "amd64"
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/bin:/bin", "GREETING=hello"])
    diff_ids: list[str] = field(default_factory=list)
    docker: bool = False  # Docker v2 schema 2 media types instead of OCI

    @property
    def config(self) -> dict[str, Any]:
        return {"architecture": self.arch, "os": "linux",
                "config": {"Env": self.env, "Cmd": ["/bin/sh"], "WorkingDir": "/root", "User": "0:0"},
                "rootfs": {"type": "layers", "diff_ids": self.diff_ids}}

    @property
    def config_bytes(self) -> bytes:
        return json.dumps(self.config, sort_keys=True).encode()

    def manifest(self) -> dict[str, Any]:
        if self.docker:
            return {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                    "config": {"mediaType": DOCKER_CONFIG, "digest": sha(self.config_bytes),
                               "size": len(self.config_bytes)},
                    "layers": [{"mediaType": DOCKER_LAYER, "digest": sha(d), "size": len(d)} for _, d in self.layers]}
        return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha(self.config_bytes), "size": len(self.config_bytes)},
                "layers": [{"mediaType": mt, "digest": sha(d), "size": len(d)} for mt, d in self.layers]}


def tar_bytes(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            if isinstance(e, tuple):
                e[0].size = len(e[1])
                tf.addfile(e[0], io.BytesIO(e[1]))
            else:
                tf.addfile(e)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, uid: int = 0, gid: int = 0,
          linkname: str = "", mtime: int = MTIME, **extra: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.linkname, ti.mtime = kind, mode, uid, gid, linkname, mtime
    for k, v in extra.items():
        setattr(ti, k, v)
    return ti


def d(name: str, mode: int = 0o755, **kw: Any) -> tarfile.TarInfo:
    return entry(name, tarfile.DIRTYPE, mode, **kw)


def f(name: str, data: bytes, mode: int = 0o644, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return entry(name, tarfile.REGTYPE, mode, **kw), data


def base_layer_tar() -> bytes:
    """busybox plus files exercising owners, modes, setuid, links, devices, xattrs."""
    busybox = Path("/bin/busybox").read_bytes()
    xattr = entry("etc/xattr-file", mode=0o644, pax_headers={"SCHILY.xattr.user.test": "hello"})
    # a file capability (cap_net_bind_service=ep): a binary value in a security.* xattr
    cap = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)
    capfile = entry("usr/bin/cap-test", mode=0o755,
                    pax_headers={"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")})
    return tar_bytes([
        d("./"), d("bin"), d("etc", mtime=DIR_MTIME), d("usr"), d("usr/bin"), d("usr/lib"), d("tmp", 0o1777),
        d("root", 0o700), d("dev"), d("home"), d("home/user", 0o750, uid=1000, gid=1000),
        d("opt"), d("opt/old"), d("opt/keep"), d("locked", 0o555),
        f("bin/busybox", busybox, 0o755),
        entry("bin/sh", tarfile.SYMTYPE, 0o777, linkname="busybox"),
        entry("bin/ls", tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"),
        entry("lib", tarfile.SYMTYPE, 0o777, linkname="usr/lib"),
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        f("etc/group", b"root:x:0:\nuser:x:1000:\n"),
        f("etc/os-release", b"ID=testbase\n"),
        f("etc/hosts", b"127.0.0.1 localhost\n"),
        entry("etc/hosts.hard", tarfile.LNKTYPE, 0o644, linkname="etc/hosts"),
        f("etc/removeme", b"gone soon\n"),
        f("etc/secret", b"s3cret\n", 0o000),
        (xattr, b"x\n"), (capfile, b"#!/bin/sh\n"),
        f("usr/bin/su-test", b"#!/bin/sh\n", 0o4755),
        f("usr/bin/sg-test", b"#!/bin/sh\n", 0o2755, gid=50),
        f("home/user/file", b"mine\n", 0o640, uid=1000, gid=1000),
        f("home/user/with space", b"spaced\n", 0o600, uid=1000, gid=1000),
        entry("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
        entry("dev/loop0", tarfile.BLKTYPE, 0o660, gid=6, devmajor=7, devminor=0),
        entry("dev/fifo", tarfile.FIFOTYPE, 0o644),
        f("opt/old/a", b"a\n"), f("opt/old/b", b"b\n"), f("opt/keep/x", b"x\n"),
        f("locked/inside", b"in\n", 0o444),
    ])


def upper_layer_tar() -> bytes:
    """Whiteouts (plain and opaque, with a same-layer sibling before the marker) and writes via a symlink."""
    return tar_bytes([
        d("etc", mtime=DIR_MTIME),
        entry("etc/.wh.removeme", mode=0o644),
        f("etc/os-release", b"ID=testupper\n"),
        d("opt/old"),
        f("opt/old/new", b"new\n"),
        entry("opt/old/.wh..wh..opq", mode=0o644),
        f("lib/libfoo.so", b"ELF?\n"),
        f("locked/added", b"added\n"),
    ])


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def zstd(data: bytes) -> bytes:
    return subprocess.run([shutil.which("zstd") or "zstd", "-q", "-c", "-1"], input=data, capture_output=True,
                          check=True).stdout


def sample_image(arch: str = "amd64") -> Image:
    base, upper = base_layer_tar(), upper_layer_tar()
    return Image([(LAYER_GZIP, gz(base)), (LAYER_ZSTD, zstd(upper))], arch=arch, diff_ids=[sha(base), sha(upper)])


def write_oci_layout(path: Path, image: Image, tag: str = "v1") -> str:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    manifest = json.dumps(image.manifest(), sort_keys=True).encode()
    for data in [image.config_bytes, manifest] + [b for _, b in image.layers]:
        (blobs / sha(data)[7:]).write_bytes(data)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (path / "index.json").write_text(json.dumps(index))
    return sha(manifest)


def write_docker_archive(path: Path, image: Image, repo_tag: str = "test/img:v1") -> None:
    """Classic ``docker save`` layout: <id>/layer.tar (uncompressed), <config>.json, manifest.json."""
    raw_layers = [base_layer_tar(), upper_layer_tar()]
    files: list[tuple[str, bytes]] = []
    names = []
    for i, raw in enumerate(raw_layers):
        names.append(f"{i:064x}/layer.tar")
        files.append((names[-1], raw))
    cfg = image.config_bytes
    files.append((f"{sha(cfg)[7:]}.json", cfg))
    files.append(("manifest.json", json.dumps([{"Config": f"{sha(cfg)[7:]}.json", "RepoTags": [repo_tag],
                                                "Layers": names}]).encode()))
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


# --- token auth front ----------------------------------------------------------------------------------------------

class TokenFront:
    """Requires ``Bearer <token>`` on /v2/; /token hands one out for Basic ``user:password``; blobs answer 307."""

    TOKEN = "test-token-123"

    def __init__(self, backend: str, user: str = "alice", password: str = "s3cret") -> None:
        self.backend, self.basic = backend, "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, str]] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization", "")
                front.requests.append((self.path, auth))
                if self.path.startswith("/token"):
                    if auth != front.basic:
                        return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                    return self._send(200, json.dumps({"token": front.TOKEN}).encode(),
                                      {"Content-Type": "application/json"})
                if auth != f"Bearer {front.TOKEN}":
                    repo = self.path[4:].split("/manifests/")[0].split("/blobs/")[0]
                    return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                        "WWW-Authenticate": f'Bearer realm="http://{front.host}/token",service="test",'
                                            f'scope="repository:{repo}:pull"'})
                if "/blobs/" in self.path:
                    return self._send(307, b"", {"Location": f"http://{front.backend}{self.path}"})
                req = urllib.request.Request(f"http://{front.backend}{self.path}",
                                             headers={"Accept": self.headers.get("Accept", "")})
                try:
                    with urllib.request.urlopen(req) as resp:
                        body, code, hdrs = resp.read(), resp.status, resp.headers
                except urllib.error.HTTPError as exc:
                    body, code, hdrs = exc.read(), exc.code, exc.headers
                self._send(code, body, {k: hdrs[k] for k in ("Content-Type", "Docker-Content-Digest") if k in hdrs})

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "TokenFront":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FlakyFront:
    """Proxies a registry but cuts the first response of every blob off halfway (the connection drops)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.cut: set[str] = set()
        self.ranges: list[str] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k: self.headers[k] for k in ("Accept", "Range") if self.headers.get(k)}
                if "Range" in headers:
                    front.ranges.append(headers["Range"])
                req = urllib.request.Request(f"http://{front.backend}{self.path}", headers=headers)
                try:
                    with urllib.request.urlopen(req) as resp:
                        body, code, hdrs = resp.read(), resp.status, resp.headers
                except urllib.error.HTTPError as exc:
                    body, code, hdrs = exc.read(), exc.code, exc.headers
                self.send_response(code)
                for k in ("Content-Type", "Content-Range", "Docker-Content-Digest"):
                    if k in hdrs:
                        self.send_header(k, hdrs[k])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if "/blobs/" in self.path and self.path not in front.cut and len(body) > 1000:
                    front.cut.add(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FlakyFront":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- a small Debian rootfs ---------------------------------------------------------------------------------------

DEBIAN_PACKAGES = ("base-files", "libc6", "libgcc-s1", "bash", "dash", "libtinfo6", "coreutils", "libacl1", "libattr1",
                   "libgmp10", "libselinux1", "libpcre2-8-0", "libssl3", "python3.11-minimal",
                   "libpython3.11-minimal", "libexpat1", "zlib1g")


def debian_rootfs_tar(work: Path, packages: tuple[str, ...] = DEBIAN_PACKAGES) -> bytes:
    """A small Debian rootfs as a tar layer: the packages fetched with ``apt-get download`` (the host's apt
    sources) and unpacked with ``dpkg -x``, as the files would be after installation (no maintainer scripts)."""
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob("*.deb")):
        proc = subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", *packages], cwd=debs,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download failed (run 'apt-get update'): {proc.stderr[-500:]}")
    root = work / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    for d in ("root", "tmp", "proc", "sys", "dev", "run", "etc"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    os.symlink("python3.11", root / "usr/bin/python3")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path in sorted(root.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buf.getvalue()
