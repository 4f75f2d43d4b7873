"""Live ipywidgets for a workspace: its status (with start/halt/kill) and its serial console log.

Background threads only mutate existing widget traits (``value``, ``disabled``, ``layout.display``): nothing is
recreated, so the views do not flicker, and nothing uses ``with output:`` from a thread. Closing a widget stops
its thread.
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

import ipywidgets as W
from traitlets import Bool, Float, Int, Unicode

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError, NotFound
from microagent_engine.states import ACTIVE
from microagent_engine.states import READINESS_SIGNALS as READINESS

from microagent_engine.render import readiness_text

from ._engine import tail_serial_log
from .display import state_badge



def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _volumes_text(volumes: Any) -> str:
    out = []
    for v in volumes or []:
        if isinstance(v, dict):
            name = v.get("name") or v.get("volume") or v.get("source") or "?"
            if v.get("kind") not in (None, "volume") and v.get("kind"):
                name = f"{v['kind']} {name}"
            target = v.get("mountpoint") or v.get("target") or v.get("mountPath") or v.get("guestPath") or ""
            mode = v.get("mode") or ("ro" if v.get("readOnly") else "")
            out.append(f"{name} → {target}" + (f" ({mode})" if mode else "") if target else str(name))
        else:
            out.append(str(v))
    return ", ".join(out)


class WorkspaceStatusWidget(W.VBox):
    """State, accelerator, profile and resources, readiness, volumes and uptime of one workspace, kept current.

    A daemon thread reads ``engine.status(name)`` every ``interval`` seconds and updates only the values that
    changed. The Start/Halt/Kill buttons run the engine call in a background thread.
    """

    workspace = Unicode("").tag(sync=True)
    state = Unicode("").tag(sync=True)
    interval = Float(0.75)
    polls = Int(0)
    busy = Bool(False)

    FIELDS = ("accelerator", "profile", "resources", *READINESS, "volumes", "uptime", "error")

    def __init__(self, engine: Engine, name: str, *, interval: float = 0.75, poll: bool = True, **kwargs: Any):
        self._engine = engine
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._title = W.HTML()
        self._rows: dict[str, tuple[W.HBox, W.HTML]] = {}
        rows = []
        for key in self.FIELDS:
            label = W.HTML(f"<b>{html.escape(key)}</b>", layout=W.Layout(width="130px"))
            value = W.HTML()
            row = W.HBox([label, value], layout=W.Layout(display="none"))
            self._rows[key] = (row, value)
            rows.append(row)
        self._buttons = {
            "start": W.Button(description="Start", icon="play", button_style="success", disabled=True),
            "halt": W.Button(description="Halt", icon="stop", button_style="warning", disabled=True),
            "kill": W.Button(description="Kill", icon="times", button_style="danger", disabled=True),
        }
        for verb, button in self._buttons.items():
            button.on_click(lambda _b, verb=verb: self.click(verb))
        self._kill_armed_at = 0.0
        self._message = W.HTML(layout=W.Layout(display="none"))
        self._data: dict[str, Any] = {}
        super().__init__(children=[self._title, *rows, W.HBox(list(self._buttons.values())), self._message],
                         workspace=name, interval=interval, **kwargs)
        self.add_class("microagent-status")
        self.refresh()
        self._thread: threading.Thread | None = None
        if poll:
            self._thread = threading.Thread(target=self._poll, name=f"microagent-status-{name}", daemon=True)
            self._thread.start()

    # ---- updating ------------------------------------------------------------------------------
    @staticmethod
    def _set(widget: Any, trait: str, value: Any) -> None:
        if getattr(widget, trait) != value:  # only changed values reach the frontend
            setattr(widget, trait, value)

    def _show(self, key: str, value: str | None) -> None:
        row, widget = self._rows[key]
        self._set(widget, "value", value or "")
        self._set(row.layout, "display", "flex" if value else "none")

    def refresh(self) -> dict[str, Any]:
        """Read the workspace's status once and update the view. Returns its ``to_json()``."""
        with self._lock:
            try:
                data = self._engine.status(self.workspace).to_json()
            except NotFound:
                data = {"name": self.workspace, "state": "deleted"}
            except MicroagentError as exc:  # e.g. a record being rewritten: show it, keep polling
                self._set_message(f"status failed: {exc}", error=True)
                return self._data
            self._data = data
            self.polls += 1
            state = data["state"]
            self._set(self, "state", state)
            self._set(self._title, "value", f"<b>Workspace {html.escape(self.workspace)}</b> &nbsp; "
                                            f"{state_badge(state)}")
            accel = data.get("accel")
            self._show("accelerator", html.escape(f"{accel} ({data.get('accelReason') or ''})") if accel else "")
            self._show("profile", html.escape(str(data.get("profile") or "")))
            res = data.get("resources") or {}
            self._show("resources", html.escape(f"{res['memoryMiB']} MiB memory, {res['cpuCount']} vCPU, "
                                                f"{res['sizeMiB']} MiB disk") if res else "")
            for key in READINESS:
                sig = data.get(key)
                if sig is None:
                    self._show(key, "")
                elif key == "mediationReady" and not data.get("mediation"):
                    self._show(key, "– not configured")
                else:  # text glyphs: they render without an emoji font
                    mark = "✓" if sig.get("ready") else "…" if state in ACTIVE else "–"
                    self._show(key, f"{mark} {html.escape(readiness_text(sig))}")
            self._show("volumes", html.escape(_volumes_text(data.get("volumes") or data.get("attachments"))))
            started = _parse_time(data.get("startedAt"))
            uptime = ""
            if state in ACTIVE and started:
                uptime = _duration((datetime.now(timezone.utc) - started).total_seconds())
            self._show("uptime", uptime)
            self._show("error", html.escape(data.get("error") or ""))
            if not self.busy:  # the engine says which actions this state allows; the buttons follow
                allowed = data.get("actions") or []
                for verb, button in self._buttons.items():
                    self._set(button, "disabled", verb not in allowed)
            return data

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a poller must survive e.g. a closed comm
                if self._stop.is_set():
                    return

    def _set_message(self, text: str, error: bool = False) -> None:
        color = "#cf222e" if error else "#57606a"
        self._set(self._message, "value", f'<span style="color:{color}">{html.escape(text)}</span>' if text else "")
        self._set(self._message.layout, "display", "block" if text else "none")

    # ---- actions -------------------------------------------------------------------------------
    KILL_CONFIRM_SECONDS = 5.0

    def click(self, verb: str) -> threading.Thread | None:
        """A button press. Kill asks first: the first press arms it ("Really kill?"), a second press within
        ``KILL_CONFIRM_SECONDS`` kills, as the side panel's confirmation does."""
        kill = self._buttons["kill"]
        if verb != "kill":
            return self.action(verb)
        if time.monotonic() - self._kill_armed_at > self.KILL_CONFIRM_SECONDS:
            self._kill_armed_at = time.monotonic()
            self._set(kill, "description", "Really kill?")
            self._set_message("Kill ends the VM at once, without a clean shutdown. Press again to confirm.")
            threading.Timer(self.KILL_CONFIRM_SECONDS, self._disarm_kill, kwargs={"expired_only": True}).start()
            return None
        self._disarm_kill()
        return self.action("kill")

    def _disarm_kill(self, expired_only: bool = False) -> None:
        if expired_only and time.monotonic() - self._kill_armed_at < self.KILL_CONFIRM_SECONDS - 0.05:
            return  # re-armed since this timer started
        if expired_only and self._kill_armed_at:
            self._set_message("")
        self._kill_armed_at = 0.0
        self._set(self._buttons["kill"], "description", "Kill")

    def action(self, verb: str, wait: bool = False) -> threading.Thread:
        """Run ``engine.<verb>(name)`` (start, halt, stop, kill) in a background thread."""
        if verb not in ("start", "halt", "stop", "kill"):
            raise ValueError(f"unknown action {verb!r}")
        self.busy = True
        for button in self._buttons.values():
            self._set(button, "disabled", True)
        self._set_message(f"{verb}…")

        def work() -> None:
            try:
                getattr(self._engine, verb)(self.workspace)
                self._set_message("")
            except Exception as exc:  # noqa: BLE001 - shown in the widget
                self._set_message(f"{verb} failed: {exc}", error=True)
            finally:
                self.busy = False
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001
                    pass

        thread = threading.Thread(target=work, name=f"microagent-{verb}-{self.workspace}", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return thread

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        """Block until ``predicate(state)`` holds for the widget's (polled) state; returns that state."""
        deadline = time.monotonic() + timeout
        while not predicate(self.state):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workspace {self.workspace!r} still {self.state!r} after {timeout} s")
            time.sleep(0.05)
        self.resync()
        return self.state

    def resync(self) -> None:
        """Send the current values of every part again. Frontends get live updates anyway; this makes the state
        saved with a notebook run headless (nbclient keeps only messages of the cell being run) current."""
        with self._lock:
            for widget in (self, self._title, self._message, *self._buttons.values(),
                           *(w for pair in self._rows.values() for w in (pair[0].layout, pair[1]))):
                try:
                    widget.send_state()
                except Exception:  # noqa: BLE001 - closed comm
                    pass

    def close(self) -> None:
        self._stop.set()
        super().close()

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        d = self._data
        lines = [f"Workspace {self.workspace}: {d.get('state', '?')}"]
        for key in self.FIELDS:
            row, value = self._rows[key]
            if row.layout.display != "none":
                text = re.sub(r"<[^>]+>", "", value.value).replace("&amp;", "&")
                lines.append(f"  {key}: {html.unescape(text)}")
        return "\n".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]")


