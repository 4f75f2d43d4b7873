"""The built-in Python image (``builtin:python``, built from Debian packages with mmdebstrap), packages users add
to it, and docker.io's default endpoint. The image is built once per package set (see python_image_cache.py)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from python_image_cache import python_image_into

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument
from microagent_engine.fsutil import file_lock, write_json_atomic
from microagent_engine.images import debian, reference
from microagent_engine.images.builtin import MPLCONFIGDIR, PYTHON_RECIPE, PYTHON_REF
from microagent_engine.images.debian import parse_packages
from microagent_engine.spec import load_spec

pytestmark = pytest.mark.vm

#: a tiny package that is not in the image, with a program that proves it is installed
EXTRA_PACKAGE, EXTRA_COMMAND, EXTRA_OUTPUT = "hello", ["hello"], b"Hello, world!\n"


@pytest.fixture(scope="module")
def py_ws(engine: Engine, python_image: Path) -> Iterator[str]:
    name = "pyimg"
    engine.create(name, image=PYTHON_REF)
    engine.start(name)
    yield name
    engine.kill(name)
    engine.delete(name)


def test_image_is_cached_with_its_record(python_image: Path) -> None:
    meta = json.loads(python_image.with_suffix(".json").read_text())
    assert meta["recipe"] == "python" and "python3-pandas" in meta["packages"]
    assert meta["env"] == {"MPLCONFIGDIR": MPLCONFIGDIR}
    used = subprocess.run(["dumpe2fs", "-h", str(python_image)], capture_output=True, text=True,
                          check=True).stdout
    assert "Filesystem volume name:   microagent" in used
    print(f"\nimage: tar {meta['tarBytes'] / 1e6:.0f} MB, content {meta['contentBytes'] / 1e6:.0f} MB, "
          f"ext4 {meta['sizeMiB']} MiB, build {meta['buildSeconds']} s")


def test_python_stack_imports(engine: Engine, py_ws: str) -> None:
    r = engine.exec(py_ws, ["python3", "-c", "import numpy, pandas, matplotlib, ipykernel; print('ok')"])
    assert (r.status, r.exit_code, r.stdout) == ("exited", 0, b"ok\n"), r.stderr


def test_matplotlib_uses_the_baked_font_cache_and_agg(engine: Engine, py_ws: str) -> None:
    code = ("import matplotlib; import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.savefig('/tmp/p.png'); "
            "print(matplotlib.get_backend(), matplotlib.get_cachedir())")
    r = engine.exec(py_ws, ["python3", "-c", code])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().split() == ["agg", MPLCONFIGDIR]
    assert b"building the font cache" not in r.stderr  # baked into the image at build time
    assert engine.exec(py_ws, ["sh", "-c", "head -c 8 /tmp/p.png | od -c | head -1"]).stdout.startswith(
        b"0000000 211   P   N   G")


def test_shell_and_console_work_with_dash(engine: Engine, py_ws: str) -> None:
    info = engine.status(py_ws)
    assert info.state.readiness["shellReady"]["ready"], info.state.readiness["shellReady"]
    assert "/usr/bin/dash" in engine.console_send(py_ws, "readlink -f /bin/sh").splitlines()
    r = engine.exec(py_ws, ["sh", "-c", "hostname; cat /etc/resolv.conf; echo $HOME"])
    assert r.stdout.decode().split() == ["pyimg", "nameserver", "10.0.2.3", "/root"]


def test_user_added_package_is_installed(engine: Engine, state_dir: Path) -> None:
    python_image_into(state_dir, [EXTRA_PACKAGE])  # the shared build cache: built once per machine
    engine.create("pyextra", image=PYTHON_REF, packages=[EXTRA_PACKAGE], profile="tiny")
    try:
        engine.start("pyextra")
        r = engine.exec("pyextra", EXTRA_COMMAND)
        assert (r.exit_code, r.stdout) == (0, EXTRA_OUTPUT), r.stderr
        r = engine.exec("pyextra", ["python3", "-c", "import numpy; print(numpy.__name__)"])
        assert r.stdout == b"numpy\n"
    finally:
        engine.kill("pyextra")
        engine.delete("pyextra")


def test_packages_are_validated_and_only_for_the_debian_image(engine: Engine, tmp_path: Path) -> None:
    assert parse_packages("python3-scipy git,  git") == ("git", "python3-scipy")
    for bad in ("--allow-unauthenticated", "Foo", "a;b", "x" * 200):
        with pytest.raises(InvalidArgument, match="Debian package name"):
            parse_packages([bad])
    with pytest.raises(InvalidArgument, match="built-in Debian image"):
        engine.create("nopkg", packages=["hello"])  # the busybox image
    with pytest.raises(InvalidArgument, match="built-in Debian image"):
        engine.create("nopkg", image="docker.io/library/alpine:3.20", packages=["hello"])
    spec = tmp_path / "microagent.yaml"
    spec.write_text(f"image: {PYTHON_REF}\npackages: [python3-scipy, git]\n")
    assert load_spec(spec).workspace_spec().packages == ("git", "python3-scipy")


def test_docker_io_defaults_to_docker_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = reference.parse("python:3.12")
    monkeypatch.delenv(reference.DOCKER_IO_ENV, raising=False)
    assert (str(ref), ref.registry, ref.base_url) == (
        "docker.io/library/python:3.12", "registry-1.docker.io", "https://registry-1.docker.io/v2/library/python")
    monkeypatch.setenv(reference.DOCKER_IO_ENV, "127.0.0.1:5999")  # the override (a mirror) wins
    assert (ref.registry, ref.scheme) == ("127.0.0.1:5999", "http")
    monkeypatch.setenv(reference.DOCKER_IO_ENV, "not a host/")
    with pytest.raises(InvalidArgument, match=reference.DOCKER_IO_ENV):
        _ = ref.registry


def test_guest_timings(engine: Engine, python_image: Path) -> None:
    """Not asserted (no timed assertions): boot-to-exec-ready and import time under this host's accelerator."""
    engine.create("pytime", image=PYTHON_REF)
    try:
        t0 = time.monotonic()
        engine.start("pytime")
        ready = time.monotonic() - t0
        t1 = time.monotonic()
        r = engine.exec("pytime", ["python3", "-c", "import pandas, matplotlib.pyplot"])
        imports = time.monotonic() - t1
        assert r.exit_code == 0, r.stderr
        print(f"\nboot to exec-ready {ready:.1f} s; python3 -c 'import pandas, matplotlib.pyplot' {imports:.1f} s "
              f"(accel {engine.status('pytime').state.accel})")
    finally:
        engine.kill("pytime")
        engine.delete("pytime")


