"""OCI images from a real local registry booted as workspaces: layers, whiteouts, metadata and Env in the guest."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from microagent_engine import Engine

from registry_fixture import Registry, sample_image

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not os.path.exists("/usr/bin/docker-registry"):
        pytest.fail("docker-registry is missing; install it: apt-get install -y docker-registry", pytrace=False)
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    reg.push_image("team/app", "v1", sample_image())
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
