"""OCI images from a real local registry booted as workspaces: layers, whiteouts, metadata and Env in the guest."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from microagent_engine import Engine

from registry_fixture import LAYER_GZIP, Image, Registry, debian_rootfs_tar, gz, sample_image, sha

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not os.path.exists("/usr/bin/docker-registry"):
        pytest.fail("docker-registry is missing; install it: apt-get install -y docker-registry", pytrace=False)
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    reg.push_image("team/app", "v1", sample_image())
    layer = debian_rootfs_tar(tmp_path_factory.mktemp("debian"))
    reg.push_image("debian/small", "bookworm", Image([(LAYER_GZIP, gz(layer))], diff_ids=[sha(layer)],
                                                     env=["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]))
    yield reg
    reg.stop()


def test_image_boots_with_its_layers_and_env(engine: Engine, cli, registry: Registry) -> None:
    ref = f"{registry.host}/team/app:v1"
    proc = cli("pull", ref)
    assert proc.returncode == 0, proc.stderr
    script = ("busybox cat /etc/os-release; busybox ls /opt/old; busybox test -e /etc/removeme || echo removed; "
              "busybox stat -c '%a %u' /usr/bin/su-test /home/user/file; echo $GREETING; busybox pwd")
    proc = cli("run", "--delete", "--profile", "tiny", ref, "--", "/bin/sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [
        "ID=testupper",      # the upper layer's file wins
        "new",               # opaque whiteout hid the lower layer's a and b
        "removed",           # .wh.removeme deleted the lower layer's file
        "4755 0", "640 1000",  # setuid and owners survive into the guest
        "hello",             # the image's Env
        "/root",             # the image's WorkingDir is the default cwd
    ]
    listing = cli("images").stdout.decode()
    assert ref in listing
    assert cli("images", "prune").returncode == 0
    assert ref not in cli("images").stdout.decode()  # no workspace uses it any more


def test_debian_image_runs_python_cell(engine: Engine, cli, registry: Registry) -> None:
    """A small Debian rootfs (packages unpacked from the host's apt) runs bash and a Python script from stdin."""
    ref = f"{registry.host}/debian/small:bookworm"
    proc = cli("run", "--delete", "--profile", "tiny", ref, "--", "python3", "-",
               input=b"import sys, platform\nprint('py', sys.version_info[:2], platform.system())\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"py (3, 11) Linux\n"
    proc = cli("run", "--delete", "--profile", "tiny", ref, "--", "bash", "-c",
               "echo ${BASH_VERSINFO[0]}; cat /etc/debian_version | cut -d. -f1; ls /root")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["5", "12"]


def test_commit_then_boot_the_committed_image(engine: Engine, cli) -> None:
    engine.create("sculpt", profile="tiny", env={"ROLE": "sculptor"})
    engine.start("sculpt")
    engine.exec("sculpt", ["sh", "-c", "mkdir -p /opt/tool && echo v1 > /opt/tool/VERSION && "
                                       "chmod 4750 /opt/tool/VERSION && ln /opt/tool/VERSION /opt/tool/hard && "
                                       "ln -s /opt/tool/VERSION /opt/tool/soft"])
    proc = cli("commit", "sculpt", "local/sculpt:v1")
    assert proc.returncode != 0 and b"halt it first" in proc.stderr  # refused while running
    engine.halt("sculpt")
    proc = cli("commit", "sculpt", "local/sculpt:v1")
    assert proc.returncode == 0, proc.stderr
    proc = cli("run", "--delete", "--profile", "tiny", "local/sculpt:v1", "--", "sh", "-c",
               "cat /opt/tool/soft; stat -c '%a %h' /opt/tool/VERSION; echo $ROLE")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split("\n")[:3] == ["v1", "4750 2", "sculptor"]
    engine.delete("sculpt")