def test_concurrent_users_wait_for_one_build(tmp_path: Path) -> None:
    """A second user of an image being built waits on the build's lock, then takes its result (no second build).
    The first builder is played by this test: it holds the lock and then writes the image, as a build does."""
    extra = ("never-built-by-this-test",)
    key = debian.cache_key(PYTHON_RECIPE, extra, debian.host_suite())
    images = tmp_path / "images"
    lock = images / "locks" / f"debian-{key}.lock"
    waiting, result = threading.Event(), []

    def progress(msg: str) -> None:
        if msg.startswith("Waiting for another process"):
            waiting.set()
        elif msg.startswith("Building image"):
            result.append("built twice")

    with file_lock(lock):
        user = threading.Thread(target=lambda: result.append(
            debian.debian_image(tmp_path, PYTHON_RECIPE, extra, progress)))
        user.start()
        assert waiting.wait(60)
        out = images / f"debian-{key}.ext4"
        out.write_bytes(b"")
        img = debian.DebianImage(out, "python", ["x"], {}, "s", 1, 1, 1, 1.0)
        write_json_atomic(out.with_suffix(".json"), img.to_json())
    user.join(60)
    assert len(result) == 1 and isinstance(result[0], debian.DebianImage) and result[0].path == out


def test_cli_packages_flag_errors(cli) -> None:
    proc = cli("create", "clipkg", "--packages", "hello")
    assert proc.returncode == 2 and b"built-in Debian image" in proc.stderr, proc.stderr
    proc = cli("create", "clipkg", "--image", PYTHON_REF, "--packages", "ok-name Bad;Name")
    assert proc.returncode == 2 and b"is not a Debian package name" in proc.stderr, proc.stderr
    assert cli("status", "clipkg").returncode == 1  # nothing was recorded
