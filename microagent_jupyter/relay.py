"""A host-side ZMQ relay between a Jupyter frontend and a sandboxed kernel: the frontend never talks to the
guest's sockets.

The relay binds the frontend's five endpoints (it *is* the kernel, for the frontend) and connects to
the guest kernel's published ports. Every message is checked and re-signed in both directions:

* frontend → guest (shell, control, stdin): the frontend's HMAC is verified with the frontend's key; the frames
  are re-signed with the guest's key (the guest never learns the frontend's key).
* guest → frontend: the guest's HMAC is verified with the guest key (bad or missing signatures are dropped);
  every message type on every channel has a schema with bounds and is rebuilt from its checked fields only
  (iopub: :meth:`OutputPolicy.filter_content`; replies: :data:`REPLY_SCHEMAS`; headers: the protocol's keys as
  bounded strings); ``comm_*`` and unknown types are dropped; then the frames are signed with the frontend's key.
* replies go to the frontend only for requests it sent (once, of the matching kind, on their channel), with the
  frontend's own request header as parent; ``input_request`` only while an execute_request allowed stdin; what is
  the host's to say in kernel_info (language, editor mode, extension, help links, debugger) the host says.
* no message ends the relay: one that breaks a rule's code is dropped and counted (:attr:`Relay.broken`).
* bytes are bounded (:func:`bounded_context`): no message over :data:`MAX_GUEST_MESSAGE`, a few per socket
  queue; iopub messages a non-reading frontend refuses are dropped, counted and then reported to it in a note.
* heartbeat: answered by the relay while the guest kernel is alive (``alive`` callable).
* endpoints may be ``tcp`` or ``ipc`` (:func:`endpoint`); the provisioner uses ipc sockets in private directories
  on both sides, so no other local user can reach a session's channels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from .output_policy import OutputPolicy, note

DELIM = b"<IDS|MSG>"
#: the session of messages the relay writes itself (notes, the idle status after a restart)
RELAY_SESSION = "microagent-relay"
CHANNELS = ("shell", "control", "stdin", "iopub", "hb")
MAX_GUEST_MESSAGE = 16 * 1024 * 1024  # above the output policy's 8 MiB per output; a larger one drops the connection
RCVHWM, SNDHWM = 2, 8  # messages queued per socket: with MAX_GUEST_MESSAGE, what bounds a session's bytes in ZMQ


def bounded_context() -> zmq.Context:
    """A ZMQ context whose sockets bound what a guest can make the host hold: no message over
    :data:`MAX_GUEST_MESSAGE` and at most :data:`RCVHWM` messages received but unread per socket, between cells
    too, however many a guest sends (a full queue pushes back to the guest, whose publisher drops). The relay
    also caps what it queues towards a slow frontend at :data:`SNDHWM` messages per socket."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAXMSGSIZE, MAX_GUEST_MESSAGE)
    ctx.setsockopt(zmq.RCVHWM, RCVHWM)  # (SNDHWM stays ZMQ's: a full send queue would block a client's request)
    return ctx
MAX_REMEMBERED = 1024  # requests the relay remembers (their headers become the parents of the guest's answers)
REPLY_OF = {f"{kind}_request": f"{kind}_reply" for kind in (
    "execute", "inspect", "complete", "history", "is_complete", "kernel_info", "comm_info", "shutdown", "interrupt",
    "usage")}
# what is the host's to say about the kernel, whatever the guest claims (see Relay.filter, kernel_info_reply)
LANGUAGE_INFO = {"name": "python", "mimetype": "text/x-python", "file_extension": ".py",
                 "codemirror_mode": {"name": "ipython", "version": 3}, "pygments_lexer": "ipython3",
                 "nbconvert_exporter": "python"}
