"""Host-side tests of the guest agent (microagent_engine/guest/agent.c) in test mode.

The agent is compiled statically with the host's gcc and started as ``agent --connect PATH``; it connects to a
unix socket served by the test and speaks the protocol of docs/protocol.md over it. Commands run on the host.

Run from the repository root: ``PYTHONPATH=. python3 -m pytest -q tests/test_agent_protocol.py``.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent_harness import (  # noqa: F401 (the fixtures agent, agent_bin, agent_build, start_agent)
    DEFAULT_CONFIG, Agent, FrameChannel, Result, agent, agent_bin, agent_build, start_agent)
from jupyter_conftest_helpers import free_port

from microagent_engine.guest.initramfs import AGENT_SOURCE, compile_static, protocol_headers
from microagent_engine.protocol import (
    AGENT_PORT_NAME,
    C_HEADER_NAME,
    C_NAMESPACES,
    ConfigTag,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MEDIATION_PORT_NAME,
    PROTOCOL_VERSION,
    ExecTag,
    ExitStatus,
    Frame,
    FrameType,
    encode_config,
    encode_entries,
    encode_exec,
    encode_frame,
    c_constants,
    members,
    render_c_header,
)
from microagent_engine.protocol_doc import DOC_PATH, render_protocol_doc

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "microagent_engine" / "guest"
HOSTILE_SRC = Path(__file__).resolve().parent / "hostile" / "hostile.c"


def test_compiles_without_warnings(agent_build):
    _, stderr = agent_build
    assert "warning" not in stderr, stderr


# ---- the protocol defined once: protocol.py generates the C side ------------------------------------


def test_c_header_defines_every_frame_type_and_constant():
    header = render_c_header()
    defines = dict(re.findall(r"^#define (\w+) (.+)$", header, re.MULTILINE))
    for ft in FrameType:
        assert int(defines[f"F_{ft.name}"], 16) == ft.value, ft
    assert defines["HEADER_SIZE"] == str(HEADER_SIZE)
    assert defines["MAX_PAYLOAD"] == f"{MAX_PAYLOAD}u"
    assert defines["PROTOCOL_VERSION"] == str(PROTOCOL_VERSION)
    assert defines["AGENT_PORT_NAME"] == f'"{AGENT_PORT_NAME}"'
    assert defines["MEDIATION_PORT_NAME"] == f'"{MEDIATION_PORT_NAME}"'
    # the words frames carry: entry tags as characters, statuses/modes/keys/values/reasons as strings
    for prefix, namespace in C_NAMESPACES:
        for name, value in members(namespace).items():
            c_value = defines[f"{prefix}_{name}"]
            if isinstance(value, int):
                assert c_value == str(value), (prefix, name)
            elif namespace in (ConfigTag, ExecTag):
                assert c_value == f"'{value}'", (prefix, name)
            else:
                assert c_value == f'"{value}"', (prefix, name)
    # each name once (the include guard is the one #define without a value)
    assert len(re.findall(r"^#define ", header, re.MULTILINE)) == len(defines) + 1 == len(c_constants()) + 1
    assert protocol_headers() == {C_HEADER_NAME: header.encode()}


_C_TOKENS = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|/\*.*?\*/|//[^\n]*', re.DOTALL)
_C_STRING = re.compile(r'"((?:\\.|[^"\\\n])*)"')


def _hand_written_protocol(text: str) -> list[str]:
    """Where C source ``text`` spells a constant protocol.h defines instead of using its name: a #define of one of
    its names, a string literal holding a status/mode/key/value/reason/path of the protocol, an entry tag as a
    character in a comparison, or an EXIT code as a number. Comments are skipped; messages for humans (a word of
    the protocol followed by other words, like "mediation cut") are not copies."""
    code = _C_TOKENS.sub(lambda m: " " if m.group().startswith("/") else m.group(), text)
    consts = c_constants()
    found = [f"#define {name}" for name in re.findall(r"^\s*#\s*define\s+(\w+)", code, re.MULTILINE)
             if name in consts]
    found += [f"enum member {name}" for name in re.findall(r"\b(F_[A-Z]+)\s*=", code)]
    words = {name: value[1:-1] for name, value in consts.items() if value.startswith('"')}
    for m in _C_STRING.finditer(code):
        literal = m.group(1)
        for name, word in words.items():
            if name.startswith("KEY_"):  # a key is copied as "key=..."
                copied = re.search(rf"(?<![\w-]){word}=", literal)
            elif name.startswith("EXIT_"):  # a status as "status <code>..."
                copied = literal == word or literal.startswith(word + " ")
            elif any(c in word for c in "/.:"):  # names, paths, prefixes: anywhere
                copied = word.strip() in literal
            else:
                copied = literal == word
            if copied:
                found.append(f"{name} as {m.group()}")
    tags = {value[1] for value in consts.values() if value.startswith("'")}
    found += [f"tag {m.group()}" for m in re.finditer(r"(?:\bcase\s+|[=!]=\s*)'(\w)'", code) if m.group(1) in tags]
    codes = {value for name, value in consts.items() if name.startswith("EXIT_CODE_")}
    found += [f"EXIT code {n}" for n in re.findall(r"\b\d+\b", _C_STRING.sub('""', code)) if n in codes]
    return found


@pytest.mark.parametrize("source", [GUEST_DIR / AGENT_SOURCE, HOSTILE_SRC], ids=["agent", "hostile"])
def test_c_sources_take_the_protocol_from_the_header(source):
    """No C program keeps its own copy of a frame number, constant, entry tag, EXIT status or code, HALT mode, READY
    key or value, close reason or boot argument: everything the host also knows comes from protocol.h."""
    text = source.read_text()
    assert f'#include "{C_HEADER_NAME}"' in text
    copies = _hand_written_protocol(text)
    assert not copies, f"{source.name} spells the protocol itself (use protocol.h's names): {copies}"
    assert "org.microagent." not in text, f"{source.name} spells a port name instead of using the header's"


def test_hand_written_protocol_is_found():
    """The check above recognises each kind of copy (these lines are from the agent before the protocol moved)."""
    copies = {
        '#define OUT_CHUNK 65536': "#define OUT_CHUNK",
        'snprintf(buf, sizeof buf, "timed_out 124");': 'EXIT_TIMED_OUT as "timed_out 124"',
        'snprintf(buf, sizeof buf, "exited %d", code);': 'EXIT_EXITED as "exited %d"',
        'x = "failed_to_start 126 malformed EXEC request";': "EXIT_FAILED_TO_START",
        'if (strcmp(mode, "poweroff") == 0)': 'HALT_POWEROFF as "poweroff"',
        'snprintf(b, n, "version=%d\\nkernel=%s\\n", 1, r);': "KEY_VERSION",
        'snprintf(out, n, "error: eth0: %s", e);': "READY_ERROR",
        'snprintf(out, n, "ok");': 'READY_OK as "ok"',
        'if (strcmp(net, "user") == 0)': 'NET_USER as "user"',
        'if (strcmp(f[3], "ro") == 0)': 'MOUNT_RO as "ro"',
        'if (strncmp(f[0], "serial:", 7) == 0)': "MOUNT_SERIAL_PREFIX",
        'med_close_all(1, "cut");': 'REASON_CUT as "cut"',
        'fopen("/modules/order", "re");': "MODULES_ORDER",
        'if (strncmp(tok, "microagent.root=", 16) == 0)': "BOOT_ARG_ROOT",
        "switch (e[0]) { case 'a': break; }": "tag case 'a'",
        "if (ent[0] == 'm') n++;": "tag == 'm'",
        "_exit(127);": "EXIT code 127",
        "enum { F_EXEC = 16 };": "enum member F_EXEC",
    }
    for line, expected in copies.items():
        found = _hand_written_protocol(line)
        assert any(f.startswith(expected) for f in found), (line, found)
    human = ('logmsg("mediation cut"); logmsg("mounts: %s", e); /* "halt" */ x = c >= \'a\' && c <= \'f\'; '
             'snprintf(b, n, "%s", READY_ERROR); snprintf(b, n, EXIT_EXITED " %d", 0);')
    assert _hand_written_protocol(human) == []


def test_protocol_doc_is_rendered_from_protocol_py():
    """docs/protocol.md is what protocol.py renders: change protocol.py (or the prose in protocol_doc.py), then run
    python scripts/protocol_doc.py."""
    committed = (REPO / DOC_PATH).read_text()
    assert committed == render_protocol_doc(), "docs/protocol.md is stale: run python scripts/protocol_doc.py"
    for ft in FrameType:
        assert ft.name in committed, ft
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "protocol_doc.py"), "--check"], check=False,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr


def test_protocol_doc_check_fails_on_a_stale_doc(tmp_path):
    """The script's --check fails, naming the fix, when the committed page differs (here: a copy with one edit)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "docs").mkdir()
    for script in ("protocol_doc.py", "generated.py"):
        shutil.copy(REPO / "scripts" / script, root / "scripts")
    shutil.copytree(REPO / "microagent_engine", root / "microagent_engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / DOC_PATH).write_text(render_protocol_doc().replace("timed_out", "timed-out", 1))
    proc = subprocess.run([sys.executable, str(root / "scripts" / "protocol_doc.py"), "--check"], check=False,
                          capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 1 and "run python scripts/protocol_doc.py" in proc.stderr, proc.stderr


def test_build_cache_key_covers_the_header(tmp_path):
    src = b'#include "p.h"\nint main(void) { return V; }\n'
    one = compile_static(tmp_path, src, "keytest", {"p.h": b"#define V 0\n"})
    two = compile_static(tmp_path, src, "keytest", {"p.h": b"#define V 3\n"})
    assert one != two
    assert compile_static(tmp_path, src, "keytest", {"p.h": b"#define V 0\n"}) == one
    assert subprocess.run([str(two)], check=False).returncode == 3


def test_encode_config_entries():
    payload = encode_config("ws", "user", "/bin/sh", {"A": "1"}, [["serial:d1", "/data", "ext4", "ro"]], 9900)
    assert payload == b"hws\0nuser\0s/bin/sh\0eA=1\0mserial:d1\t/data\text4\tro\0p9900\0"
    assert not encode_config("ws", "none", "/bin/sh", {}, [], None).count(b"\0p")


# ---- handshake ----------------------------------------------------------------------------------------


def test_hello_and_ready(start_agent):
    _, hello, ready = start_agent()
    assert hello["version"] == "1"
    assert hello["kernel"] == os.uname().release
    assert ready == {"shell": "missing", "net": "none", "mounts": "ok", "mediation": "none",
                     "kernel": os.uname().release, "version": "1"}


def test_mounts_refused_in_test_mode(start_agent):
    agent, _, ready = start_agent([("n", "none"), ("m", "/dev/vdb\t/mnt/data\text4\trw")])
    assert ready["mounts"] == "error: not supported in test mode"
    assert agent.run(["/bin/echo", "still works"]).stdout == b"still works\n"


# ---- exec basics ----------------------------------------------------------------------------------------


def test_echo_stdout(agent):
    res = agent.run(["echo", "hello", "world"])
    assert res.stdout == b"hello world\n"
    assert res.stderr == b""
    assert res.exit == ExitStatus("exited", 0)


def test_stderr_separate(agent):
    res = agent.run(["sh", "-c", "echo out; echo err >&2"])
    assert res.stdout == b"out\n"
    assert res.stderr == b"err\n"
    assert res.exit == ExitStatus("exited", 0)


def test_exit_code(agent):
    res = agent.run(["sh", "-c", "exit 3"])
    assert res.exit == ExitStatus("exited", 3)
    assert res.exit.exit_code == 3


def test_signaled(agent):
    res = agent.run(["sh", "-c", "kill -9 $$"])
    assert res.exit == ExitStatus("signaled", 9)


def test_timeout(agent):
    start = time.monotonic()
    res = agent.run(["/bin/sleep", "10"], timeout=0.3)
    assert res.exit == ExitStatus("timed_out", 124)
    assert time.monotonic() - start < 5


def test_timeout_grace_then_kill(agent):
    start = time.monotonic()
    res = agent.run(["sh", "-c", "trap '' TERM; echo trapped; sleep 10; echo survived"], timeout=0.3, grace=0.5)
    elapsed = time.monotonic() - start
    assert res.exit == ExitStatus("timed_out", 124)
    assert res.stdout == b"trapped\n"
    assert 0.7 <= elapsed < 5


def test_stdin(agent):
    agent.exec(1, ["cat"], stdin=True)
    agent.send(FrameType.STDIN, 1, b"line one\n")
    agent.send(FrameType.STDIN, 1, b"line two\n")
    agent.send(FrameType.STDIN, 1, b"")
    res = agent.collect([1])[1]
    assert res.stdout == b"line one\nline two\n"
    assert res.exit == ExitStatus("exited", 0)


def test_stdin_large(agent):
    data = bytes(range(256)) * 8192  # 2 MiB, more than a pipe buffer holds
    agent.exec(1, ["sh", "-c", "wc -c"], stdin=True)
    for off in range(0, len(data), 100_000):
        agent.send(FrameType.STDIN, 1, data[off : off + 100_000])
    agent.send(FrameType.STDIN, 1, b"")
    res = agent.collect([1])[1]
    assert res.stdout.strip() == str(len(data)).encode()
    assert res.exit == ExitStatus("exited", 0)


def test_stdin_default_is_dev_null(agent):
    res = agent.run(["cat"])
    assert res.stdout == b""
    assert res.exit == ExitStatus("exited", 0)


def test_env_from_config_and_exec(agent):
    res = agent.run(
        ["sh", "-c", 'echo "$FOO $BAR $BAZ $HOME $TERM $PATH"'],
        env={"BAR": "from-exec", "BAZ": "qux"},
    )
    assert res.stdout.decode().split() == [
        "bar",
        "from-exec",
        "qux",
        "/root",
        "linux",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]


def test_exec_path_is_looked_up_in_exec_env(agent, tmp_path):
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho mytool ran\n")
    tool.chmod(0o755)
    res = agent.run(["mytool"], env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert res.stdout == b"mytool ran\n"
    assert res.exit == ExitStatus("exited", 0)


def test_cwd(agent, tmp_path):
    res = agent.run(["pwd"], cwd=str(tmp_path))
    assert res.stdout.decode().strip() == str(tmp_path)


def test_missing_binary(agent):
    res = agent.run(["/nonexistent/binary"])
    assert res.exit.status == "failed_to_start"
    assert res.exit.code == 127
    assert res.exit.message == os.strerror(2)


def test_missing_binary_in_path(agent):
    res = agent.run(["no-such-command-xyz"])
    assert res.exit.status == "failed_to_start"
    assert res.exit.code == 127


def test_not_executable(agent, tmp_path):
    f = tmp_path / "plain"
    f.write_text("not a program")
    f.chmod(0o644)
    res = agent.run([str(f)])
    assert res.exit.status == "failed_to_start"
    assert res.exit.code == 126


def test_missing_cwd(agent):
    res = agent.run(["pwd"], cwd="/nonexistent/dir")
    assert res.exit.status == "failed_to_start"
    assert res.exit.code == 127
    assert res.stdout == b""


def test_own_session(agent):
    res = agent.run(["sh", "-c", 'ps -o pid=,pgid=,sid= -p $$ 2>/dev/null || echo "$$ $$ $$"'])
    pid, pgid, sid = res.stdout.split()
    assert pid == pgid == sid


# ---- concurrency and streaming ------------------------------------------------------------------------------


def test_concurrent_execs(agent):
    for n in (1, 2, 3):
        agent.exec(n, ["sh", "-c", f"sleep 0.3; echo {n}; echo e{n} >&2"])
    results = agent.collect([1, 2, 3])
    for n in (1, 2, 3):
        assert results[n].stdout == f"{n}\n".encode()
        assert results[n].stderr == f"e{n}\n".encode()
        assert results[n].exit == ExitStatus("exited", 0)


def test_streaming_output(agent):
    agent.exec(1, ["sh", "-c", "echo a; sleep 0.5; echo b"])
    first = agent.recv()
    assert (first.type, first.stream, first.payload) == (FrameType.STDOUT, 1, b"a\n")
    res = agent.collect([1])[1]
    assert res.stdout == b"b\n"
    assert res.exit == ExitStatus("exited", 0)


def test_background_child_does_not_hold_exit(agent):
    start = time.monotonic()
    agent.exec(1, ["sh", "-c", "sleep 5 & echo x"])
    res = agent.collect([1], timeout=3)[1]
    assert res.stdout == b"x\n"
    assert res.exit == ExitStatus("exited", 0)
    assert time.monotonic() - start < 3


def test_signal_frame(agent):
    agent.exec(1, ["/bin/sleep", "10"])
    agent.send(FrameType.PING, 1, b"sync")  # make sure the EXEC was processed
    assert agent.recv().type == FrameType.PONG
    agent.send(FrameType.SIGNAL, 1, b"15")
    res = agent.collect([1], timeout=5)[1]
    assert res.exit == ExitStatus("signaled", 15)


def test_signal_unknown_stream_ignored(agent):
    agent.send(FrameType.SIGNAL, 42, b"15")
    agent.send(FrameType.STDIN, 42, b"data")
    agent.send(FrameType.PING, 0, b"after")
    frame = agent.recv()
    assert (frame.type, frame.payload) == (FrameType.PONG, b"after")


def test_ping_pong(agent):
    agent.send(FrameType.PING, 0, b"hello")
    frame = agent.recv()
    assert (frame.type, frame.stream, frame.payload) == (FrameType.PONG, 0, b"hello")
    agent.send(FrameType.PING, 7, b"")
    frame = agent.recv()
    assert (frame.type, frame.stream, frame.payload) == (FrameType.PONG, 7, b"")


def test_large_output(agent):
    res = agent.run(["head", "-c", "1048576", "/dev/zero"])
    assert len(res.stdout) == 1 << 20
    assert res.stdout == bytes(1 << 20)
    assert all(len(f.payload) <= 65536 for f in res.frames)
    assert res.exit == ExitStatus("exited", 0)


def test_frames_split_and_batched(agent):
    payload = b"".join(
        encode_frame(FrameType.EXEC, n, encode_exec(["echo", f"s{n}"])) for n in (1, 2)
    ) + encode_frame(FrameType.PING, 0, b"p")
    for i in range(len(payload)):  # one byte at a time
        agent.sock.sendall(payload[i : i + 1])
        if i % 7 == 0:
            time.sleep(0.001)
    seen = {1: Result(), 2: Result()}
    pong = None
    while pong is None or any(r.exit is None for r in seen.values()):
        frame = agent.recv()
        if frame.type == FrameType.PONG:
            pong = frame
            continue
        res = seen[frame.stream]
        if frame.type == FrameType.STDOUT:
            res.stdout += frame.payload
        elif frame.type == FrameType.EXIT:
            res.exit = ExitStatus.parse(frame.payload)
    assert pong.payload == b"p"
    assert seen[1].stdout == b"s1\n" and seen[2].stdout == b"s2\n"
    # many frames in a single write
    agent.sock.sendall(b"".join(encode_frame(FrameType.PING, n, str(n).encode()) for n in range(1, 50)))
    for n in range(1, 50):
        frame = agent.recv()
        assert (frame.type, frame.stream, frame.payload) == (FrameType.PONG, n, str(n).encode())


def test_duplicate_stream_rejected(agent):
    agent.exec(1, ["sh", "-c", "sleep 0.5; echo first"])
    agent.exec(1, ["echo", "second"])
    frame = agent.recv()
    assert frame.type == FrameType.ERROR and frame.stream == 1
    res = agent.collect([1])[1]
    assert res.stdout == b"first\n"
    assert res.exit == ExitStatus("exited", 0)


def test_malformed_exec(agent):
    agent.send(FrameType.EXEC, 3, encode_entries([("e", "A=b")]))  # no argv
    res = agent.collect([3])[3]
    assert res.frames[0].type == FrameType.ERROR
    assert res.exit.status == "failed_to_start"


def test_unknown_frame_type(agent):
    agent.send(0x7E, 0, b"")
    frame = agent.recv()
    assert frame.type == FrameType.ERROR
    assert agent.run(["true"]).exit == ExitStatus("exited", 0)


def test_stream_reusable_after_exit(agent):
    assert agent.run(["echo", "one"], stream=5).stdout == b"one\n"
    assert agent.run(["echo", "two"], stream=5).stdout == b"two\n"


# ---- halt -----------------------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_halt(agent):
    agent.exec(1, ["sh", "-c", "echo $$; exec /bin/sleep 30"])
    frame = agent.recv()
    assert frame.type == FrameType.STDOUT
    pid = int(frame.payload)
    agent.send(FrameType.HALT, 0, b"poweroff")
    frame = agent.recv()
    assert frame.type == FrameType.HALTING
    assert agent.proc.wait(timeout=5) == 0
    deadline = time.monotonic() + 3
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), "the agent left its command running"


def test_halt_graceful(agent):
    agent.send(FrameType.HALT, 0, b"halt")
    assert agent.recv().type == FrameType.HALTING
    assert agent.proc.wait(timeout=5) == 0


def test_host_disconnect_exits_agent(agent):
    agent.sock.close()
    assert agent.proc.wait(timeout=5) == 0


# ---- mediation bridge ------------------------------------------------------------------------------------------



def _socket_fds(pid: int) -> int:
    fd_dir = Path(f"/proc/{pid}/fd")
    n = 0
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                n += 1
        except FileNotFoundError:
            pass
    return n


def _connect(port: int) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.settimeout(10)
    return c


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(1 << 20, n - len(buf)))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def _recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF (a reset after the data counts as EOF)."""
    buf = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(buf)
        if not data:
            return bytes(buf)
        buf += data


def _sync(med) -> None:
    """PING the mediation channel; every frame before the PONG must be consumed by the caller first."""
    med.send(FrameType.PING, 0, b"sync")
    frame = med.recv()
    assert (frame.type, frame.stream, frame.payload) == (FrameType.PONG, 0, b"sync"), frame


def _expect(med, ftype: int, stream: int | None = None) -> Frame:
    frame = med.recv()
    assert frame.type == ftype, frame
    if stream is not None:
        assert frame.stream == stream, frame
    return frame


def _read_mdata(med, stream: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        frame = med.recv()
        assert (frame.type, frame.stream) == (FrameType.MDATA, stream), frame
        assert 0 < len(frame.payload) <= 65536
        buf += frame.payload
    assert len(buf) == n
    return bytes(buf)


@pytest.fixture
def mediated(start_agent):
    """An agent with a mediation port: (agent, port); agent.med is the host side of the mediation channel."""
    port = free_port()
    agent, _, ready = start_agent(DEFAULT_CONFIG + [("p", str(port))], mediation=True)
    assert ready["mediation"] == "ok"
    assert agent.med is not None
    return agent, port


def test_mediation_constants():
    assert MEDIATION_PORT_NAME == "org.microagent.mediation"
    assert [FrameType.MOPEN, FrameType.MDATA, FrameType.MCLOSE, FrameType.MCUT, FrameType.MRESUME] == list(
        range(0x50, 0x55)
    )


def test_mediation_none_without_port_entry(start_agent):
    agent, _, ready = start_agent(mediation=True)
    assert ready["mediation"] == "none"
    assert agent.med is None  # the channel is not even connected
    assert _socket_fds(agent.proc.pid) == 1  # only the main channel: no listener
    assert agent.run(["echo", "ok"]).stdout == b"ok\n"


def test_mediation_error_without_channel(start_agent):
    port = free_port()
    agent, _, ready = start_agent(DEFAULT_CONFIG + [("p", str(port))])
    assert ready["mediation"].startswith("error: no mediation port")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert agent.run(["echo", "ok"]).stdout == b"ok\n"


@pytest.mark.parametrize("value", ["0", "65536", "abc", "", "-5", "12x"])
def test_mediation_bad_port(start_agent, value):
    agent, _, ready = start_agent(DEFAULT_CONFIG + [("p", value)], mediation=True)
    assert ready["mediation"].startswith("error: bad port")
    assert agent.med is None


def test_mediation_port_in_use(start_agent):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        agent, _, ready = start_agent(DEFAULT_CONFIG + [("p", str(port))], mediation=True)
        assert ready["mediation"].startswith(f"error: listen 127.0.0.1:{port}: ")
        assert _socket_fds(agent.proc.pid) == 1  # the mediation channel was given up as well
    finally:
        busy.close()


def test_mediation_open_data_close(mediated):
    agent, port = mediated
    assert _socket_fds(agent.proc.pid) == 3  # main channel, mediation channel, listener
    med = agent.med
    client = _connect(port)
    opened = _expect(med, FrameType.MOPEN)
    assert opened.stream == 1 and opened.payload == b""
    client.sendall(b"hello host")
    assert _read_mdata(med, 1, 10) == b"hello host"
    med.send(FrameType.MDATA, 1, b"hello guest")
    assert _recv_exact(client, 11) == b"hello guest"
    client.close()
    assert _expect(med, FrameType.MEOF, 1).payload == b""  # the program is done sending
    med.send(FrameType.MCLOSE, 1, b"")
    # a second connection gets a new id
    client = _connect(port)
    assert _expect(med, FrameType.MOPEN).stream == 2
    client.close()
    assert _expect(med, FrameType.MEOF, 2).payload == b""
    med.send(FrameType.MCLOSE, 2, b"")
    # the main channel is unaffected
    assert agent.run(["echo", "still"]).stdout == b"still\n"


def test_mediation_host_close(mediated):
    agent, port = mediated
    med = agent.med
    client = _connect(port)
    sid = _expect(med, FrameType.MOPEN).stream
    med.send(FrameType.MDATA, sid, b"last words")
    med.send(FrameType.MCLOSE, sid, b"done")
    assert _recv_all(client) == b"last words"
    client.close()
    # no MCLOSE comes back for a stream the host closed; frames for it are ignored
    med.send(FrameType.MDATA, sid, b"late")
    med.send(FrameType.MCLOSE, sid, b"")
    _sync(med)


def test_mediation_large_both_ways(mediated):
    agent, port = mediated
    med = agent.med
    client = _connect(port)
    sid = _expect(med, FrameType.MOPEN).stream
    up = os.urandom(1 << 20)
    down = os.urandom(3 << 20)

    sender = threading.Thread(target=client.sendall, args=(up,))
    sender.start()
    assert _read_mdata(med, sid, len(up)) == up
    sender.join(10)

    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_recv_all(client)))
    reader.start()
    med.send(FrameType.MDATA, sid, down[: 1 << 20])  # one frame of the maximum size, then smaller ones
    for off in range(1 << 20, len(down), 100_000):
        med.send(FrameType.MDATA, sid, down[off : off + 100_000])
    med.send(FrameType.MCLOSE, sid, b"")  # the queue is written out before the socket is closed
    reader.join(10)
    assert not reader.is_alive()
    assert received == [down]
    client.close()


def test_mediation_concurrent_connections(mediated):
    agent, port = mediated
    med = agent.med
    a = _connect(port)
    ida = _expect(med, FrameType.MOPEN).stream
    b = _connect(port)
    idb = _expect(med, FrameType.MOPEN).stream
    assert ida != idb
    a.sendall(b"from a")
    assert _read_mdata(med, ida, 6) == b"from a"
    b.sendall(b"from b")
    assert _read_mdata(med, idb, 6) == b"from b"
    med.send(FrameType.MDATA, idb, b"to b")
    med.send(FrameType.MDATA, ida, b"to a")
    assert _recv_exact(a, 4) == b"to a"
    assert _recv_exact(b, 4) == b"to b"
    # closing one leaves the other working
    med.send(FrameType.MCLOSE, ida, b"")
    assert _recv_all(a) == b""
    b.sendall(b"b again")
    assert _read_mdata(med, idb, 7) == b"b again"
    med.send(FrameType.MDATA, idb, b"yes")
    assert _recv_exact(b, 3) == b"yes"
    b.close()
    assert _expect(med, FrameType.MEOF, idb).payload == b""
    a.close()


def test_mediation_half_close_keeps_the_answer(mediated):
    """`echo q | nc 127.0.0.1 PORT`: the program shuts its sending side, then waits for the answer."""
    agent, port = mediated
    med = agent.med
    client = _connect(port)
    sid = _expect(med, FrameType.MOPEN).stream
    client.sendall(b"question")
    client.shutdown(socket.SHUT_WR)
    assert _read_mdata(med, sid, 8) == b"question"
    assert _expect(med, FrameType.MEOF, sid).payload == b""
    med.send(FrameType.MDATA, sid, b"answer")
    med.send(FrameType.MCLOSE, sid, b"")
    assert _recv_all(client) == b"answer"


def test_mediation_cut_and_resume(mediated):
    agent, port = mediated
    med = agent.med
    a = _connect(port)
    ida = _expect(med, FrameType.MOPEN).stream
    b = _connect(port)
    idb = _expect(med, FrameType.MOPEN).stream
    med.send(FrameType.MCUT, 0)
    closes = {med.recv(), med.recv()}
    assert {(f.type, f.stream, f.payload) for f in closes} == {
        (FrameType.MCLOSE, ida, b"cut"),
        (FrameType.MCLOSE, idb, b"cut"),
    }
    assert _recv_all(a) == b"" and _recv_all(b) == b""
    a.close()
    b.close()
    # while cut: connections are accepted and closed at once, no MOPEN
    for _ in range(2):
        c = _connect(port)
        assert _recv_all(c) == b""
        c.close()
    med.send(FrameType.MDATA, ida, b"to a closed stream")  # ignored
    _sync(med)
    med.send(FrameType.MCUT, 0)  # cutting twice is harmless
    med.send(FrameType.MRESUME, 0)
    c = _connect(port)
    idc = _expect(med, FrameType.MOPEN).stream
    assert idc not in (ida, idb)
    c.sendall(b"after resume")
    assert _read_mdata(med, idc, 12) == b"after resume"
    c.close()
    assert _expect(med, FrameType.MEOF, idc).stream == idc


def test_mediation_malformed_frames(mediated):
    agent, port = mediated
    med = agent.med
    med.send(FrameType.MDATA, 0, b"x")
    assert _expect(med, FrameType.ERROR, 0).payload
    med.send(FrameType.MCUT, 5)
    assert _expect(med, FrameType.ERROR, 5).payload
    med.send(FrameType.EXEC, 1, encode_exec(["true"]))  # not on this channel
    assert _expect(med, FrameType.ERROR, 1).payload
    med.send(FrameType.MDATA, 99, b"unknown stream")
    med.send(FrameType.MCLOSE, 99, b"")
    _sync(med)
    client = _connect(port)
    assert _expect(med, FrameType.MOPEN).stream == 1
    client.close()
    assert _expect(med, FrameType.MEOF, 1)


def test_mediation_channel_lost_keeps_main_channel(mediated):
    agent, port = mediated
    med = agent.med
    client = _connect(port)
    _expect(med, FrameType.MOPEN)
    med.sock.close()
    assert _recv_all(client) == b""  # the guest connection is closed
    client.close()
    later = _connect(port)  # accepted and closed: nobody to relay to
    assert _recv_all(later) == b""
    later.close()
    assert agent.run(["echo", "main ok"]).stdout == b"main ok\n"
    assert agent.proc.poll() is None


def test_mediation_guest_not_reading(mediated):
    """A program that stops reading stalls only the mediation channel, then is cut off with 'buffer overflow'."""
    agent, port = mediated
    med = agent.med
    client = _connect(port)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sid = _expect(med, FrameType.MOPEN).stream
    chunk = bytes(1 << 20)
    errors: list[BaseException] = []

    def flood():
        # raw writes: med.recv() changes the socket's timeout, which sendall would obey
        fd = med.sock.fileno()
        try:
            for _ in range(32):  # far more than the 4 MiB queue plus the socket buffers
                view = memoryview(encode_frame(FrameType.MDATA, sid, chunk))
                while view:
                    select.select([], [fd], [], 60)
                    try:
                        view = view[os.write(fd, view) :]
                    except BlockingIOError:
                        pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    start = time.monotonic()
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    time.sleep(1)
    assert sender.is_alive()  # the agent stopped reading the mediation channel
    assert agent.run(["echo", "main ok"]).stdout == b"main ok\n"  # the main channel is unaffected
    frame = med.recv(timeout=30)
    assert (frame.type, frame.stream, frame.payload) == (FrameType.MCLOSE, sid, b"buffer overflow")
    assert time.monotonic() - start >= 9
    sender.join(20)
    assert not sender.is_alive() and not errors  # the rest was read and dropped
    _sync(med)
    client.close()
