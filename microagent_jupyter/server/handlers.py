"""REST handlers. Thin: every operation is one engine call, run off the event loop.

Commands (exec) run in their own thread pool (:data:`EXEC_POOL`), so any number of long commands cannot take
the threads that listing and status use; each has a default timeout (:data:`REST_EXEC_TIMEOUT`) and a capped
response (``maxOutput`` bytes of stdout and of stderr, then a marker and ``"truncated": true``). Logs are
read from the end of the file, never whole.

Errors become ``{"error": message, "type": name}`` with a status code chosen in :func:`error_status`.
No endpoint reads or writes a host path the server's ``MicroagentConfig.allowed_roots`` does not contain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado.iostream import StreamClosedError

from microagent_engine import Engine
from microagent_engine.client import DEFAULT_MAX_OUTPUT
from microagent_engine.errors import (
    AlreadyExists,
    Busy,
    ExecTimeout,
    GuestError,
    HostError,
    InvalidArgument,
    InvalidState,
    MicroagentError,
    NotFound,
)
from microagent_engine.logfiles import SERIAL_LOG_MAX, tail_bytes, tail_lines
from microagent_engine.images.sources import local_path
from microagent_engine.model import Attachment
from microagent_engine.workspace_spec import WorkspaceSpec

from .._engine import get_engine
from .config import MicroagentConfig

NAME = r"(?P<name>[^/]+)"
MAX_BODY_BYTES = 1024 * 1024  # a create or exec request is a few KiB; larger bodies are refused
TEXT = "text/plain; charset=utf-8"
#: seconds a REST exec may run when the request names no timeout (``"timeout": 0`` means none)
REST_EXEC_TIMEOUT = 300.0
#: threads for REST execs, apart from the default pool that every other (short) engine call uses; more
#: concurrent execs than this wait their turn, and never delay listing or status
EXEC_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="microagent-rest-exec")


class Forbidden(Exception):
    """A request named a host path outside the allowed roots (or a field that is never allowed over HTTP)."""


class BadRequest(Exception):
    """Malformed JSON or fields."""


def error_status(exc: BaseException) -> int:
    """The one place engine errors are mapped to HTTP status codes."""
    for cls, status in ((Forbidden, 403), (BadRequest, 400), (InvalidArgument, 400), (NotFound, 404),
                        (AlreadyExists, 409), (InvalidState, 409), (Busy, 409),
                        (ExecTimeout, 504), (GuestError, 502), (HostError, 503), (MicroagentError, 500)):
        if isinstance(exc, cls):
            return status
    return 500


HANDLED = (MicroagentError, Forbidden, BadRequest)


class BaseHandler(APIHandler):
    @property
    def engine(self) -> Engine:
        return self.settings["microagent_engine"]

    @property
    def ma_config(self) -> MicroagentConfig:
        return self.settings["microagent_config"]

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking engine call in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

    async def call_long(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call that may take as long as a guest command, in the exec pool."""
        return await asyncio.get_running_loop().run_in_executor(EXEC_POOL, lambda: fn(*args, **kwargs))

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def send_error_json(self, exc: BaseException) -> None:
        status = error_status(exc)
        if status >= 500:
            self.log.warning("microagent: %s: %s", type(exc).__name__, exc)
        self.send_json({"error": str(exc), "type": type(exc).__name__}, status)

    def body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        if len(self.request.body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is {len(self.request.body)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            data = json.loads(self.request.body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    async def guarded(self, coro_fn: Callable[[], Any]) -> None:
        try:
            await coro_fn()
        except HANDLED as exc:
            self.send_error_json(exc)

    # ---- host paths ----------------------------------------------------------------------------
    def resolved(self, att: Attachment) -> Attachment:
        """The attachment the engine will execute: its host file resolved (symlinks followed) and checked against
        the allowed roots. The engine receives this very object."""
        if att.host_path is None:
            return att
        self.check_host_path(att.source, att.kind)
        return dataclasses.replace(att, source=os.path.realpath(att.source))

    def check_host_path(self, path: str, what: str) -> None:
        roots = self.ma_config.resolved_roots()
        if not os.path.isabs(os.path.expanduser(path)):
            raise Forbidden(f"{what} {path!r}: give an absolute host path under one of the allowed roots "
                            f"({', '.join(roots) or 'none configured'})")
        real = os.path.realpath(os.path.expanduser(path))
        for root in roots:
            if os.path.commonpath([real, root]) == root:
                return
        hint = (f"allowed roots: {', '.join(roots)}" if roots else
                "no host paths are allowed; set c.MicroagentConfig.allowed_roots in the server's config")
        raise Forbidden(f"{what} {path!r} is outside the directories this server may read ({hint})")


def _int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{field!r} must be an integer")
    return value


def _str_or_none(value: Any, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key!r} must be a string")
    return value


#: what a create request may hold besides the WorkspaceSpec's fields (its JSON form)
REQUEST_FIELDS = ("name", "start")


class WorkspacesHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        async def go() -> None:
            infos = await self.call(self.engine.list)
            self.send_json([i.to_json() for i in infos])
        await self.guarded(go)

    @tornado.web.authenticated
    async def post(self) -> None:
        async def go() -> None:
            body = self.body()
            name, spec, start = self.create_request(body)
            info = await self.call(self.engine.create, name, spec)
            if start:
                info = await self.call(self.engine.start, info.name)
            self.set_header("Location", url_path_join(self.base_url, "microagent/api/workspaces", info.name))
            self.send_json(info.to_json(), 201)
        await self.guarded(go)

    def create_request(self, body: dict[str, Any]) -> tuple[str | None, WorkspaceSpec, bool]:
        """(name, spec, start) of a create request: a WorkspaceSpec in its JSON form plus ``name`` and ``start``.
        Host paths it names must lie under the allowed roots (the engine receives the resolved ones)."""
        for legacy in ("volumes", "disks", "bundles"):
            if legacy in body:
                raise BadRequest(f"{legacy!r} is the command-line form; send 'attachments': a list of "
                                 f"{{kind: volume|disk|bundle, source, mountpoint, name?, readOnly?}} objects")
        if "kernel" in body:
            raise Forbidden("'kernel' names a host file and is not accepted over HTTP; configure kernels on the "
                            "server host")
        fields = {k: v for k, v in body.items() if k not in REQUEST_FIELDS}
        if "cpuCount" in fields and "cpus" not in fields:  # the status JSON's spelling
            fields["cpus"] = fields.pop("cpuCount")
        name, start = body.get("name"), body.get("start", False)
        if name is not None and not isinstance(name, str):
            raise BadRequest("'name' must be a string")
        if not isinstance(start, bool):
            raise BadRequest("'start' must be true or false")
        spec = WorkspaceSpec.from_json(fields, what="create request")
        path = local_path(spec.image) if spec.image else None
        if path is not None:
            self.check_host_path(path, "image")
        for f in spec.files or ():
            self.check_host_path(str(f.src), "files[].src")
        if spec.attachments:
            spec = dataclasses.replace(spec, attachments=tuple(self.resolved(a) for a in spec.attachments))
        return name, spec, start


class SnapshotHandler(BaseHandler):
    """POST /workspaces/NAME/snapshot {"name": SNAPSHOT}: snapshot a running workspace (it runs on)."""

    @tornado.web.authenticated
    async def post(self, name: str) -> None:
        async def go() -> None:
            snapshot = _str_or_none(self.body().get("name"), "name")
            if not snapshot:
                raise BadRequest("'name' (the snapshot's name) is required")
            self.send_json(await self.call_long(self.engine.snapshot, name, snapshot), 201)
        await self.guarded(go)


class EgressHandler(BaseHandler):
    """GET /workspaces/NAME/egress: what its DNS and egress proxy refused, and its policy.
    POST /workspaces/NAME/egress {"allow": [ENTRY, ...]}: widen its allow-list (at once when it runs)."""

    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        async def go() -> None:
            self.send_json(await self.call(self.engine.egress, name))
        await self.guarded(go)

    @tornado.web.authenticated
    async def post(self, name: str) -> None:
        async def go() -> None:
            body = self.body()
            entries = body.get("allow")
            if set(body) - {"allow"} or not isinstance(entries, list) or not entries \
                    or not all(isinstance(e, str) for e in entries):
                raise BadRequest("send {\"allow\": [ENTRY, ...]}: names, *.suffix, presets such as @pypi, or CIDRs")
            info = await self.call(self.engine.allow, name, entries)
            self.send_json(info.to_json())
        await self.guarded(go)


class SnapshotsHandler(BaseHandler):
    """GET /snapshots; DELETE /snapshots/NAME."""

    @tornado.web.authenticated
    async def get(self) -> None:
        async def go() -> None:
            self.send_json(await self.call(self.engine.snapshots))
        await self.guarded(go)

    @tornado.web.authenticated
    async def delete(self, name: str) -> None:
        async def go() -> None:
            await self.call(self.engine.remove_snapshot, name)
            self.send_json({"name": name, "removed": True})
        await self.guarded(go)


class WorkspaceHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        async def go() -> None:
            info = await self.call(self.engine.status, name)
            self.send_json(info.to_json())
        await self.guarded(go)

    @tornado.web.authenticated
    async def delete(self, name: str) -> None:
        async def go() -> None:
            await self.call(self.engine.delete, name)
            self.send_json({"name": name, "deleted": True})
        await self.guarded(go)


class ActionHandler(BaseHandler):
    @tornado.web.authenticated
    async def post(self, name: str, action: str) -> None:
        async def go() -> None:
            info = await self.call(getattr(self.engine, action), name)
            self.send_json(info.to_json())
        await self.guarded(go)


class ExecHandler(BaseHandler):
    @tornado.web.authenticated
    async def post(self, name: str) -> None:
        async def go() -> None:
            body = self.body()
            unknown = set(body) - {"argv", "env", "cwd", "timeout", "stdin", "maxOutput"}
            if unknown:
                raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
            argv = body.get("argv")
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise BadRequest("'argv' must be a non-empty list of strings")
            env = body.get("env")
            if env is not None and (not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values())):
                raise BadRequest("'env' must be an object of string values")
            timeout = body.get("timeout", REST_EXEC_TIMEOUT)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
                raise BadRequest(f"'timeout' must be a number of seconds (default {REST_EXEC_TIMEOUT:.0f}; 0: none)")
            max_output = body.get("maxOutput", DEFAULT_MAX_OUTPUT)
            if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output <= 0:
                raise BadRequest(f"'maxOutput' must be a positive number of bytes (default {DEFAULT_MAX_OUTPUT})")
            stdin = body.get("stdin")
            if stdin is not None and not isinstance(stdin, str):
                raise BadRequest("'stdin' must be a string")
            result = await self.call_long(self.engine.exec, name, argv, env=env, cwd=body.get("cwd"),
                                          timeout=timeout or None, max_output=max_output,
                                          stdin=stdin.encode() if stdin is not None else None)
            self.send_json(result.to_json())
        await self.guarded(go)


class LogsHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        async def go() -> None:
            tail = self.get_query_argument("tail", None)
            try:
                n = int(tail) if tail is not None else None
                if n is not None and n < 0:
                    raise ValueError
            except ValueError:
                raise BadRequest(f"tail must be a non-negative integer, got {tail!r}") from None
            path = (await self.call(self.engine.status, name)).dir.serial_log
            if n is None:  # the current log (capped at SERIAL_LOG_MAX by rotation), read from its end anyway
                data = await self.call(tail_bytes, path, SERIAL_LOG_MAX)
                lines = data.decode(errors="replace").replace("\r\n", "\n").splitlines()
            else:
                lines = await self.call(tail_lines, path, n)
            if "application/json" in self.request.headers.get("Accept", "") or \
                    self.get_query_argument("format", "") == "json":
                self.send_json({"name": name, "lines": lines})
            else:
                self.finish("\n".join(lines) + ("\n" if lines else ""), set_content_type=TEXT)
        await self.guarded(go)


class LogStreamHandler(BaseHandler):
    """Chunked ``text/plain``: the log so far, then new output while the workspace runs (``follow=0``: no)."""

    _stop: threading.Event

    def on_connection_close(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()

    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        try:
            await self.call(self.engine.status, name)
        except HANDLED as exc:
            self.send_error_json(exc)
            return
        follow = self.get_query_argument("follow", "1") not in ("0", "false", "no")
        self._stop = threading.Event()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

        def pump() -> None:
            try:
                for chunk in self.engine.logs(name, follow=follow, stop=self._stop):
                    asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            except Exception:  # noqa: BLE001 - the stream just ends
                pass
            finally:
                asyncio.run_coroutine_threadsafe(queue.put(None), loop)

        self.set_header("Content-Type", TEXT)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        threading.Thread(target=pump, name=f"microagent-logstream-{name}", daemon=True).start()
        try:
            while (chunk := await queue.get()) is not None:
                self.write(chunk)
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self._stop.set()
            while not queue.empty():  # unblock the pump if it waits on a full queue
                queue.get_nowait()
        if not self.request.connection.stream or not self.request.connection.stream.closed():
            self.finish(set_content_type=TEXT)


class VolumesHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        async def go() -> None:
            volumes = self.engine.volumes
            vols = await self.call(volumes.list)
            self.send_json([v.to_json() for v in vols])
        await self.guarded(go)

    @tornado.web.authenticated
    async def post(self) -> None:
        async def go() -> None:
            volumes = self.engine.volumes
            body = self.body()
            unknown = set(body) - {"name", "sizeMiB"}
            if unknown:
                raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}; known: name, sizeMiB")
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest("'name' (a string) is required")
            size = _int(body.get("sizeMiB"), "sizeMiB")
            vol = await self.call(volumes.create, name, **({"size_mib": size} if size else {}))
            self.send_json(vol.to_json(), 201)
        await self.guarded(go)


class VolumeHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        async def go() -> None:
            volumes = self.engine.volumes
            vol = await self.call(volumes.get, name)
            self.send_json(vol.to_json())
        await self.guarded(go)

    @tornado.web.authenticated
    async def delete(self, name: str) -> None:
        async def go() -> None:
            volumes = self.engine.volumes
            force = self.get_query_argument("force", "0") in ("1", "true", "yes")
            await self.call(volumes.delete, name, force=force)
            self.send_json({"name": name, "deleted": True})
        await self.guarded(go)


class RootHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        from .._version import __version__
        self.send_json({"version": __version__, "stateDir": str(self.engine.state_dir),
                        "volumes": getattr(self.engine, "volumes", None) is not None,
                        "cp": getattr(self.engine, "cp", None) is not None})


def setup_handlers(web_app: Any, config: MicroagentConfig) -> None:
    engine = get_engine(config.state_dir)
    web_app.settings["microagent_engine"] = engine
    web_app.settings["microagent_config"] = config
    base = url_path_join(web_app.settings.get("base_url", "/"), "microagent", "api")
    routes = [
        (r"/?", RootHandler),
        (r"/workspaces/?", WorkspacesHandler),
        (rf"/workspaces/{NAME}/?", WorkspaceHandler),
        (rf"/workspaces/{NAME}/(?P<action>start|pause|resume|halt|stop|kill)/?", ActionHandler),
        (rf"/workspaces/{NAME}/exec/?", ExecHandler),
        (rf"/workspaces/{NAME}/snapshot/?", SnapshotHandler),
        (rf"/workspaces/{NAME}/egress/?", EgressHandler),
        (r"/snapshots/?", SnapshotsHandler),
        (rf"/snapshots/{NAME}/?", SnapshotsHandler),
        (rf"/workspaces/{NAME}/logs/?", LogsHandler),
        (rf"/workspaces/{NAME}/logs/stream/?", LogStreamHandler),
        (r"/volumes/?", VolumesHandler),
        (rf"/volumes/{NAME}/?", VolumeHandler),
    ]
    web_app.add_handlers(".*$", [(base + pattern, handler) for pattern, handler in routes])