HELP_LINKS = [{"text": "Python Reference", "url": "https://docs.python.org/3/"},
              {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"}]
_VERSION = re.compile(r"\d{1,4}(\.\d{1,6}){0,3}\Z")
_REPLY_TYPES = {
    "shell": {"execute_reply", "inspect_reply", "complete_reply", "history_reply", "is_complete_reply",
              "kernel_info_reply", "comm_info_reply", "shutdown_reply", "interrupt_reply"},
    "control": {"shutdown_reply", "interrupt_reply", "kernel_info_reply", "usage_reply"},
    "stdin": {"input_request"},
}


def endpoint(info: dict[str, Any], channel: str) -> str:
    """The ZMQ endpoint of ``channel`` (shell, iopub, …) in connection info ``info``, as jupyter_client forms it."""
    port = info[channel + "_port"]
    if info.get("transport") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"tcp://{info['ip']}:{port}"


class Signer:
    """HMAC-SHA256 signing as Jupyter's wire protocol defines it (over header, parent, metadata, content)."""

    def __init__(self, key: str | bytes) -> None:
        self.key = key.encode() if isinstance(key, str) else key

    def sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def verify(self, signature: bytes, parts: list[bytes]) -> bool:
        return hmac.compare_digest(signature, self.sign(parts))


def split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]] | None:
    """``(identities, [signature, header, parent, metadata, content, *buffers])`` or None when malformed."""
    try:
        i = frames.index(DELIM)
    except ValueError:
        return None
    rest = frames[i + 1:]
    return (frames[:i], rest) if len(rest) >= 5 else None


