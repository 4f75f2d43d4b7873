"""Image references: ``[registry/]repository[:tag][@sha256:digest]`` with Docker's normalisation.

``python:3.12`` means ``docker.io/library/python:3.12``. docker.io's registry API is served by Docker Hub's
standard endpoint ``registry-1.docker.io`` (with the token flow its ``WWW-Authenticate`` header names), as every
OCI client does; ``$MICROAGENT_DOCKER_IO_REGISTRY`` (``host[:port]``) overrides it, e.g. for a mirror. The first
path component is a registry when it contains ``.`` or ``:`` or is ``localhost``. Registries on 127.0.0.1, ::1 and
localhost, and those listed in ``$MICROAGENT_INSECURE_REGISTRIES`` (``host:port,...``), are spoken to over plain
http; every other registry over https.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import AuthError, ImageError, InvalidArgument, MicroagentError  # noqa: F401 (re-exported)

#: the built-in images' canonical names (built by images/builtin.py, never pulled)
BUILTIN_REF = "builtin"
PYTHON_REF = "builtin:python"

INSECURE_ENV = "MICROAGENT_INSECURE_REGISTRIES"
DOCKER_DOMAIN = "docker.io"
DOCKER_IO_ENV = "MICROAGENT_DOCKER_IO_REGISTRY"
#: the registry API endpoint of docker.io (Docker Hub), used unless $MICROAGENT_DOCKER_IO_REGISTRY names another
DOCKER_IO_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. ``domain`` is what users see; ``registry`` is the host the API lives on."""

    domain: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        return docker_io_endpoint() if self.domain == DOCKER_DOMAIN else self.domain

    @property
    def reference(self) -> str:
        """What goes in ``/v2/<name>/manifests/<reference>``: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def scheme(self) -> str:
        return "http" if is_insecure(self.registry) else "https"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.registry}/v2/{self.repository}"

    def __str__(self) -> str:
        out = f"{self.domain}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: str) -> "ImageRef":
        return ImageRef(self.domain, self.repository, self.tag, digest)


def docker_io_endpoint() -> str:
    """The host[:port] serving docker.io's registry API: ``$MICROAGENT_DOCKER_IO_REGISTRY``, else Docker Hub's."""
    endpoint = os.environ.get(DOCKER_IO_ENV, "").strip()
    if endpoint and not _HOST_RE.match(endpoint):
        raise InvalidArgument(f"{DOCKER_IO_ENV}={endpoint!r} is not a host[:port]; set it to your mirror's "
                              f"registry host (e.g. mirror.example:5000) or unset it to use Docker Hub")
    return endpoint or DOCKER_IO_ENDPOINT


def is_insecure(host: str) -> bool:
    """True for registries reached over plain http: loopback hosts and ``$MICROAGENT_INSECURE_REGISTRIES``."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name in ("localhost", "127.0.0.1", "[::1]") or name.startswith("127."):
        return True
    listed = {h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",") if h.strip()}
    return host in listed or name in listed


def parse(ref: str) -> ImageRef:
    """Parse and normalise ``ref``; InvalidArgument saying what is wrong with it otherwise."""
    text = ref.strip()
    if not text:
        raise InvalidArgument("image reference is empty; give one like docker.io/library/alpine:3.20")
    if "://" in text:
        scheme = text.split("://")[0]
        raise InvalidArgument(f"image reference {ref!r} must not contain a scheme; drop the '{scheme}://'")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidArgument(
                f"image reference {ref!r}: digest must be sha256: followed by 64 lowercase hex digits")
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"image reference {ref!r}: invalid tag {tag!r} (letters, digits, '_', '.', '-')")
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        domain, repo = first, rest
        if not _HOST_RE.match(domain):
            raise InvalidArgument(f"image reference {ref!r}: invalid registry host {domain!r}")
    else:
        domain, repo = DOCKER_DOMAIN, text
    if domain == DOCKER_DOMAIN and "/" not in repo:
        repo = f"library/{repo}"
    if not _REPO_RE.match(repo):
        raise InvalidArgument(
            f"image reference {ref!r}: invalid repository {repo!r} (lowercase letters, digits and separators . _ - /)")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(domain, repo, tag, digest)
