"""Wire protocol between the host and the guest agent (and between clients and the supervisor).

Every message is a frame: a 9-byte header ``type:u8 stream:u32be length:u32be`` followed by ``length``
payload bytes. Stream 0 carries VM-wide messages; each exec uses its own non-zero stream id.

This module is the protocol's only definition: every constant the guest agent (C) shares with Python is here,
``render_c_header()`` writes them into the agent's ``protocol.h`` and ``protocol_doc.render_protocol_doc()`` writes
``docs/protocol.md`` (the full description, with the payload of each type) from them.
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

# the agent's limits and timings: protocol.h gives them to the agent, docs/protocol.md states them
#: largest STDOUT/STDERR/MDATA/PDATA payload the agent sends (it reads its sockets and pipes in chunks this size)
OUT_CHUNK = 64 << 10
#: after an exec's main process exits, the agent drains its pipes for at most this long before sending EXIT
DRAIN_MS = 200
#: TERM -> KILL grace of a timed-out exec when EXEC has no grace entry
DEFAULT_GRACE_MS = 2000
#: HALT: how long the agent waits after TERM before KILL, graceful (``halt``) and prompt (``poweroff``)
HALT_WAIT_MS = 3000
POWEROFF_WAIT_MS = 500
#: mediation: while a guest connection has this much queued from the host, the agent stops reading the channel...
MED_BUF_CAP = 4 << 20
#: ...and closes that connection (``buffer overflow``) if its program makes no progress for this long
MED_STALL_MS = 10_000
#: a virtio-serial port that is closed or whose host side is not connected yet is retried this often
PORT_RETRY_MS = 100
#: at boot, how long the agent waits for its virtio-serial port and for the root device
DEVICE_WAIT_MS = 10_000
#: published ports: the agent refuses connections beyond this many (``too many connections``); the host bounds lower
PUB_MAX_CONNS = 1024


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


# ---- the words frames carry ----------------------------------------------------------------------
# Each class is a namespace of string constants (plain ``str`` values, so they compare with what a frame carries);
# render_c_header() gives each one a C name: ``<prefix>_<NAME>``.


class ConfigTag:
    """Entry tags of a CONFIG payload."""

    HOSTNAME = "h"
    NETWORK = "n"  # a NetworkMode
    SHELL = "s"  # console shell path
    CLOCK = "t"  # "<sec>.<nsec>" since the epoch
    SEED = "r"  # hex bytes mixed into the guest's RNG
    ENV = "e"  # KEY=VALUE, repeatable: default env of every exec
    MOUNT = "m"  # <device>\t<mountpoint>\t<fstype>\t<MountMode>, repeatable
    MEDIATION_PORT = "p"  # decimal port the agent listens on in the guest


class ExecTag:
    """Entry tags of an EXEC payload."""

    ARG = "a"  # repeatable, argv in order
    ENV = "e"  # KEY=VALUE, repeatable
    CWD = "c"
    TIMEOUT_MS = "t"
    GRACE_MS = "g"
    STDIN = "i"  # "1": stdin is a pipe fed by STDIN frames


class ExitKind:
    """First word of an EXIT payload."""

    EXITED = "exited"
    SIGNALED = "signaled"
    TIMED_OUT = "timed_out"
    FAILED_TO_START = "failed_to_start"


class ExitCode:
    """Codes an EXIT payload carries when the command did not simply exit."""

    TIMED_OUT = 124  # with timed_out
    CANNOT_RUN = 126  # with failed_to_start: found but not runnable, or a malformed EXEC
    NOT_FOUND = 127  # with failed_to_start: ENOENT


class HaltMode:
    """Payload of a HALT frame."""

    HALT = "halt"  # TERM everything, wait HALT_WAIT_MS, KILL, sync, unmount, power off
    POWEROFF = "poweroff"  # TERM, wait POWEROFF_WAIT_MS, KILL, sync, power off


class NetworkMode:
    """Value of CONFIG's network entry."""

    USER = "user"  # eth0 with QEMU's user-mode addresses
    NONE = "none"  # loopback only


