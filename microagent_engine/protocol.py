"""Wire protocol between the host and the guest agent (and between clients and the supervisor).

Every message is a frame: a 9-byte header ``type:u8 stream:u32be length:u32be`` followed by ``length``
payload bytes. Stream 0 carries VM-wide messages; each exec uses its own non-zero stream id. The full
description, with the payload of each type, is in ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import ProtocolError

HEADER = struct.Struct(">BII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
#: virtio-serial port name the agent looks for in /sys/class/virtio-ports/*/name
AGENT_PORT_NAME = "org.microagent.agent"
#: virtio-serial port of the mediation channel (guest programs <-> host, relayed by the agent)
MEDIATION_PORT_NAME = "org.microagent.mediation"
PROTOCOL_VERSION = 1
#: published ports: bytes one side may send on a port stream before the other side acknowledges them (PACK);
#: bounds what either side buffers per connection
PUBLISH_WINDOW = 256 << 10


class FrameType(enum.IntEnum):
    HELLO = 0x01  # agent -> host, stream 0: "key=value\n" lines
    CONFIG = 0x02  # host -> agent, stream 0: NUL-terminated tagged entries
    READY = 0x03  # agent -> host, stream 0: "key=value\n" lines
    EXEC = 0x10  # host -> agent: NUL-terminated tagged entries
    STDIN = 0x11  # host -> agent: data; empty payload = EOF
    STDOUT = 0x12  # agent -> host: data
    STDERR = 0x13  # agent -> host: data
    EXIT = 0x14  # agent -> host: "<status> <code>[ <message>]"
    SIGNAL = 0x15  # host -> agent: decimal signal number, sent to the exec's process group
    HALT = 0x20  # host -> agent, stream 0: "halt" (graceful) or "poweroff" (prompt)
    HALTING = 0x21  # agent -> host, stream 0: acknowledgement, power-off follows
    PING = 0x22  # host -> agent: any payload
    PONG = 0x23  # agent -> host: the PING's payload echoed
    ERROR = 0x2F  # either way: UTF-8 message about a malformed or unexpected frame
    # Mediation channel only (its own port, see docs/protocol.md "Mediation"):
    MOPEN = 0x50  # agent -> host: a guest program connected to 127.0.0.1:<port>; new stream id, empty payload
    MDATA = 0x51  # either way: bytes of that connection
    MCLOSE = 0x52  # either way: the connection is finished; optional UTF-8 reason
    MEOF = 0x55  # agent -> host: the guest program finished sending (half-close); the answer may still flow
    MCUT = 0x53  # host -> agent, stream 0: close every connection, refuse new ones until MRESUME
    MRESUME = 0x54  # host -> agent, stream 0: accept connections again
    # Published ports (agent channel, host-chosen non-zero streams; see docs/protocol.md "Published ports"):
    POPEN = 0x60  # host -> agent: connect to 127.0.0.1:<guest port> in the guest; payload: decimal port
    PDATA = 0x61  # either way: bytes of that connection, within the receiver's window
    PACK = 0x62  # either way: decimal count of bytes the sender of this frame has consumed (window credit)
    PEOF = 0x63  # either way: the sender's side finished sending (half-close)
    PCLOSE = 0x64  # either way: the connection is finished both ways; optional UTF-8 reason
    # Supervisor-only (client <-> supervisor, never sent to the guest):
    CONTROL = 0x40  # client -> supervisor: JSON request
    REPLY = 0x41  # supervisor -> client: JSON reply


@dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes = b""


def encode_frame(ftype: int, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload too large ({len(payload)} > {MAX_PAYLOAD})")
    return HEADER.pack(int(ftype), stream, len(payload)) + payload


@dataclass
class FrameDecoder:
    """Incremental decoder: feed bytes, iterate complete frames."""

    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        while len(self._buf) >= HEADER_SIZE:
            ftype, stream, length = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}")
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER_SIZE:end])
            del self._buf[:end]
            yield Frame(ftype, stream, payload)


# ---- tagged entries: "<tag><value>\0" repeated -------------------------------------------------


def encode_entries(entries: list[tuple[str, str]]) -> bytes:
    out = bytearray()
    for tag, value in entries:
        raw = value.encode()
        if b"\0" in raw:
            raise ValueError(f"value for {tag!r} contains a NUL byte")
        out += tag.encode() + raw + b"\0"
    return bytes(out)


def encode_config(
    hostname: str,
    network: str,
    shell: str,
    env: dict[str, str],
    mounts: list[list[str]],
    mediation_port: int | None,
) -> bytes:
    """Payload of the CONFIG frame: hostname, network mode, console shell, default env of every exec,
    extra mounts (each ``[device, mountpoint, fstype, "ro"|"rw"]``) and the guest's mediation port (or None)."""
    entries = [("h", hostname), ("n", network), ("s", shell)]
    entries += [("e", f"{key}={value}") for key, value in env.items()]
    entries += [("m", "\t".join(mount)) for mount in mounts]
    if mediation_port is not None:
        entries.append(("p", str(mediation_port)))
    return encode_entries(entries)