class Relay:
    """Runs in its own thread (:meth:`start`/:meth:`stop`). ``frontend`` and ``guest`` are connection-info dicts;
    ``alive()`` says whether the guest kernel still runs (heartbeats are answered only then)."""

    def __init__(self, frontend: dict[str, Any], guest: dict[str, Any], alive: Callable[[], bool],
                 policy: OutputPolicy | None = None, announce_idle: bool = False,
                 on_busy: Callable[[bool], None] | None = None) -> None:
        self.frontend, self.guest, self.alive = frontend, guest, alive
        #: told True when a request starts waiting for its reply with none waiting before, False when the last
        #: waiting one is answered (the idle timer of :mod:`.idle_sleep` runs in between)
        self.on_busy = on_busy
        # after a restart the frontend did not ask for (Halt from the panel, REST): once the new kernel answers
        # (:meth:`kernel_ready`), tell every subscriber, and each one that (re)connects, that it is idle, until it
        # is first asked to execute (jupyter_server and JupyterLab ignore the status of the server's own
        # kernel_info, so the notebook would show "Starting" until then)
        self.announce_idle = announce_idle
        self._idle_now = False  # announcing (set by the relay thread only)
        self._ready_event = threading.Event()
        self.policy = policy or OutputPolicy()
        self.front_signer, self.guest_signer = Signer(frontend["key"]), Signer(guest["key"])
        self.dropped = 0
        self.broken = 0  # messages whose rewriting raised (dropped; the relay goes on)
        self.unsolicited = 0  # guest replies to nothing the frontend asked (dropped)
        self.lost_to_slow_frontend = 0  # iopub messages a full queue refused since the last note
        self.guest_messages = 0  # messages received from the guest
        self._requests: OrderedDict[str, bytes] = OrderedDict()  # msg_id -> the frontend's request header
        self._pending: OrderedDict[str, tuple[str, str, bool]] = OrderedDict()  # -> (channel, reply type, stdin)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Bind and connect every socket, then relay in a background thread (binding errors raise here)."""
        self._thread = threading.Thread(target=self._main, name="microagent-relay", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def kernel_ready(self) -> None:
        """The guest kernel answered through the relay (see ``announce_idle``)."""
        self._ready_event.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- socket setup -------------------------------------------------------------------------------
    def _main(self) -> None:
        ctx = bounded_context()
        socks: dict[str, tuple[zmq.Socket, zmq.Socket | None]] = {}
        try:
            ident = b"microagent-relay-" + os.urandom(8).hex().encode()
            for ch in ("shell", "control", "stdin"):
                f = ctx.socket(zmq.ROUTER)
                f.linger = 0
                f.setsockopt(zmq.SNDHWM, SNDHWM)  # guest replies queued towards a slow frontend
                f.bind(endpoint(self.frontend, ch))
                g = ctx.socket(zmq.DEALER)
                g.linger = 0
                g.setsockopt(zmq.MAXMSGSIZE, MAX_GUEST_MESSAGE)
                # one identity on shell and stdin, as a Jupyter client has: the kernel addresses an input_request
                # to the identity its execute_request came from
                g.setsockopt(zmq.IDENTITY, ident)
                g.connect(endpoint(self.guest, ch))
                socks[ch] = (f, g)
            f = ctx.socket(zmq.XPUB)
            f.linger = 0
            f.setsockopt(zmq.SNDHWM, SNDHWM)  # guest outputs queued towards a slow frontend
            f.setsockopt(zmq.XPUB_NODROP, 1)  # a full queue says so (EAGAIN): the loss is counted and told
            f.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription (for announce_idle)
            f.bind(endpoint(self.frontend, "iopub"))
            g = ctx.socket(zmq.SUB)
            g.linger = 0
            g.setsockopt(zmq.MAXMSGSIZE, MAX_GUEST_MESSAGE)
            g.setsockopt(zmq.SUBSCRIBE, b"")
            g.connect(endpoint(self.guest, "iopub"))
            socks["iopub"] = (f, g)
            hb = ctx.socket(zmq.REP)
            hb.linger = 0
            hb.bind(endpoint(self.frontend, "hb"))
            socks["hb"] = (hb, None)
        except BaseException as exc:  # noqa: BLE001 (re-raised in start())
            self._error = exc
            self._ready.set()
            for f, g in socks.values():
                f.close(0)
                if g is not None:
                    g.close(0)
            ctx.term()
            return
        self._ready.set()
        poller = zmq.Poller()
        owner: dict[zmq.Socket, tuple[str, str]] = {}
        for ch, (f, g) in socks.items():
            poller.register(f, zmq.POLLIN)
            owner[f] = (ch, "front")
            if g is not None:
                poller.register(g, zmq.POLLIN)
                owner[g] = (ch, "guest")
        try:
            while not self._stop.is_set():
                if self._ready_event.is_set():
                    self._ready_event.clear()
                    if self.announce_idle:
                        self._idle_now = True
                        self._send_front("iopub", socks["iopub"][0], self._idle_status())
                for sock, _ in poller.poll(200):
                    ch, side = owner[sock]
                    frames = sock.recv_multipart()
                    if side == "guest":
                        self.guest_messages += 1
                    f, g = socks[ch]
                    if ch == "hb":
                        # a REP must answer before it can receive again: echo while the guest kernel is alive
                        f.send_multipart(frames if self.alive() else [b""], flags=zmq.NOBLOCK)
                    elif ch == "iopub" and side == "front":  # a subscription: answered only after a restart
                        if self._idle_now and frames and frames[0][:1] == b"\x01":
                            self._send_front("iopub", f, self._idle_status())
                        continue
                    elif side == "front":
                        out = self._guarded(self._to_guest, ch, frames)
                        if out is not None and g is not None:
                            try:  # never block the relay: while the guest is not connected, the request is lost
                                g.send_multipart(out, flags=zmq.NOBLOCK)  # (clients retry kernel_info)
                            except zmq.Again:
                                self.dropped += 1
                    else:
                        out = self._guarded(self._to_front, ch, frames)
                        if out is not None:
                            self._send_front(ch, f, out)
        finally:
            for f, g in socks.values():
                f.close(0)
                if g is not None:
                    g.close(0)
            ctx.term()

    def _send_front(self, channel: str, sock: zmq.Socket, frames: list[bytes]) -> None:
        """Send without blocking; what a full queue refuses is counted, and the frontend is told (once the queue
        takes messages again) how many iopub messages it did not get."""
        try:
            if channel == "iopub" and self.lost_to_slow_frontend:
                note = self._note(frames, f"{self.lost_to_slow_frontend} output message(s) were dropped: the "
                                          f"frontend did not read them fast enough")
                sock.send_multipart(note, flags=zmq.NOBLOCK)
                self.lost_to_slow_frontend = 0
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if channel == "iopub":
                self.lost_to_slow_frontend += 1

    def _idle_status(self) -> list[bytes]:
        """A status message from the relay itself: the kernel is idle (no parent: every frontend counts it)."""
        header = json.dumps({"msg_id": os.urandom(16).hex(), "msg_type": "status", "username": "microagent",
                             "session": RELAY_SESSION, "date": _now(), "version": "5.3"}).encode()
        body = [header, b"{}", b"{}", b'{"execution_state": "idle"}']
        return [b"kernel.microagent-relay.status", DELIM, self.front_signer.sign(body), *body]

    def _note(self, like: list[bytes], text: str) -> list[bytes]:
        """A stderr stream message from the relay itself, with the parent of the signed message ``like``."""
        i = like.index(DELIM)
        header = json.dumps({"msg_id": os.urandom(16).hex(), "msg_type": "stream", "username": "microagent",
                             "session": RELAY_SESSION, "date": _now(), "version": "5.3"}).encode()
        body = [header, like[i + 3], b"{}", json.dumps({"name": "stderr", "text": note(text) + "\n"}).encode()]
        return [*like[:i], DELIM, self.front_signer.sign(body), *body]

    # ---- message rewriting ------------------------------------------------------------------------------
    def _guarded(self, rewrite: Callable[..., list[bytes] | None], *args: Any) -> list[bytes] | None:
        """One message through ``rewrite``; whatever it raises drops that message (counted), never the relay."""
        try:
            return rewrite(*args)
        except Exception:  # noqa: BLE001 (a hostile message must not end the relay thread)
            self.dropped += 1
            self.broken += 1
            return None

    def _to_guest(self, channel: str, frames: list[bytes]) -> list[bytes] | None:
        parts = split(frames)
        if parts is None:
            self.dropped += 1
            return None
        idents, (sig, *body) = parts
        if not self.front_signer.verify(sig, body[:4]):
            self.dropped += 1
            return None
        self._remember(channel, body[0], body[3])
        return [*idents, DELIM, self.guest_signer.sign(body[:4]), *body]

    def _remember(self, channel: str, header_b: bytes, content_b: bytes) -> None:
        """Note a request of the frontend: its reply may come back (once), and only it may be a reply's parent."""
        header = json.loads(header_b)
        msg_id, msg_type = header.get("msg_id"), header.get("msg_type")
        if not isinstance(msg_id, str) or not isinstance(msg_type, str):
            return
        if msg_type == "execute_request":
            self.announce_idle = self._idle_now = False  # from now on the kernel's own status is the truth
        self._requests[msg_id] = header_b
        while len(self._requests) > MAX_REMEMBERED:
            self._requests.popitem(last=False)
        reply = REPLY_OF.get(msg_type)
        if reply is not None and channel in ("shell", "control"):
            stdin = msg_type == "execute_request" and json.loads(content_b).get("allow_stdin") is True
            if not self._pending and self.on_busy is not None:
                self.on_busy(True)
            self._pending[msg_id] = (channel, reply, stdin)
            while len(self._pending) > MAX_REMEMBERED:
                self._pending.popitem(last=False)

    def _parent_for(self, channel: str, msg_type: str, parent: Any) -> bytes | None:
        """The frontend's own request header to send as this guest message's parent, or None to drop the message:
        a reply must answer an outstanding request of its kind on its channel (once); ``input_request`` needs a
        running execute_request that allowed stdin; iopub keeps a known parent (else none)."""
        msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
        known = self._requests.get(msg_id) if isinstance(msg_id, str) else None
        if channel == "iopub":
            return known if known is not None else b"{}"
        pending = self._pending.get(msg_id) if isinstance(msg_id, str) else None
        if known is None or pending is None:
            return None
        if channel == "stdin":
            return known if msg_type == "input_request" and pending[2] else None
        if pending[:2] != (channel, msg_type):
            return None
        del self._pending[msg_id]
        if not self._pending and self.on_busy is not None:
            self.on_busy(False)
        return known

    def _to_front(self, channel: str, frames: list[bytes]) -> list[bytes] | None:
        parts = split(frames)
        if parts is None:
            self.dropped += 1
            return None
        idents, (sig, header_b, parent_b, meta_b, content_b, *buffers) = parts
        if not self.guest_signer.verify(sig, [header_b, parent_b, meta_b, content_b]):
            self.dropped += 1
            return None
        try:
            header = json.loads(header_b)
            content = json.loads(content_b)
            parent = json.loads(parent_b)
            json.loads(meta_b)
        except ValueError:
            self.dropped += 1
            return None
        msg_type = header.get("msg_type") if isinstance(header, dict) else None
        if not isinstance(msg_type, str):
            self.dropped += 1
            return None
        known_parent = self._parent_for(channel, msg_type, parent)
        if known_parent is None:
            self.dropped += 1
            self.unsolicited += 1
            return None
        parent_b = known_parent
        new = self.filter(channel, msg_type, content)
        if new is None:
            self.dropped += 1
            return None
        content_b = json.dumps(new).encode()
        header_b = json.dumps(_header(header, msg_type)).encode()
        body = [header_b, parent_b, b"{}", content_b]
        if channel == "iopub" and idents:
            idents = [idents[0][:200]]
        return [*idents, DELIM, self.front_signer.sign(body), *body]  # buffers dropped (comm payloads)

    def filter(self, channel: str, msg_type: str, content: Any) -> dict[str, Any] | None:
        """The content the frontend may see for one guest message, or None to drop it."""
        if msg_type.startswith("comm_") or not isinstance(content, dict):
            return None
        if channel == "iopub":
            if msg_type == "status" and content.get("execution_state") == "restarting":
                return {"execution_state": "restarting"}
            return self.policy.filter_content(msg_type, content)
        if msg_type not in _REPLY_TYPES.get(channel, ()):
            return None
        if msg_type == "execute_reply":
            self.policy.new_cell()
        rule = REPLY_SCHEMAS.get(msg_type)
        return None if rule is None else rule(self, content)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _header(header: dict[str, Any], msg_type: str) -> dict[str, Any]:
    """The guest's header with only the protocol's keys, each a bounded string."""
    out = {k: _str(header.get(k), 128) for k in ("msg_id", "username", "session", "date", "version")}
    return {**out, "msg_type": msg_type[:64]}


def _str(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _status(content: dict[str, Any], allowed: tuple[str, ...] = ("ok", "error", "aborted")) -> str:
    status = content.get("status")
    return status if status in allowed else "error"


def _strings(value: Any, count: int, each: int) -> list[str]:
    return [v[:each] for v in value[:count] if isinstance(v, str)] if isinstance(value, list) else []


def _execute_reply(relay: Relay, c: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": _status(c), "execution_count": _int(c.get("execution_count")),
                           "user_expressions": {}, "payload": []}
    if out["status"] == "error":  # ename/evalue/traceback bounded as the iopub error message is
        out.update(relay.policy.filter_content("error", c) or {})
    for p in c.get("payload")[:10] if isinstance(c.get("payload"), list) else []:
        if isinstance(p, dict) and p.get("source") == "page":  # the pager: its bundle passes the output policy
            data, _ = relay.policy.filter_bundle(p.get("data"), None)
            out["payload"].append({"source": "page", "data": data, "start": _int(p.get("start"))})
    return out


def _inspect_reply(relay: Relay, c: dict[str, Any]) -> dict[str, Any]:
    data, metadata = relay.policy.filter_bundle(c.get("data") or {"text/plain": ""}, c.get("metadata"))
    return {"status": _status(c), "found": c.get("found") is True, "data": data, "metadata": metadata}


def _complete_reply(_relay: Relay, c: dict[str, Any]) -> dict[str, Any]:
    return {"status": _status(c), "matches": _strings(c.get("matches"), 2000, 1000),
            "cursor_start": _int(c.get("cursor_start")), "cursor_end": _int(c.get("cursor_end")), "metadata": {}}


def _history_reply(_relay: Relay, c: dict[str, Any]) -> dict[str, Any]:
    entries = []
    for e in c.get("history")[:1000] if isinstance(c.get("history"), list) else []:
        if isinstance(e, list) and len(e) == 3 and isinstance(e[2], str):  # (session, line, input); no outputs
            entries.append([_int(e[0]), _int(e[1]), e[2][:64 * 1024]])
    return {"status": _status(c), "history": entries}


def _is_complete_reply(_relay: Relay, c: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": _status(c, ("complete", "incomplete", "invalid", "unknown"))}
    indent = c.get("indent")
    if out["status"] == "incomplete":
        out["indent"] = indent[:80] if isinstance(indent, str) and not indent.strip(" \t") else ""
    return out


def _usage_reply(_relay: Relay, c: dict[str, Any]) -> dict[str, Any]:
    def numbers(d: Any) -> dict[str, float]:
        return {str(k)[:40]: v for k, v in list(d.items())[:20] if isinstance(v, (int, float))
                and not isinstance(v, bool)} if isinstance(d, dict) else {}

    return {**numbers(c), "host_virtual_memory": numbers(c.get("host_virtual_memory"))}


#: every reply type the frontend may see from a guest, each rebuilt from its checked, bounded fields only
REPLY_SCHEMAS: dict[str, Callable[[Relay, dict[str, Any]], dict[str, Any]]] = {
    "execute_reply": _execute_reply,
    "inspect_reply": _inspect_reply,
    "complete_reply": _complete_reply,
    "history_reply": _history_reply,
    "is_complete_reply": _is_complete_reply,
    "kernel_info_reply": lambda _r, c: kernel_info(c),
    "comm_info_reply": lambda _r, c: {"status": _status(c), "comms": {}},  # guest comms never reach the page
    "shutdown_reply": lambda _r, c: {"status": _status(c), "restart": c.get("restart") is True},
    "interrupt_reply": lambda _r, c: {"status": _status(c)},
    "usage_reply": _usage_reply,
    "input_request": lambda _r, c: {"prompt": _str(c.get("prompt"), 4096), "password": c.get("password") is True},
}


#: the host's first line of the kernel's banner (the console and the kernel's help show it)
SANDBOX_BANNER = ("Python in a microagent sandbox: this kernel runs in a microVM, with the notebook's folder copied "
                  "to /notebook; the host's files, network and secrets are out of its reach unless granted.\n")


def kernel_info(content: dict[str, Any]) -> dict[str, Any]:
    """The kernel_info_reply the frontend sees: the language, its editor mode, file extension and the Help menu are
    the host's to say (a guest could name ``text/html``, ``../../.bashrc`` or a phishing link); from the guest only
    version numbers that look like version numbers and a bounded plain-text banner; no debugger."""
    def version(value: Any, default: str) -> str:
        return value if isinstance(value, str) and _VERSION.match(value) else default

    lang = content.get("language_info") if isinstance(content.get("language_info"), dict) else {}
    banner = content.get("banner") if isinstance(content.get("banner"), str) else ""
    banner = "".join(c for c in banner[:4096] if c.isprintable() or c in "\n\t")
    banner = SANDBOX_BANNER + banner
    return {"status": "ok", "protocol_version": version(content.get("protocol_version"), "5.3"),
            "implementation": "ipython", "implementation_version": version(content.get("implementation_version"), ""),
            "language_info": {**LANGUAGE_INFO, "version": version(lang.get("version"), "")},
            "banner": banner, "help_links": HELP_LINKS, "debugger": False}


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat()
