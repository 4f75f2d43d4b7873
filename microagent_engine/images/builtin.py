"""The built-in image: a tiny rootfs made from the host's busybox-static, so nothing needs a registry."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from ..guest.initramfs import busybox_path
from ..storage.ext4 import make_ext4

BUILTIN_NAMES = ("builtin", "microagent/builtin", "builtin:latest")
BUILTIN_REF = "builtin"
BASE_SIZE_MIB = 64

_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/resolv.conf": "nameserver 10.0.2.3\n",
    "etc/os-release": 'NAME="microagent builtin"\nID=microagent-builtin\nPRETTY_NAME="microagent builtin (busybox)"\n',
    "etc/profile": "export PS1='\\h:\\w\\$ '\n",
}


def is_builtin(ref: str | None) -> bool:
    return ref is None or ref in BUILTIN_NAMES


def builtin_image(state_dir: Path) -> Path:
    """Path of the cached base ext4 of the built-in image, building it on first use."""
    busybox = busybox_path()
    data = busybox.read_bytes()
    digest = hashlib.sha256(data + repr(sorted(_FILES.items())).encode()).hexdigest()[:16]
    out = state_dir / "images" / f"builtin-{digest}.ext4"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".builtin-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "dev", "proc", "sys", "run", "var/tmp", "home"):
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
        make_ext4(out, BASE_SIZE_MIB, root, label="microagent")
    return out