def encode_exec(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    grace: float | None = None,
    stdin: bool = False,
) -> bytes:
    """Payload of an EXEC frame."""
    if not argv:
        raise ValueError("argv must not be empty")
    entries = [("a", a) for a in argv]
    for key, value in (env or {}).items():
        entries.append(("e", f"{key}={value}"))
    if cwd:
        entries.append(("c", cwd))
    if timeout:
        entries.append(("t", str(max(1, int(timeout * 1000)))))
    if grace is not None:
        entries.append(("g", str(int(grace * 1000))))
    if stdin:
        entries.append(("i", "1"))
    return encode_entries(entries)


def decode_kv(payload: bytes) -> dict[str, str]:
    """HELLO / READY payload: ``key=value`` lines."""
    out: dict[str, str] = {}
    for line in payload.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


#: the ``status`` values an EXIT frame may carry
EXIT_STATUSES = ("exited", "signaled", "timed_out", "failed_to_start")


@dataclass(frozen=True)
class ExitStatus:
    """How a guest command ended. ``status`` is exited | signaled | timed_out | failed_to_start."""

    status: str
    code: int
    message: str = ""

    @classmethod
    def parse(cls, payload: bytes) -> ExitStatus:
        parts = payload.decode(errors="replace").split(" ", 2)
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            raise ProtocolError(f"malformed EXIT payload {payload!r}")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "")

    @property
    def exit_code(self) -> int:
        """Shell-style exit code for the CLI: code, 128+signal, 124 on timeout, 127/126 if it never ran."""
        if self.status == "exited":
            return self.code
        if self.status == "signaled":
            return 128 + self.code
        if self.status == "timed_out":
            return 124
        return self.code if self.code in (126, 127) else 127


# ---- the same facts for the C side ------------------------------------------------------------------

#: file name of the header render_c_header() produces; the agent build writes it next to agent.c
C_HEADER_NAME = "protocol.h"


def render_c_header() -> str:
    """C header with this module's constants and frame types, included by the guest agent (and test programs).

    Frame types are ``F_<NAME>``; the other names are the same as here.
    """
    lines = [
        "/* Generated from microagent_engine/protocol.py by render_c_header(): do not edit, change protocol.py. */",
        "#ifndef MICROAGENT_PROTOCOL_H",
        "#define MICROAGENT_PROTOCOL_H",
        "",
        f"#define PROTOCOL_VERSION {PROTOCOL_VERSION}",
        f"#define HEADER_SIZE {HEADER_SIZE}",
        f"#define MAX_PAYLOAD {MAX_PAYLOAD}u",
        f'#define AGENT_PORT_NAME "{AGENT_PORT_NAME}"',
        f'#define MEDIATION_PORT_NAME "{MEDIATION_PORT_NAME}"',
        f"#define PUBLISH_WINDOW {PUBLISH_WINDOW}u",
        "",
    ]
    lines += [f"#define F_{ft.name} 0x{ft.value:02X}" for ft in FrameType]
    lines += ["", "#endif", ""]
    return "\n".join(lines)