class MountMode:
    """Last field of a CONFIG mount entry."""

    RO = "ro"
    RW = "rw"


#: a CONFIG mount's device ``serial:<id>`` is the virtio disk whose serial is ``<id>``
MOUNT_SERIAL_PREFIX = "serial:"


class InfoKey:
    """Keys of the ``key=value`` lines of HELLO (version, kernel) and READY (all)."""

    VERSION = "version"
    KERNEL = "kernel"
    SHELL = "shell"
    NET = "net"
    MOUNTS = "mounts"
    MEDIATION = "mediation"


class ReadyValue:
    """Values of READY's shell/net/mounts/mediation lines; ``ERROR`` is a prefix followed by why."""

    OK = "ok"
    NONE = "none"
    MISSING = "missing"
    ERROR = "error: "


class CloseReason:
    """Reasons the agent puts in an MCLOSE or PCLOSE of its own."""

    CUT = "cut"  # MCLOSE: the host sent MCUT
    BUFFER_OVERFLOW = "buffer overflow"  # MCLOSE: the guest program stalled with MED_BUF_CAP queued
    TOO_MANY = "too many connections"  # PCLOSE: PUB_MAX_CONNS reached


class BootArg:
    """Kernel command line arguments the agent reads as PID 1."""

    ROOT = "microagent.root="  # the root device (path, or a name under /dev)
    READ_ONLY = "microagent.ro="  # 1: mount the root read-only


#: root device when the command line names none
DEFAULT_ROOT_DEVICE = "/dev/vda"
#: file in the initramfs listing the kernel modules to load, one path (relative to /) a line, in order
MODULES_ORDER = "modules/order"


def members(namespace: type) -> dict[str, str | int]:
    """The constants of one of the classes above, by name, in definition order."""
    return {name: value for name, value in vars(namespace).items() if name.isupper()}


