"""docs/protocol.md, rendered from protocol.py: every number, name, tag and word in it comes from there.

``render_protocol_doc()`` gives the text; ``scripts/protocol_doc.py`` writes it (``--check`` compares), and
tests/test_agent_protocol.py fails when the committed file differs. Edit the prose here, the facts in protocol.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from . import protocol as P
from .protocol import FrameType as F

#: where the rendered text is committed, relative to the repository root
DOC_PATH = "docs/protocol.md"


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _time(ms: int) -> str:
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:g} s"


def _hex(ft: F) -> str:
    return f"0x{ft.value:02X}"


def _group(types: Iterable[F]) -> str:
    """``0x50-0x55`` for a run of consecutive frame types, else their numbers joined by ``/``."""
    values = sorted(ft.value for ft in types)
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"0x{values[0]:02X}-0x{values[-1]:02X}"
    return "/".join(f"0x{v:02X}" for v in values)


def _names(types: Iterable[F], sep: str = ", ") -> str:
    return sep.join(ft.name for ft in sorted(types, key=lambda ft: ft.value))


def _table(rows: Mapping[F, tuple[str, str]]) -> list[str]:
    out = ["| type | name | direction | payload |", "|---|---|---|---|"]
    out += [f"| {_hex(ft)} | {ft.name} | {direction} | {payload} |" for ft, (direction, payload) in rows.items()]
    return out


def _entries(namespace: type, described: Mapping[str, str]) -> str:
    """Entry tags in protocol order, each with its description; every tag must be described, and only tags."""
    tags = P.members(namespace)
    if set(described) != set(tags):
        raise ValueError(f"{namespace.__name__}: described {sorted(described)}, defined {sorted(tags)}")
    return ", ".join(f"`{tags[name]}{described[name]}`" for name in tags)


def _words(namespace: type, sep: str = "\\|") -> str:
    return sep.join(str(v) for v in P.members(namespace).values())


MEDIATION_TYPES = (F.MOPEN, F.MDATA, F.MCLOSE, F.MCUT, F.MRESUME, F.MEOF)
PUBLISH_TYPES = (F.POPEN, F.PDATA, F.PACK, F.PEOF, F.PCLOSE)
SUPERVISOR_TYPES = (F.CONTROL, F.REPLY)


def _main_rows() -> dict[F, tuple[str, str]]:
    C, X, K, R = P.ConfigTag, P.ExecTag, P.InfoKey, P.ReadyValue
    err = R.ERROR.rstrip()
    config = _entries(C, {
        "HOSTNAME": "<hostname>",
        "NETWORK": f"<{_words(P.NetworkMode)}>",
        "SHELL": "<shell path>",
        "CLOCK": "<sec>.<nsec>",
        "SEED": "<hex>",
        "ENV": "<KEY=VALUE>",
        "MOUNT": f"<dev>\\t<mountpoint>\\t<fstype>\\t<{_words(P.MountMode)}>",
        "MEDIATION_PORT": "<port>",
    })
    exec_ = _entries(X, {
        "ARG": "<arg>", "ENV": "<KEY=VALUE>", "CWD": "<cwd>", "TIMEOUT_MS": "<timeout ms>",
        "GRACE_MS": "<grace ms>", "STDIN": "1",
    })
    return {
        F.HELLO: ("agent→host, stream 0", f"`key=value\\n` lines: `{K.VERSION}={P.PROTOCOL_VERSION}`, "
                                          f"`{K.KERNEL}=<uname -r>`"),
        F.CONFIG: ("host→agent, stream 0",
                   f"entries: {config}. `{C.ENV}` is repeatable (default env of every exec), `{C.NETWORK}` the "
                   f"network, `{C.SHELL}` the console shell, `{C.CLOCK}` the host's clock (set in the guest), "
                   f"`{C.SEED}` host randomness (mixed into the guest's RNG, which is reseeded), `{C.MOUNT}` an extra "
                   f"mount (repeatable; `<dev>` is a device path or `{P.MOUNT_SERIAL_PREFIX}<id>`, the virtio disk "
                   f"whose serial is `<id>`), `{C.MEDIATION_PORT}` the mediation port (decimal 1..65535, see "
                   f"[Mediation](#mediation))"),
        F.READY: ("agent→host, stream 0",
                  f"`key=value\\n` lines: `{K.SHELL}={R.OK}\\|{R.MISSING}`, `{K.NET}={R.OK}\\|{R.NONE}\\|{err} …`, "
                  f"`{K.MOUNTS}={R.OK}\\|{err} …`, `{K.MEDIATION}={R.OK}\\|{R.NONE}\\|{err} …`, "
                  f"`{K.KERNEL}=<uname -r>`, `{K.VERSION}={P.PROTOCOL_VERSION}` (repeated from HELLO: a clone "
                  f"restored from a template said HELLO to the template's host)"),
        F.EXEC: ("host→agent",
                 f"entries: {exec_}. `{X.ARG}` is repeatable (argv in order, at least one), `{X.ENV}` too; "
                 f"`{X.GRACE_MS}` is the TERM→KILL grace on timeout (default {_time(P.DEFAULT_GRACE_MS)}); with "
                 f"`{X.STDIN}1` stdin is a pipe fed by STDIN frames, otherwise `/dev/null`"),
        F.STDIN: ("host→agent", "bytes for the command's stdin; an empty payload closes it (EOF)"),
        F.STDOUT: ("agent→host",
                   f"bytes the command wrote to stdout, as they come (chunks ≤ {_size(P.OUT_CHUNK)})"),
        F.STDERR: ("agent→host", "same for stderr"),
        F.EXIT: ("agent→host", "`<status> <code>[ <message>]`; last frame of a stream"),
        F.SIGNAL: ("host→agent", "decimal signal number, sent to the command's process group"),
        F.HALT: ("host→agent, stream 0",
                 f"`{P.HaltMode.HALT}` (TERM everything, wait up to {_time(P.HALT_WAIT_MS)}, KILL, sync, unmount, "
                 f"power off) or `{P.HaltMode.POWEROFF}` (TERM, {_time(P.POWEROFF_WAIT_MS)}, KILL, sync, power off)"),
        F.HALTING: ("agent→host, stream 0", "acknowledgement; the VM powers off afterwards"),
        F.PING: ("host→agent", "any bytes"),
        F.PONG: ("agent→host", "the PING's payload, same stream"),
        F.ERROR: ("either", "UTF-8 message about a malformed/unexpected frame (for an exec stream, an EXIT follows)"),
    }


def _mediation_rows() -> dict[F, tuple[str, str]]:
    return {
        F.MOPEN: ("agent→host", "empty. A guest program connected; the stream id is allocated by the agent: 1, 2, "
                                "3, … (skipping ids still open after wrapping; never reused while open)"),
        F.MDATA: ("both", f"bytes of that connection. The agent sends chunks ≤ {_size(P.OUT_CHUNK)}; it accepts any "
                          "size up to the frame limit. An empty MDATA is ignored"),
        F.MCLOSE: ("both", "optional UTF-8 reason. The connection is finished, both ways"),
        F.MEOF: ("agent→host", "the guest program finished sending (read EOF): the host half-closes its target "
                               "connection and keeps forwarding the answer until the target closes (then MCLOSE)"),
        F.MCUT: ("host→agent, stream 0", "empty. Close every connection and refuse new ones until MRESUME"),
        F.MRESUME: ("host→agent, stream 0", "empty. Accept connections again (no-op if not cut)"),
    }


def _publish_rows() -> dict[F, tuple[str, str]]:
    return {
        F.POPEN: ("host→agent", "decimal guest port 1..65535. The agent connects (non-blocking) to "
                                "`127.0.0.1:<port>`; on failure it answers `PCLOSE connect 127.0.0.1:<port>: "
                                "<strerror>`. Host bytes sent before the connect completes are queued"),
        F.PDATA: ("both", f"bytes of the connection. A side may have at most `PUBLISH_WINDOW` "
                          f"({_size(P.PUBLISH_WINDOW)}) bytes on a stream that the other has not acknowledged; "
                          f"chunks ≤ {_size(P.OUT_CHUNK)} from the agent. Empty PDATA is ignored"),
        F.PACK: ("both", "decimal count of PDATA bytes the sender of the PACK has consumed (written to its socket): "
                         "the other side may send that much more"),
        F.PEOF: ("both", "the sender's side finished sending (its program or client half-closed); the receiver "
                         "shuts down its write side once everything queued is written"),
        F.PCLOSE: ("both", "optional UTF-8 reason. The stream is finished both ways"),
    }


def render_protocol_doc() -> str:
    """The text of docs/protocol.md."""
    main, med, pub = _main_rows(), _mediation_rows(), _publish_rows()
    listed = set(main) | set(med) | set(pub) | set(SUPERVISOR_TYPES)
    if listed != set(F) or set(med) != set(MEDIATION_TYPES) or set(pub) != set(PUBLISH_TYPES):
        raise ValueError(f"frame types not documented: {sorted(ft.name for ft in set(F) - listed)}")
    E, code, reason = P.ExitKind, P.ExitCode, P.CloseReason
    C, K, R = P.ConfigTag, P.InfoKey, P.ReadyValue
    lines = [
        "<!-- Generated from microagent_engine/protocol.py by microagent_engine/protocol_doc.py: do not edit; run",
        "     `python scripts/protocol_doc.py` after changing either. tests/test_agent_protocol.py checks it. -->",
        "",
        "# Guest agent and its wire protocol",
        "",
        "The guest agent (`microagent_engine/guest/agent.c`) is a small static C program. In a VM it is PID 1: the",
        "kernel runs it as `/init` from the initramfs; it loads the virtio modules, mounts the workspace rootfs, "
        "switches",
        "into it and serves exec requests over a virtio-serial port that QEMU binds to a host unix socket owned by the",
        "workspace's supervisor. The host side of the protocol is `microagent_engine/protocol.py`.",
        "",
        "The protocol is defined once, in `protocol.py`: `render_c_header()` turns its constants, the frame types",
        "(`F_<NAME>`), the entry tags (`CFG_<NAME>`, `EXEC_<NAME>`), EXIT statuses and codes, HALT modes, network and",
        "mount modes, READY keys and values, close reasons and boot arguments into `protocol.h`, which the agent build",
        "(`build_agent` in `microagent_engine/guest/initramfs.py`) writes beside `agent.c`; the binary is cached under",
        "the state dir by the hash of both files, so a change to `protocol.py` rebuilds it. This page is rendered from",
        "`protocol.py` by `microagent_engine/protocol_doc.py` (`python scripts/protocol_doc.py`).",
        "`tests/test_agent_protocol.py` fails if a C program spells a shared constant itself or if this page differs",
        "from what `protocol.py` renders. The payloads of CONFIG and EXEC are built by `encode_config` and",
        "`encode_exec` in `protocol.py`.",
        "",
        "## Framing",
        "",
        f"Every message is a frame: a {P.HEADER_SIZE}-byte header, then the payload.",
        "",
        "| bytes | field | meaning |",
        "|---|---|---|",
        "| 0 | type | `u8`, see below |",
        "| 1-4 | stream | `u32` big-endian. 0 = VM-wide messages; each exec uses its own non-zero id chosen by the "
        "host |",
        f"| 5-8 | length | `u32` big-endian payload length, at most {_size(P.MAX_PAYLOAD)} |",
        "",
        "Tagged entries (CONFIG, EXEC) are a sequence of `<tag char><value>\\0`.",
        "",
        *_table(main),
        f"| {_group(MEDIATION_TYPES)} | {_names(MEDIATION_TYPES)} | mediation channel only | see "
        "[Mediation](#mediation) |",
        f"| {_group(PUBLISH_TYPES)} | {_names(PUBLISH_TYPES)} | both, streams chosen by the host | see "
        "[Published ports](#published-ports) |",
        f"| {_group(SUPERVISOR_TYPES)} | {_names(SUPERVISOR_TYPES, '/')} | client↔supervisor only | JSON; never "
        "reaches the guest |",
        "",
        f"EXIT statuses: `{E.EXITED} <code>`; `{E.SIGNALED} <signal number>`; `{E.TIMED_OUT} {code.TIMED_OUT}` (the "
        "timeout fired; TERM then KILL",
        f"after the grace period, to the whole process group); `{E.FAILED_TO_START} <{code.CANNOT_RUN}"
        f"|{code.NOT_FOUND}> <strerror>` (execvp failed, or",
        f"cwd missing: {code.NOT_FOUND} for ENOENT, {code.CANNOT_RUN} otherwise; a malformed EXEC gives "
        f"`{E.FAILED_TO_START} {code.CANNOT_RUN} malformed EXEC request`",
        "after an ERROR).",
        "",
        "## Exec semantics",
        "",
        "- Each command runs in its own session/process group (`setsid`), with env = the agent's defaults (`PATH`, "
        "`HOME=/root`,",
        "  `TERM=linux`), then CONFIG env, then EXEC env; argv[0] is looked up in the exec's `PATH`.",
        "- Several execs run at once; output of each is forwarded as soon as it is read.",
        "- After the command's main process exits, remaining output is drained until both pipes reach EOF or "
        f"{_time(P.DRAIN_MS)} pass",
        "  (a backgrounded child holding the pipe does not hang the exec); then EXIT is sent.",
        "- The agent reaps every child (it is PID 1), including orphans.",
        "",
        "## Mediation",
        "",
        "Guest programs reach the host through the agent (the host has no vsock). When CONFIG has "
        f"`{C.MEDIATION_PORT}<port>`, the agent",
        "listens on TCP **`127.0.0.1:<port>`** inside the guest (the `mediation.port` of the spec; `SO_REUSEADDR`, "
        "the",
        "listener and the connections are non-blocking and close-on-exec) and relays each accepted connection to the",
        "host over a **dedicated second channel**: the virtio-serial port named "
        f"`{P.MEDIATION_PORT_NAME}`",
        "(`MEDIATION_PORT_NAME`), found like the agent port in `/sys/class/virtio-ports/*/name`. In test mode it is "
        "the",
        "unix socket given by `--mediation-connect PATH`. Only the first CONFIG sets it up (a reconnecting host's "
        "CONFIG",
        "does not change it). READY reports:",
        "",
        f"- `{K.MEDIATION}={R.NONE}`: no `{C.MEDIATION_PORT}` entry; nothing listens.",
        f"- `{K.MEDIATION}={R.OK}`: listening; the channel is open (or, in a VM, being opened: the port exists but "
        "the host side",
        f"  may connect a moment later; the agent retries every {_time(P.PORT_RETRY_MS)}).",
        f"- `{K.MEDIATION}={R.ERROR}<why>`: `bad port <value>`; `no mediation port` (the virtio port is absent, or "
        "in test mode",
        "  `--mediation-connect` was not given); `connect <path>: …` (test mode); `listen 127.0.0.1:<port>: …`. "
        "Nothing",
        "  listens then.",
        "",
        f"Frames on the mediation channel use the same {P.HEADER_SIZE}-byte header and the {_size(P.MAX_PAYLOAD)} "
        "payload limit. Each guest connection",
        "is a stream:",
        "",
        *_table(med),
        f"| {_group((F.PING, F.PONG))} | {_names((F.PING, F.PONG), '/')} | host→agent / agent→host | as on the "
        "main channel (handy to know earlier frames were processed) |",
        f"| {_hex(F.ERROR)} | ERROR | agent→host | malformed frame: MDATA/MCLOSE on stream 0, MCUT/MRESUME on a "
        "non-zero stream, an unknown type |",
        "",
        "- **Guest finishes sending** (read EOF, e.g. `shutdown(SHUT_WR)` or `close`): the agent sends `MEOF` and "
        "keeps",
        "  the connection for the answer; the host half-closes its target connection and ends the stream with "
        "`MCLOSE`",
        "  when the target closes. On a read error the agent sends `MCLOSE` with reason `read: <strerror>`; when",
        "  writing to the program fails, `write: <strerror>`. Whatever the host had queued for it is dropped.",
        "- **Host sends MCLOSE**: the agent writes what is still queued for that connection, then closes the guest "
        "socket",
        "  (the program reads the data, then EOF). It sends nothing more for that stream and does not answer the "
        "MCLOSE.",
        "- Frames for a stream that is not open (e.g. crossing an MCLOSE) are ignored.",
        "- **MCUT**: every open connection is closed at once (queued data is dropped) and the agent sends",
        f"  `MCLOSE` with reason `{reason.CUT}` for each one, so the host knows exactly which streams ended (an "
        "MOPEN that was in",
        "  flight is followed by its MCLOSE). While cut, the listener stays bound: **new connections are accepted "
        "and",
        "  immediately closed** (the program's connect succeeds, then it reads EOF or gets ECONNRESET); no MOPEN is "
        "sent.",
        "  The agent processes the mediation channel before accepting in each loop round, so a connection made after",
        "  the host's MRESUME was delivered is accepted. The cut state survives a reconnection of the channel.",
        "- **Backpressure**: agent→host writes block like on the main channel, so the host must keep reading the",
        "  mediation channel while it writes to it. Host→guest bytes are written to the non-blocking guest socket; "
        "what",
        f"  does not fit is queued per connection. While any connection has ≥ {_size(P.MED_BUF_CAP)} queued, the "
        "agent stops reading the",
        "  mediation channel (the main channel is unaffected); if that connection's program then makes no progress "
        "for",
        f"  {_time(P.MED_STALL_MS)}, the agent closes it with `MCLOSE` reason `{reason.BUFFER_OVERFLOW}` and "
        "resumes reading.",
        "- **Channel lost**: every guest connection is closed (no frames). In a VM the port is reopened every "
        f"{_time(P.PORT_RETRY_MS)}; in",
        "  test mode it is not reopened (the main channel keeps working). Meanwhile new guest connections are "
        "accepted",
        "  and immediately closed, as while cut.",
        "- **The host fails closed** (the guest is hostile, as on the main channel): from the agent it accepts only "
        "MOPEN,",
        "  MDATA, MCLOSE, MEOF, PONG and ERROR; the per-connection types only on a non-zero stream; MOPEN only empty "
        "and",
        "  only for a stream that is not open. Any other frame, or one it cannot decode (a length over the limit), "
        "closes",
        "  the port for the rest of the boot: every target connection and the host's end of the port are closed (the",
        "  agent sees the channel lost, above, so every guest connection is closed and new ones are accepted and "
        "closed),",
        "  a reconnection of the port is refused, `mediationReady` is saved false (detail `mediation channel closed`,",
        "  error `protocol violation: <reason>; …`) and one line `--- microagent: mediation channel failed: <reason>; "
        "… ---`",
        "  goes to the serial log. The VM and the main channel keep running; the next boot starts with a fresh "
        "channel.",
        "  Each connection's host-side state (its queue, byte count, bridge task and target connection) is released",
        "  whichever side closes first.",
        "",
        "## Published ports",
        "",
        "`-p/--publish [HOST_IP:]HOST_PORT:GUEST_PORT` (and `Engine.publish`) forwards host TCP connections into the "
        "guest.",
        "The supervisor listens on `HOST_IP:HOST_PORT` (default `127.0.0.1`; another address only when the user names "
        "it)",
        "and relays each accepted connection to `127.0.0.1:GUEST_PORT` inside the guest through the agent, so it works",
        "with `--network isolated` (no NIC at all).",
        "",
        "**Channel: the agent port.** The relay shares the agent channel with exec, not the mediation port: the agent",
        "port exists in every VM, the mediation port only when mediation is configured (and quarantine cuts "
        "mediation,",
        "whose frames are guest-initiated; published ports are host-initiated). Sharing one channel could let one",
        "connection stall the others and every exec (the agent's writes block, and the host pauses reading the "
        "channel",
        "for a congested exec client); per-connection windows remove that: neither side ever sends more on a port "
        "stream",
        "than the other has room for, so a port stream never makes the reader of the channel wait.",
        "",
        "Each host connection is a stream whose non-zero id the host chooses (random, like exec streams):",
        "",
        *_table(pub),
        "",
        "- **Windows.** The agent reads from the guest socket only while it has credit and sends PACK after writing "
        "host",
        "  bytes to it (at least every `PUBLISH_WINDOW/4` bytes, and whenever its queue empties). The supervisor "
        "acknowledges",
        "  guest bytes only once the host client's socket has taken them (its write buffer is 64 KiB), so a host "
        "client",
        "  that reads nothing holds at most one window plus that buffer on the host and stalls only its own "
        "connection.",
        "  The supervisor reads from a host client only within the agent's credit, and only while its write buffer "
        "towards",
        "  the agent is under its 1 MiB bound.",
        "- **Half-close and close.** Each side sends PEOF once. When the agent has both sent PEOF (read EOF from the "
        "guest",
        "  program) and received PEOF (and shut down its write side), it closes the guest socket and sends PCLOSE. A "
        "read",
        "  or write error on the guest socket gives `PCLOSE read: …` / `write: …`. The host sends PCLOSE to abort "
        "(client",
        "  reset, unpublish, quarantine, a protocol violation); the agent closes the guest socket (dropping what is "
        "queued)",
        "  and **answers with PCLOSE** unless it had already sent one, so every stream ends with exactly one agent "
        "PCLOSE",
        "  and the host frees the id only then. Frames for a stream the agent does not know are ignored. On the host, "
        "an agent",
        "  PCLOSE without a reason ends the client's connection with a FIN (after what is queued); one with a reason",
        "  (connect refused, reset by the guest program) with a reset, as a direct TCP connection would.",
        "- **Hostile agent.** The supervisor drops (and counts in `droppedFrames`) a port frame on a stream it did not",
        "  open or on stream 0. PDATA beyond the window or after the agent's PEOF, or a PACK for more bytes than are",
        "  unacknowledged, ends that connection (`PCLOSE protocol: …`); the channel stays up.",
        "- **Bounds.** At most 256 open connections per workspace on the host (more are closed at once; the agent "
        "refuses",
        f"  beyond {P.PUB_MAX_CONNS} with `PCLOSE {reason.TOO_MANY}`). A connection accepted while the workspace is "
        "not `running`",
        "  (booting, quarantined, channel lost) is closed at once.",
        "- **Channel lost / VM exit.** Every connection is closed (reset) on both sides without frames; the listeners "
        "stay",
        "  bound for the supervisor's life (VM restarts included), refusing connections until the agent is ready "
        "again.",
        "- **Listeners.** Bound by the supervisor before the VM boots: a taken port fails the start",
        "  (`host port 127.0.0.1:8888 is already in use …`) and the engine checks the same before `create`/`start`",
        "  write anything. `HOST_PORT` 0 binds a free port at each start. `status --json` shows",
        "  `publish: [{hostIp, hostPort, guestPort, listening, error, dynamic}]` (the bound port while running).",
        "  `Engine.publish(name, guest_port, host_port=0, host_ip=\"127.0.0.1\") -> (host_ip, host_port)` and",
        "  `Engine.unpublish(name, host_port, host_ip)` add and remove listeners on a running workspace (control ops",
        "  `publish`/`unpublish` on the supervisor's socket); they last until unpublished or the workspace stops.",
        "",
        "## Boot (as PID 1)",
        "",
        "1. Mount `/proc`, `/sys`, `devtmpfs` on `/dev`.",
        f"2. Load the modules listed one per line (paths relative to `/`) in `/{P.MODULES_ORDER}`, in that order, "
        "with",
        "   `finit_module` (`EEXIST` is fine), except the disk and NIC drivers (`virtio_blk`, `virtio_net`), which "
        "wait for",
        "   the first CONFIG. Read the kernel command line: "
        f"`{P.BootArg.ROOT}<device>` (a path, or a name under `/dev`; default",
        f"   `{P.DEFAULT_ROOT_DEVICE}`) and `{P.BootArg.READ_ONLY}1` (mount it read-only).",
        f"3. Wait (≤ {_time(P.DEVICE_WAIT_MS)}) for the virtio-serial port whose `/sys/class/virtio-ports/*/name` is "
        f"`{P.AGENT_PORT_NAME}`,",
        "   open it and send HELLO. A template VM is snapshotted here, so what follows happens in each clone.",
        "4. At every CONFIG: take its env, set the hostname, the clock and the seed. At the first one only: load the",
        f"   late modules, wait (≤ {_time(P.DEVICE_WAIT_MS)}) for the root device, mount it as ext4 on `/newroot`, "
        "move `/dev`, `/proc`, `/sys`",
        "   into it, free the initramfs and switch root (`MS_MOVE` + `chroot`); mount `/dev/pts`, `/dev/shm`, `/run` "
        "and",
        f"   `/tmp` (tmpfs); bring `lo` up (with network `{P.NetworkMode.USER}` also `eth0` 10.0.2.15/24 via "
        "10.0.2.2), do the mounts, set up",
        "   mediation and spawn the console shell on `/dev/ttyS0` if it exists (respawned when it exits). Then send "
        "READY.",
        "5. Serve frames until HALT. If the root mount fails, print why on the console and power off.",
        "",
        "Messages for humans go to the console (`/dev/console`), prefixed `microagent-agent:`.",
        "",
        "## Test mode",
        "",
        "`agent --connect PATH` skips the boot steps and speaks the protocol over the unix socket at PATH (as a "
        "client)",
        "exactly as it does over the port, after sending HELLO and waiting for CONFIG (hostname, clock, seed and "
        "network",
        f"are not changed in this mode: network `{P.NetworkMode.USER}` and mounts are refused with "
        f"`{R.ERROR}not supported in test mode`).",
        f"With `--mediation-connect PATH2` the mediation channel is the unix socket at PATH2 (connected at the first "
        f"CONFIG with a `{C.MEDIATION_PORT}`",
        "entry); the listener is `127.0.0.1:<port>` on the host. `tests/test_agent_protocol.py` uses it to test the "
        "agent on the host.",
        "",
    ]
    return "\n".join(lines)
