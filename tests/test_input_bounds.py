"""Input bounds: the spec loader's limits, resource bounds against the host, spec host paths confined to the
spec's directory, whole-name matching, private files whatever the umask, and temp files swept on next use.

Creating a workspace builds a rootfs (no boot); one check reads the logs of the session's shared workspace.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from microagent_engine import Engine
from microagent_engine.config import MAX_DISK_MIB, validate_name, validate_resource
from microagent_engine.errors import InvalidArgument, SpecError
from microagent_engine.fsutil import open_private, private_dir, write_json_atomic
from microagent_engine.config import host_capacity
from microagent_engine.spec import MAX_ALIASES, MAX_DEPTH, MAX_SPEC_BYTES, load_spec

BAD_NAMES = ["nl\n", "a\nb", "\nlead", "tab\t", "cr\r", "nul\0x", "sp ace", "../up", "x/y", ".hidden", "-dash",
             "a" * 64, "", "ü"]


def spec_error(tmp_path: Path, text: str, **kwargs) -> str:
    path = tmp_path / "microagent.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path, **kwargs)
    assert str(path) in str(exc.value)
    return str(exc.value)


# ---- spec loader limits ---------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):  # 9^10 strings once expanded
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    t0 = time.monotonic()
    msg = spec_error(tmp_path, "\n".join(lines) + "\n")
    assert f"more than {MAX_ALIASES} YAML aliases" in msg
    # a few aliases that still expand past the node budget are refused too
    few = ["a: &a [" + ", ".join(["x"] * 200) + "]", "b: &b [" + ", ".join(["*a"] * 60) + "]",
           "c: [" + ", ".join(["*b"] * 3) + "]"]
    assert "expands to more than" in spec_error(tmp_path, "\n".join(few) + "\n")
    assert time.monotonic() - t0 < 30  # generous: the refusal must not expand anything


@pytest.mark.parametrize("text", ["setup: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "".join("  " * i + f"k{i}:\n" for i in range(200)),
                                  "env: " + "{a: " * 3000 + "x" + "}" * 3000 + "\n"])
def test_deep_nesting_is_a_spec_error_not_recursion(tmp_path: Path, text: str) -> None:
    assert f"nested more than {MAX_DEPTH} levels" in spec_error(tmp_path, text)


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    assert "NUL byte" in spec_error(tmp_path, "name: a\0b\n")
    assert "U+0007" in spec_error(tmp_path, "name: a\x07b\n")
    path = tmp_path / "microagent.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(path)
    path.write_bytes(b"name: x\n" + b"#" * MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match="at most"):
        load_spec(path)
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(Path("/dev/zero"))  # never read forever
    for text, match in (('image: "\\ud800"\n', "surrogate"), ("image: !!python/object/apply:os.system [id]\n",
                                                               "not supported"),
                        ("image: 2024-13-45\n", "cannot be read as timestamp"),
                        ("resources:\n  sizeMiB: " + "9" * 5000 + "\n", "characters"),
                        ("resources:\n  sizeMiB: 1" + ":59" * 20000 + "\n", "characters"),
                        ('"\\e[2J": 1\n', "not a field name")):
        assert match in spec_error(tmp_path, text), text


def test_resources_bounded_by_the_host(tmp_path: Path) -> None:
    ram_mib, cores = host_capacity()
    assert f"exceeds this host's RAM ({ram_mib} MiB)" in spec_error(tmp_path, f"resources:\n  memoryMiB: {ram_mib + 1}\n")
    assert "exceeds this host's CPU cores" in spec_error(tmp_path, f"resources:\n  cpuCount: {cores + 1}\n")
    msg = spec_error(tmp_path, "resources:\n  sizeMiB: 1000000000\n")
    assert "resources.sizeMiB" in msg and f"at most {MAX_DISK_MIB}" in msg
    ok = tmp_path / "microagent.yaml"
    ok.write_text(f"resources:\n  memoryMiB: {ram_mib}\n  cpuCount: {cores}\n  sizeMiB: {MAX_DISK_MIB}\n")
    assert load_spec(ok).cpus == cores
    for key, value in (("memory_mib", ram_mib + 1), ("cpus", 10 ** 6), ("size_mib", 2 ** 200), ("cpus", 0),
                       ("cpus", True), ("size_mib", "1")):
        with pytest.raises(InvalidArgument):
            validate_resource(key, value)


def test_engine_create_applies_the_same_bounds(engine: Engine, cli) -> None:
    ram_mib, cores = host_capacity()
    for kwargs in ({"memory_mib": ram_mib + 1}, {"cpus": cores + 1}, {"size_mib": 1_000_000_000}):
        with pytest.raises(InvalidArgument, match="exceeds"):
            engine.create("bounds-py", **kwargs)
    for flags in (["--memory", "100000000"], ["--cpus", "100000"], ["--size-mib", "1000000000"],
                  ["--size-mib", "9" * 400]):
        proc = cli("create", "bounds-cli", *flags)
        assert proc.returncode == 2 and b"exceeds" in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr
    proc = cli("volume", "create", "bounds-vol", "--size-mib", "1000000000")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr, proc.stderr
    assert not {"bounds-py", "bounds-cli"} & {i.name for i in engine.list()}


# ---- spec host paths ------------------------------------------------------------------------------------------


def test_spec_host_files_confined_to_its_directory(tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    (project / "ok.txt").write_text("fine\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    (project / "link.txt").symlink_to(secret)
    for src in ("/etc/shadow", "../../../../etc/shadow", "../secret.txt", "link.txt", str(secret), "~/.bashrc"):
        path = project / "microagent.yaml"
        path.write_text(f"files:\n  - src: {src}\n    dst: /x\n")
        with pytest.raises(SpecError, match="outside the spec's directory") as exc:
            load_spec(path)
        assert "--allow-host-files" in str(exc.value)
    path.write_text("bundles:\n  - {name: b, path: ../secret.tar, mountpoint: /b}\n")
    with pytest.raises(SpecError, match="outside the spec's directory"):
        load_spec(path)
    path.write_text("files:\n  - {src: ok.txt, dst: /ok}\n  - {src: ./sub/../ok.txt, dst: /ok2}\n")
    assert [f.src for f in load_spec(path).files] == [project / "ok.txt", project / "ok.txt"]
    path.write_text("files:\n  - src: ../secret.txt\n    dst: /x\n")
    assert load_spec(path, allow_host_files=True).files[0].src == secret  # the user's explicit opt-in


def test_cli_refuses_a_specs_host_file_unless_allowed(cli, engine: Engine, tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    spec = project / "microagent.yaml"
    spec.write_text("name: bounds-files\nprofile: tiny\nfiles:\n  - {src: ../secret.txt, dst: /secret}\n")
    proc = cli("create", "--file", str(spec))
    assert proc.returncode == 2 and b"outside the spec's directory" in proc.stderr, proc.stderr
    assert "bounds-files" not in {i.name for i in engine.list()}
    proc = cli("create", "--file", str(spec), "--allow-host-files")
    assert proc.returncode == 0, proc.stderr
    engine.delete("bounds-files")


# ---- names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_matched_whole(name: str, engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        validate_name(name)
    with pytest.raises(InvalidArgument):
        engine.create(name)
    with pytest.raises(InvalidArgument):
        engine.volumes.create(name, 16)
    for op in (engine.status, engine.delete, engine.start):
        with pytest.raises(InvalidArgument):
            op(name)
    spec = tmp_path / "microagent.yaml"
    spec.write_text(f"name: {json_quote(name)}\n")
    with pytest.raises(SpecError):
        load_spec(spec)
    assert not any(p.name.startswith(("nl", "a\n")) for p in engine.workspaces_dir.glob("*"))


def json_quote(text: str) -> str:
    import json

    return json.dumps(text)


def test_cli_refuses_newline_names(cli, engine: Engine) -> None:
    for args in (("create", "nl\n"), ("create", "--name", "nl\n"), ("status", "nl\n"), ("delete", "nl\n", "--yes"),
                 ("volume", "create", "nl\n"), ("start", "x\ny")):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert b"Traceback" not in proc.stderr and b"invalid" in proc.stderr, proc.stderr
    assert not [p for p in engine.workspaces_dir.glob("*") if "\n" in p.name]


# ---- private files --------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_helpers_ignore_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = private_dir(tmp_path / "a" / "b")
        assert mode(tmp_path / "a") == mode(d) == 0o700
        with open_private(d / "log", "ab") as fh:
            fh.write(b"x")
        write_json_atomic(d / "sub" / "r.json", {"a": 1})
        assert mode(d / "log") == mode(d / "sub" / "r.json") == 0o600 and mode(d / "sub") == 0o700
        (d / "old.log").write_bytes(b"")
        os.chmod(d / "old.log", 0o644)
        open_private(d / "old.log", "ab").close()  # a file made before the rule is tightened
        assert mode(d / "old.log") == 0o600
    finally:
        os.umask(old)


def test_state_files_are_private_whatever_the_umask(tmp_path: Path, engine: Engine) -> None:
    state = tmp_path / "state"
    old = os.umask(0)
    try:
        eng = Engine(state)
        eng._ctx.resolve_kernel = engine._ctx.resolve_kernel  # reuse the session's installed kernel
        state.mkdir()
        os.chmod(state, 0o755)  # a state dir made before the rule is tightened by the next create
        vol = eng.volumes.create("pv", 16)
        info = eng.create("pw", profile="tiny")
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert mode(state / "workspaces") == mode(info.dir.path) == mode(state / "volumes") == 0o700
    for f in (info.dir.rootfs, info.dir.config_file, info.dir.state_file, vol.path, state / "volumes" / "index.json"):
        assert mode(f) == 0o600, f


def test_logs_of_a_running_workspace_are_private(engine: Engine, shared_ws: str) -> None:
    ws = engine.status(shared_ws).dir
    assert mode(ws.path) == 0o700
    for f in (ws.serial_log, ws.vm_log, ws.supervisor_log, ws.rootfs, ws.state_file):
        assert mode(f) == 0o600, f


# ---- temp files swept on next use -----------------------------------------------------------------------------


def test_killed_volume_create_leftover_is_swept(engine: Engine) -> None:
    vols = engine.volumes.dir
    vols.mkdir(parents=True, exist_ok=True)
    leftover = vols / ".killed.ext4.tmp"  # what a `volume create killed` leaves mid-mkfs
    leftover.write_bytes(b"\0" * 4096)
    stale_json = vols / ".index.json.abc123"
    stale_json.write_text("{")
    engine.volumes.create("sweepvol", 16)
    try:
        assert not leftover.exists() and not stale_json.exists()
    finally:
        engine.volumes.delete("sweepvol")


def test_killed_workspace_create_leftover_is_swept(engine: Engine) -> None:
    wdir = engine.workspaces_dir
    wdir.mkdir(parents=True, exist_ok=True)
    dead = wdir / ".creating-gone-0000"  # a create killed after it took its lock
    dead.mkdir()
    (dead / ".lock").write_text("")
    (dead / ".rootfs.ext4.tmp").write_bytes(b"\0" * 4096)
    past = time.time() - 60
    os.utime(dead, (past, past))
    engine.create("sweep-ws", profile="tiny")
    try:
        assert not dead.exists()
    finally:
        engine.delete("sweep-ws")


# ---- --out values: an .npy payload is refused by its declared size before numpy allocates ---------------------
def _npy(header: dict, payload: bytes = b"") -> str:
    import base64
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, header)
    return base64.b64encode(buf.getvalue() + payload).decode()


@pytest.mark.parametrize(("header", "payload", "match"), [
    ({"descr": "<f8", "fortran_order": False, "shape": (2**40,)}, b"", "limit"),           # 8 TiB declared
    ({"descr": "|V0", "fortran_order": False, "shape": (10**18,)}, b"", "limit"),          # zero bytes, 10^18 items
    ({"descr": "<i4", "fortran_order": False, "shape": (2**32, 2**32)}, b"", "limit"),     # overflows int64
    ({"descr": "<i4", "fortran_order": False, "shape": (4,)}, b"\0" * 8, "declares 16 bytes"),  # short payload
    ({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\0" * 8, "Python objects"),
])
def test_npy_refused_by_declared_size(header: dict, payload: bytes, match: str) -> None:
    from microagent_jupyter.values import ValueRefused, decode

    with pytest.raises(ValueRefused, match=match):
        decode({"name": "x", "format": "npy", "data": _npy(header, payload)})


def test_npy_within_bounds_still_decodes() -> None:
    import numpy as np

    from microagent_jupyter.values import decode, encode

    arr = np.arange(12, dtype="float32").reshape(3, 4)
    fmt, data = encode(arr)
    assert (decode({"name": "a", "format": fmt, "data": data}) == arr).all()
    empty = np.zeros((0, 5), dtype="V0")
    fmt, data = encode(empty)
    assert decode({"name": "e", "format": fmt, "data": data}).shape == (0, 5)