class SerialLogWidget(W.VBox):
    """The workspace's serial console, tailed live in a daemon thread.

    Keeps the last ``max_lines`` lines. Follows by default (the view stays at the newest line); ``paused``
    freezes the view while lines keep being collected. Closing the widget ends the thread.
    """

    workspace = Unicode("").tag(sync=True)
    paused = Bool(False).tag(sync=True)
    max_lines = Int(2000)
    line_count = Int(0)

    def __init__(self, engine: Engine, name: str, *, max_lines: int = 2000, follow: bool = True,
                 height: str = "300px", **kwargs: Any):
        self._engine = engine
        self._stop = threading.Event()
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._partial = ""
        self._buf_lock = threading.Lock()
        self._dirty = threading.Event()
        self._view = W.HTML(layout=W.Layout(width="100%"))
        self._pause = W.ToggleButton(value=False, description="Pause", icon="pause",
                                     tooltip="Pause or resume following the log")
        self._status = W.HTML()
        self._height = height
        super().__init__(children=[W.HBox([self._pause, self._status]), self._view], workspace=name,
                         max_lines=max_lines, **kwargs)
        self.add_class("microagent-serial-log")
        W.link((self._pause, "value"), (self, "paused"))
        self.observe(self._on_pause, names="paused")
        self._render()
        self._reader = threading.Thread(target=self._read, args=(follow,), name=f"microagent-logs-{name}",
                                        daemon=True)
        self._painter = threading.Thread(target=self._paint, name=f"microagent-logs-view-{name}", daemon=True)
        self._reader.start()
        self._painter.start()

    @property
    def text(self) -> str:
        """Everything in the buffer (at most ``max_lines`` lines)."""
        with self._buf_lock:
            return "\n".join([*self._lines, self._partial] if self._partial else self._lines)

    def _feed(self, chunk: bytes) -> None:
        text = _ANSI.sub("", chunk.decode("utf-8", errors="replace")).replace("\r\n", "\n").replace("\r", "")
        with self._buf_lock:
            parts = (self._partial + text).split("\n")
            self._partial = parts.pop()
            self._lines.extend(parts)
            self.line_count = len(self._lines)
        self._dirty.set()

    def _read(self, follow: bool) -> None:
        try:
            for chunk in tail_serial_log(self._engine, self.workspace, self._stop, follow=follow):
                self._feed(chunk)
            self._set_status("" if self._stop.is_set() else "(log ended)")
        except Exception as exc:  # noqa: BLE001 - shown in the widget
            self._set_status(f"log unavailable: {exc}")
        self._dirty.set()

    def _paint(self) -> None:
        while not self._stop.is_set():
            if self._dirty.wait(0.5) and not self._stop.is_set():
                self._dirty.clear()
                if not self.paused:
                    try:
                        self._render()
                    except Exception:  # noqa: BLE001 - comm closed under us
                        return
                time.sleep(0.2)  # at most ~5 repaints a second

    def _render(self) -> None:
        body = html.escape(self.text)
        # column-reverse keeps the scroll position pinned to the newest line (follow mode)
        value = (f'<div style="display:flex;flex-direction:column-reverse;overflow:auto;max-height:{self._height};'
                 f'background:#0d1117;color:#e6edf3;padding:4px 8px;border-radius:4px">'
                 f'<pre style="margin:0;font-size:12px;white-space:pre-wrap;overflow:visible !important;'
                 f'max-height:none !important;height:auto">{body}</pre></div>')
        # the <pre> must not scroll itself (JupyterLab styles output <pre>s with overflow): only the outer
        # column-reverse box scrolls, which keeps its newest line in view
        if self._view.value != value:
            self._view.value = value

    def _set_status(self, text: str) -> None:
        value = f'<span style="color:#57606a">{html.escape(text)}</span>' if text else ""
        if self._status.value != value:
            self._status.value = value

    def _on_pause(self, change: dict[str, Any]) -> None:
        self._pause.description = "Resume" if change["new"] else "Pause"
        self._pause.icon = "play" if change["new"] else "pause"
        if not change["new"]:
            self._dirty.set()

    @property
    def following(self) -> bool:
        return self._reader.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()
        super().close()

    def __repr__(self) -> str:
        lines = self.text.splitlines()[-40:]
        return f"Serial log of {self.workspace} (last {len(lines)} lines):\n" + "\n".join(lines)