#: the status words an EXIT frame may carry
EXIT_STATUSES = tuple(members(ExitKind).values())


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
    clock: float | None = None,
    seed: bytes | None = None,
) -> bytes:
    """Payload of the CONFIG frame: hostname, network mode, console shell, default env of every exec,
    extra mounts (each ``[device, mountpoint, fstype, "ro"|"rw"]``), the guest's mediation port (or None), the
    host's clock (seconds since the epoch, set in the guest) and host randomness (mixed into the guest's RNG,
    which is reseeded): a VM restored from a template resumes with the template's clock and RNG state."""
    entries = [(ConfigTag.HOSTNAME, hostname), (ConfigTag.NETWORK, network), (ConfigTag.SHELL, shell)]
    if clock is not None:
        ns = int(clock * 1e9)
        entries.append((ConfigTag.CLOCK, f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"))
    if seed:
        entries.append((ConfigTag.SEED, seed.hex()))
    entries += [(ConfigTag.ENV, f"{key}={value}") for key, value in env.items()]
    entries += [(ConfigTag.MOUNT, "\t".join(mount)) for mount in mounts]
    if mediation_port is not None:
        entries.append((ConfigTag.MEDIATION_PORT, str(mediation_port)))
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
    entries = [(ExecTag.ARG, a) for a in argv]
    for key, value in (env or {}).items():
        entries.append((ExecTag.ENV, f"{key}={value}"))
    if cwd:
        entries.append((ExecTag.CWD, cwd))
    if timeout:
        entries.append((ExecTag.TIMEOUT_MS, str(max(1, int(timeout * 1000)))))
    if grace is not None:
        entries.append((ExecTag.GRACE_MS, str(int(grace * 1000))))
    if stdin:
        entries.append((ExecTag.STDIN, "1"))
    return encode_entries(entries)


def decode_kv(payload: bytes) -> dict[str, str]:
    """HELLO / READY payload: ``key=value`` lines."""
    out: dict[str, str] = {}
    for line in payload.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


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
        if self.status == ExitKind.EXITED:
            return self.code
        if self.status == ExitKind.SIGNALED:
            return 128 + self.code
        if self.status == ExitKind.TIMED_OUT:
            return ExitCode.TIMED_OUT
        return self.code if self.code in (ExitCode.CANNOT_RUN, ExitCode.NOT_FOUND) else ExitCode.NOT_FOUND


# ---- the same facts for the C side ------------------------------------------------------------------

#: file name of the header render_c_header() produces; the agent build writes it next to agent.c
C_HEADER_NAME = "protocol.h"


#: module-level constants in protocol.h, under the same names (unsigned where the agent compares them with sizes)
C_NUMBERS = ("PROTOCOL_VERSION", "HEADER_SIZE", "MAX_PAYLOAD", "PUBLISH_WINDOW", "OUT_CHUNK", "DRAIN_MS",
             "DEFAULT_GRACE_MS", "HALT_WAIT_MS", "POWEROFF_WAIT_MS", "MED_BUF_CAP", "MED_STALL_MS", "PUB_MAX_CONNS",
             "PORT_RETRY_MS", "DEVICE_WAIT_MS")
C_UNSIGNED = frozenset({"MAX_PAYLOAD", "PUBLISH_WINDOW", "MED_BUF_CAP"})
C_STRINGS = ("AGENT_PORT_NAME", "MEDIATION_PORT_NAME", "MOUNT_SERIAL_PREFIX", "DEFAULT_ROOT_DEVICE", "MODULES_ORDER")
#: the namespaces above, by the prefix of their C names; the entry tags become character constants
C_NAMESPACES: tuple[tuple[str, type], ...] = (
    ("CFG", ConfigTag), ("EXEC", ExecTag), ("EXIT", ExitKind), ("EXIT_CODE", ExitCode), ("HALT", HaltMode),
    ("NET", NetworkMode), ("MOUNT", MountMode), ("KEY", InfoKey), ("READY", ReadyValue), ("REASON", CloseReason),
    ("BOOT_ARG", BootArg),
)
C_CHAR_NAMESPACES = frozenset({ConfigTag, ExecTag})


def _c_string(value: str) -> str:
    if not value.isascii() or not value.isprintable() or '"' in value or "\\" in value:
        raise ValueError(f"protocol string {value!r} needs escaping in C")
    return f'"{value}"'


def c_constants() -> dict[str, str]:
    """Every name protocol.h defines, with its C value: the constants, the namespaces (``<prefix>_<NAME>``) and the
    frame types (``F_<NAME>``)."""
    glob = globals()
    out = {name: f"{glob[name]}u" if name in C_UNSIGNED else str(glob[name]) for name in C_NUMBERS}
    out |= {name: _c_string(glob[name]) for name in C_STRINGS}
    for prefix, namespace in C_NAMESPACES:
        for name, value in members(namespace).items():
            if isinstance(value, int):
                out[f"{prefix}_{name}"] = str(value)
            elif namespace in C_CHAR_NAMESPACES:
                if len(value) != 1 or not value.isalpha():
                    raise ValueError(f"entry tag {value!r} must be one letter")
                out[f"{prefix}_{name}"] = f"'{value}'"
            else:
                out[f"{prefix}_{name}"] = _c_string(value)
    out |= {f"F_{ft.name}": f"0x{ft.value:02X}" for ft in FrameType}
    return out


def render_c_header() -> str:
    """C header with this module's constants, words and frame types, included by the guest agent (and test programs).

    Frame types are ``F_<NAME>``; the namespaces' members ``<prefix>_<NAME>`` (see C_NAMESPACES); the other names are
    the same as here.
    """
    lines = [
        "/* Generated from microagent_engine/protocol.py by render_c_header(): do not edit, change protocol.py. */",
        "#ifndef MICROAGENT_PROTOCOL_H",
        "#define MICROAGENT_PROTOCOL_H",
        "",
    ]
    lines += [f"#define {name} {value}" for name, value in c_constants().items()]
    lines += ["", "#endif", ""]
    return "\n".join(lines)
