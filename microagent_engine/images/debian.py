"""Built-in images made from Debian packages with Debian's own tooling, offline from any container registry.

``mmdebstrap --variant=minbase`` resolves a package set (hard dependencies only, no Recommends) and installs it
from the host's apt sources for the host's release: the files apt itself reads (``/etc/apt/sources.list`` and
``/etc/apt/sources.list.d/*.list|*.sources``) are handed to mmdebstrap as they are, so no mirror is named here.
Documentation, man pages and translations are never unpacked (dpkg path excludes); a recipe's hooks run inside
the finished tree (e.g. to bake matplotlib's font cache), then test suites, logs and caches are trimmed.

The tar mmdebstrap writes is unpacked with the OCI layer code (so unprivileged builds keep owners and devices)
and packed into a base ext4, ``<state_dir>/images/debian-<key>.ext4`` with ``debian-<key>.json`` beside it.
``key`` hashes the builder version, the release, the recipe and the package set: each set is built once. A
per-key lock makes concurrent users wait for one build, which is made in a temp directory and renamed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HostError, ImageError, InvalidArgument
from ..fsutil import file_lock, private_dir, read_json, waiting_note, write_json_atomic
from ..hostinfo import require_tool
from ..storage.ext4 import make_ext4
from ..textsafe import safe_text
from .layers import LayerApplier, replay_into
from .sizes import image_size_mib, tree_size

Progress = Callable[[str], None]

#: bump when the build steps change in a way that changes the image (invalidates every cached build)
BUILDER_VERSION = "1"
#: what dpkg never unpacks (its copyright files are kept)
#: (/usr/share/unicode: 37 MB of Unicode tables that python3-fonttools depends on and nothing here reads)
DPKG_PATH_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
                      "/usr/share/lintian/*", "/usr/share/linda/*", "/usr/share/unicode/*")
DPKG_PATH_INCLUDES = ("/usr/share/doc/*/copyright",)
#: in every image: init-system-helpers needs "usrmerge | usr-is-merged", and usrmerge would pull in perl (46 MB)
BASE_PACKAGES = ("usr-is-merged",)
#: run last in the tree (``$1``): drop Python test suites (as the official python images do; py3compile needs
#: them present while packages are configured, so they go here and not as dpkg excludes), logs and caches
TRIM_HOOK = ('find "$1"/usr/lib/python3* -type d \\( -name tests -o -name test -o -name idle_test \\) '
             '-prune -exec rm -rf {} + ; '
             'rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/cache/ldconfig/* '
             '"$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin')
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}$")
MAX_EXTRA_PACKAGES = 64
SOURCES_LIST = Path("/etc/apt/sources.list")
SOURCES_DIR = Path("/etc/apt/sources.list.d")
OS_RELEASE = Path("/etc/os-release")
_APT_OPTION_RE = re.compile(r'^Acquire::(?:(?:https?|ftp)::Proxy(?:::[^ ]+)?|Check-Valid-Until) "[^"\n]*";$',
                            re.IGNORECASE)


@dataclass(frozen=True)
class Recipe:
    """What a built-in Debian image holds. ``hooks`` are shell commands run by mmdebstrap with the tree as
    ``$1`` (``chroot "$1" CMD`` runs CMD inside); ``files`` are written into the tree; ``env`` becomes the
    image's environment (a workspace's own env wins)."""

    name: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class DebianImage:
    """A built base ext4 and what went into it."""

    path: Path
    recipe: str
    packages: list[str]
    env: dict[str, str]
    suite: str
    size_mib: int
    content_bytes: int
    tar_bytes: int
    build_seconds: float
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "packages": self.packages, "env": self.env, "suite": self.suite,
                "sizeMiB": self.size_mib, "contentBytes": self.content_bytes, "tarBytes": self.tar_bytes,
                "buildSeconds": self.build_seconds, "created": self.created, "builderVersion": BUILDER_VERSION}

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path) -> DebianImage:
        return cls(path, str(d["recipe"]), list(d["packages"]), dict(d.get("env") or {}), str(d.get("suite", "")),
                   int(d["sizeMiB"]), int(d["contentBytes"]), int(d.get("tarBytes", 0)),
                   float(d.get("buildSeconds", 0.0)), str(d.get("created", "")))


def parse_packages(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Debian package names from ``"a b,c"`` or a list of names: validated, deduplicated, sorted."""
    if value is None:
        return ()
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    names: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgument(f"packages must be Debian package names (strings), got {type(item).__name__}")
        for name in item.replace(",", " ").split():
            if not PACKAGE_RE.match(name):
                raise InvalidArgument(f"{safe_text(name, 120)!r} is not a Debian package name (lowercase letters, "
                                      f"digits and + . -, starting with a letter or digit), e.g. python3-scipy")
            names.add(name)
    if len(names) > MAX_EXTRA_PACKAGES:
        raise InvalidArgument(f"{len(names)} packages given; at most {MAX_EXTRA_PACKAGES} can be added to an image")
    return tuple(sorted(names))


