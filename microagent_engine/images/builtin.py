"""The built-in images, which need no registry (one place for their names):

- ``builtin`` (also ``builtin:latest``, ``microagent/builtin``): a tiny rootfs made from the host's busybox-static.
- ``builtin:python``: CPython 3 with ipykernel, numpy, pandas and matplotlib, built on first need from Debian
  packages with mmdebstrap (see :mod:`.debian`); users may add Debian packages to it (``--packages``).

The names live in the ``builtin`` repository so that they cannot be taken for Docker Hub images: ``python`` and
``python:3.12`` keep meaning ``docker.io/library/python``.
"""

from __future__ import annotations

import difflib

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgument
from ..fsutil import build_once
from ..guest.initramfs import busybox_path
from ..storage.ext4 import make_ext4
from .debian import Recipe, debian_image, parse_packages
from .reference import BUILTIN_REF, PYTHON_REF

BUSYBOX_NAMES = ("builtin", "microagent/builtin", "builtin:latest")
PYTHON_NAMES = (PYTHON_REF,)
#: every name of a built-in image (completion and the magics' IMAGE-first form use it)
BUILTIN_NAMES = BUSYBOX_NAMES + PYTHON_NAMES
BASE_SIZE_MIB = 64

_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/resolv.conf": "nameserver 10.0.2.3\n",
    "etc/os-release": 'NAME="microagent builtin"\nID=microagent-builtin\nPRETTY_NAME="microagent builtin (busybox)"\n',
    "etc/profile": "export PS1='\\h:\\w\\$ '\n",
}

#: matplotlib's font cache is built once into the image (35 s under TCG otherwise) in MPLCONFIGDIR, and its
#: default backend is Agg through /etc/matplotlibrc (not MPLBACKEND: ipykernel only installs its inline
#: backend when MPLBACKEND is unset)
MPLCONFIGDIR = "/var/cache/matplotlib"
PYTHON_RECIPE = Recipe(
    name="python",
    packages=("python3", "python3-ipykernel", "python3-numpy", "python3-pandas", "python3-matplotlib",
              "python3-scipy",
              # pip (a notebook's %pip install, through --allow @pypi), and what notebooks reach for first:
              # requests, tqdm, jinja2 (pandas' Styler); ca-certificates comes with them
              "python3-pip", "python3-requests", "python3-tqdm", "python3-jinja2",
              "procps"),  # ps, free, top, pkill (as the busybox image has): not in minbase
    hooks=(
        'sed -i -E "s/^#?[[:space:]]*backend[[:space:]]*:.*/backend: Agg/" "$1/etc/matplotlibrc"',
        # the VM is the sandbox: pip installs into the system Python without --break-system-packages (PEP 668)
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        f'chroot "$1" env HOME=/root MPLCONFIGDIR={MPLCONFIGDIR} python3 -c "import matplotlib.pyplot"',
    ),
    files=tuple((rel, _FILES[rel]) for rel in ("etc/hosts", "etc/resolv.conf"))
    + (("etc/hostname", "microagent\n"),),
    env=(("MPLCONFIGDIR", MPLCONFIGDIR),),
)

Progress = Callable[[str], None]


@dataclass
class BuiltinBase:
    """A built-in image's base ext4, its canonical name and the environment it brings."""

    ref: str
    path: Path
    env: dict[str, str] = field(default_factory=dict)
    size_mib: int = BASE_SIZE_MIB


def is_builtin(ref: str | None) -> bool:
    return ref is None or ref in BUILTIN_NAMES


def check_builtin_name(ref: str | None) -> None:
    """InvalidArgument for a ``builtin…`` name that is no built-in image (a typo would otherwise go to Docker
    Hub as ``docker.io/library/builtin``)."""
    if ref is not None and ref.split(":", 1)[0] in ("builtin", "microagent/builtin") and ref not in BUILTIN_NAMES:
        close = difflib.get_close_matches(ref, BUILTIN_NAMES, n=1)
        hint = f"; did you mean {close[0]}?" if close else "."
        raise InvalidArgument(f"unknown built-in image {ref!r}{hint} The built-in images are "
                              f"{BUILTIN_REF} (busybox) and {PYTHON_REF}")


def canonical(ref: str | None) -> str:
    """The name a workspace records for the built-in image ``ref``."""
    return PYTHON_REF if ref in PYTHON_NAMES else BUILTIN_REF


def accepts_packages(ref: str | None) -> bool:
    """True for the images ``packages`` can be added to."""
    return ref in PYTHON_NAMES


def builtin_base(ref: str | None, state_dir: Path, packages: Iterable[str] = (),
                 progress: Progress | None = None) -> BuiltinBase:
    """The base ext4 of the built-in image ``ref`` (None = busybox), building it on first need."""
    extra = parse_packages(list(packages))
    if ref in PYTHON_NAMES:
        img = debian_image(state_dir, PYTHON_RECIPE, extra, progress)
        return BuiltinBase(PYTHON_REF, img.path, dict(img.env), img.size_mib)
    if extra:
        raise InvalidArgument(f"packages can only be added to the built-in Debian image ({PYTHON_REF}), not to "
                              f"{ref or BUILTIN_REF}; use --image {PYTHON_REF}, or install them in a setup step")
    return BuiltinBase(BUILTIN_REF, builtin_image(state_dir, progress))


def builtin_python_image(state_dir: Path, packages: Iterable[str] = (), progress: Progress | None = None) -> Path:
    """Path of the cached base ext4 of ``builtin:python`` (plus ``packages``), built on first need."""
    return builtin_base(PYTHON_REF, state_dir, packages, progress).path


def builtin_image(state_dir: Path, progress: Progress | None = None) -> Path:
    """Path of the cached base ext4 of the busybox built-in image, built once on first use (concurrent first
    uses wait for that one build)."""
    busybox = busybox_path()
    data = busybox.read_bytes()
    digest = hashlib.sha256(data + repr(sorted(_FILES.items())).encode()).hexdigest()[:16]

    def build(target: Path) -> None:
        if progress:
            progress(f"Building image {BUILTIN_REF} from the host's busybox (first use)")
        applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
        root = target.parent / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "dev", "proc", "sys", "run", "var/tmp",
                  "home"):
            (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
        os.chmod(root / "root", 0o700)
        (root / "bin/busybox").write_bytes(data)
        os.chmod(root / "bin/busybox", 0o755)
        for applet in applets:
            link = root / applet
            if link.exists() or applet == "bin/busybox":
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
        for rel, text in _FILES.items():
            (root / rel).write_text(text)
        make_ext4(target, BASE_SIZE_MIB, root, label="microagent")

    return build_once(state_dir / "images" / f"builtin-{digest}.ext4", build, f"image {BUILTIN_REF}", progress)
