"""Artifacts built on the host, read back with real tools: the built-in image (e2fsprogs), the initramfs (cpio)."""

from __future__ import annotations

import subprocess

from microagent_engine import Engine
from microagent_engine.guest.initramfs import build_initramfs
from microagent_engine.guest.kernel import resolve_kernel
from microagent_engine.hostinfo import is_static_elf
from microagent_engine.images.builtin import builtin_image


def test_builtin_image_is_clean_ext4_with_busybox(engine: Engine) -> None:
    image = builtin_image(engine.state_dir)
    assert builtin_image(engine.state_dir) == image  # cached
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    ls = subprocess.run(["debugfs", "-R", "ls -l /bin", str(image)], capture_output=True, text=True).stdout
    assert "busybox" in ls
    stat = subprocess.run(["debugfs", "-R", "stat /tmp", str(image)], capture_output=True, text=True).stdout
    assert "Mode:  01777" in stat


def test_initramfs_has_agent_busybox_and_modules(engine: Engine) -> None:
    kernel = resolve_kernel(engine.state_dir)
    modules = engine.backend.guest_modules()
    path = build_initramfs(engine.state_dir, kernel, modules)
    assert build_initramfs(engine.state_dir, kernel, modules) == path  # cached by content hash
    listing = subprocess.run(["cpio", "-it"], stdin=open(path, "rb"), capture_output=True, text=True).stdout.split()
    assert "init" in listing and "bin/busybox" in listing and "dev/console" in listing
    order = subprocess.run(["cpio", "-i", "--to-stdout", "modules/order"], stdin=open(path, "rb"),
                           capture_output=True, text=True).stdout.split()
    names = [p.rsplit("/", 1)[1] for p in order]
    # dependencies come before their users
    assert names.index("virtio.ko") < names.index("virtio_mmio.ko") < names.index("virtio_blk.ko") or \
        names.index("virtio_ring.ko") < names.index("virtio_mmio.ko")
    assert "virtio_console.ko" in names and "virtio_blk.ko" in names
    assert all(f"modules/{n}" in listing for n in names)


def test_kernel_is_uncompressed_pvh_elf(engine: Engine) -> None:
    kernel = resolve_kernel(engine.state_dir)
    assert kernel.path.read_bytes()[:4] == b"\x7fELF"
    assert kernel.release.endswith("-cloud-amd64")
    assert is_static_elf(kernel.path)