def host_suite() -> str:
    """The host's release code name (``VERSION_CODENAME`` of /etc/os-release), which the image is built from."""
    try:
        text = OS_RELEASE.read_text()
    except OSError:
        text = ""
    m = re.search(r'^VERSION_CODENAME="?([a-z0-9-]+)"?\s*$', text, re.MULTILINE)
    if not m:
        raise HostError("built-in Debian images are built from this host's apt sources with mmdebstrap, and this "
                        f"host's {OS_RELEASE} names no release (VERSION_CODENAME); use a Debian or Ubuntu host, "
                        "or an OCI image (--image docker.io/library/python:3.12)")
    return m.group(1)


def host_sources() -> list[Path]:
    """The apt source files the host's apt reads, in apt's order; HostError when there are none."""
    found = []
    if SOURCES_LIST.is_file() and any(ln.strip() and not ln.lstrip().startswith("#")
                                      for ln in SOURCES_LIST.read_text(errors="replace").splitlines()):
        found.append(SOURCES_LIST)
    if SOURCES_DIR.is_dir():
        found += sorted(p for p in SOURCES_DIR.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
    if not found:
        raise HostError(f"this host has no apt sources ({SOURCES_LIST}, {SOURCES_DIR}/*.sources) to build the "
                        "built-in image from; configure apt (apt-get update must work)")
    return found


def host_apt_options() -> list[str]:
    """The host's apt settings that decide whether its sources can be reached at all (proxies, and accepting a
    snapshot mirror's expired Release files), as ``apt.conf`` lines for mmdebstrap, which ignores the host's."""
    try:
        dump = subprocess.run([require_tool("apt-config"), "dump"], capture_output=True, text=True,
                              check=True).stdout
    except (HostError, OSError, subprocess.CalledProcessError):
        return []
    return [line for line in dump.splitlines() if _APT_OPTION_RE.match(line)]


def cache_key(recipe: Recipe, extra: tuple[str, ...], suite: str) -> str:
    """The hex key of a build: builder version, release, recipe and package set."""
    doc = {"builder": BUILDER_VERSION, "suite": suite, "recipe": recipe.name, "packages": sorted(recipe.packages),
           "extra": sorted(extra), "hooks": list(recipe.hooks), "files": sorted(recipe.files),
           "env": sorted(recipe.env), "excludes": DPKG_PATH_EXCLUDES, "includes": DPKG_PATH_INCLUDES,
           "trim": TRIM_HOOK, "base": BASE_PACKAGES}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def debian_image(state_dir: Path, recipe: Recipe, extra_packages: Iterable[str] = (),
                 progress: Progress | None = None) -> DebianImage:
    """The cached base ext4 of ``recipe`` plus ``extra_packages``, built on first need (takes minutes)."""
    say = progress or (lambda _m: None)
    extra = parse_packages(list(extra_packages))
    suite = host_suite()
    key = cache_key(recipe, extra, suite)
    images = private_dir(Path(state_dir) / "images")
    out, meta = images / f"debian-{key}.ext4", images / f"debian-{key}.json"
    cached = _load(out, meta)
    if cached:
        return cached
    what = f"image builtin:{recipe.name}"
    with file_lock(images / "locks" / f"debian-{key}.lock", what=what,
                   on_wait=lambda: say(waiting_note(what))):
        return _build_locked(images, key, recipe, extra, suite, say)


def _load(out: Path, meta: Path) -> DebianImage | None:
    if not (out.exists() and meta.exists()):
        return None
    try:
        return DebianImage.from_json(read_json(meta), out)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged record: rebuild


def _build_locked(images: Path, key: str, recipe: Recipe, extra: tuple[str, ...], suite: str,
                  say: Progress) -> DebianImage:
    out, meta = images / f"debian-{key}.ext4", images / f"debian-{key}.json"
    cached = _load(out, meta)
    if cached:  # built by the process we waited for
        return cached
    for stale in images.glob(f".debian-{key}-*"):  # left by a killed build (we hold its lock now)
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    packages = sorted(set(BASE_PACKAGES) | set(recipe.packages) | set(extra))
    label = f"builtin:{recipe.name}"
    say(f"Building image {label} from Debian {suite} packages (first use; this takes a few minutes): "
        f"{' '.join(packages)}")
    with tempfile.TemporaryDirectory(dir=images, prefix=f".debian-{key}-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        _mmdebstrap(tar, packages, recipe, suite, label, say)
        tar_bytes = tar.stat().st_size
        say(f"Unpacking {label} ({tar_bytes / 1e6:.0f} MB)")
        root = Path(tmp) / "root"
        root.mkdir()
        applier = LayerApplier(root)
        with open(tar, "rb") as fh:
            applier.apply(fh, f"the mmdebstrap output of {label}")
        applier.finish()
        tar.unlink()
        for rel, text in recipe.files:
            path = root / rel
            if path.is_symlink() or path.exists():
                path.unlink()  # never write through a symlink of the tree (it could point at the host)
            path.write_text(text)
        content, inodes = tree_size(root)
        size_mib = image_size_mib(content, inodes)
        say(f"Building base rootfs ({size_mib} MiB) of image {label}")
        ext4 = Path(tmp) / "rootfs.ext4"
        make_ext4(ext4, size_mib, root, label="microagent")
        replay_into(ext4, applier.replay)
        img = DebianImage(out, recipe.name, packages, dict(recipe.env), suite, size_mib, content, tar_bytes,
                          round(time.monotonic() - started, 1), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        os.replace(ext4, out)
        write_json_atomic(meta, img.to_json())  # written last: its presence means the image is complete
    say(f"Image {label} ready ({content / 1e6:.0f} MB in a {size_mib} MiB ext4) in {img.build_seconds:.0f} s")
    return img


def mmdebstrap_argv(tar: Path, packages: list[str], recipe: Recipe, suite: str) -> list[str]:
    """The mmdebstrap command line that writes ``tar``."""
    argv = [require_tool("mmdebstrap"), "--variant=minbase", "--format=tar", "--include=" + ",".join(packages)]
    argv += [f"--dpkgopt=path-exclude={p}" for p in DPKG_PATH_EXCLUDES]
    argv += [f"--dpkgopt=path-include={p}" for p in DPKG_PATH_INCLUDES]
    argv += [f"--aptopt={line}" for line in host_apt_options()]
    argv += [f"--customize-hook={h}" for h in (*recipe.hooks, TRIM_HOOK)]
    return argv + [suite, str(tar), *map(str, host_sources())]


def _mmdebstrap(tar: Path, packages: list[str], recipe: Recipe, suite: str, label: str, say: Progress) -> None:
    argv = mmdebstrap_argv(tar, packages, recipe, suite)
    log: list[str] = []
    # its own process group, so that an interrupt can reach all of mmdebstrap's processes (see below)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            log.append(line)
            del log[:-200]
            if line.startswith("I: running --customize-hook"):
                say(f"{label}: running build hooks (font cache, trimming)...")
            elif line.startswith("I: ") and not line.startswith(("I: using ", "I: automatically", "I: chroot ",
                                                                   "I: finding ", "I: removing tempdir")):
                say(f"{label}: {safe_text(line[3:], 200)}")
        rc = proc.wait()
    except BaseException:
        # Ctrl-C or a kernel interrupt: every mmdebstrap process must get the signal (the main one alone waits
        # for its helpers forever), and its stderr must be drained while it unmounts and removes its temp dir
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate()
        raise
    if rc == 0:
        return
    text = "\n".join(log)
    missing = sorted(set(re.findall(r"Unable to locate package (\S+)", text)))
    if missing:
        raise InvalidArgument(f"Debian {suite} has no package named {', '.join(missing)}; check the name "
                              f"(apt-cache search WORD on a Debian host) and try again")
    tail = safe_text("\n".join(ln for ln in log if ln.startswith(("E:", "W:")))[-800:] or text[-800:], 900,
                     newlines=True)
    raise ImageError(f"building image {label} with mmdebstrap failed (exit {rc}); check that apt-get update "
                     f"works on this host. Its errors:\n{tail}")
