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
import threading
from typing import Any

import tornado.web
from jupyter_server.utils import url_path_join
from tornado.iostream import StreamClosedError

from microagent_engine.client import DEFAULT_MAX_OUTPUT
from microagent_engine.images.sources import local_path
from microagent_engine.logfiles import SERIAL_LOG_MAX, tail_bytes, tail_lines
from microagent_engine.workspace_spec import WorkspaceSpec

from .._engine import get_engine
from .base import HANDLED, NAME, TEXT, BadRequest, BaseHandler, Forbidden, _int, _str_or_none
from .config import MicroagentConfig
from .files import FilesHandler
from .kernels import KernelOwned, KernelsHandler, SyncHandler, kernel_action, with_owners

#: seconds a REST exec may run when the request names no timeout (``"timeout": 0`` means none)
REST_EXEC_TIMEOUT = 300.0


#: what a create request may hold besides the WorkspaceSpec's fields (its JSON form)
REQUEST_FIELDS = ("name", "start")


class WorkspacesHandler(BaseHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        async def go() -> None:
            infos = await self.call(self.engine.list)
            self.send_json(await with_owners(self, [i.to_json() for i in infos]))
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
            self.send_json((await with_owners(self, [info.to_json()]))[0])
        await self.guarded(go)

    @tornado.web.authenticated
    async def delete(self, name: str) -> None:
        async def go() -> None:
            await self.call(self.engine.delete, name)
            self.send_json({"name": name, "deleted": True})
        await self.guarded(go)


class ActionHandler(BaseHandler):
    """POST /workspaces/NAME/ACTION. Halt, stop or kill of a VM that runs one of this server's kernels goes
    through the kernel (:mod:`.kernels`)."""

    @tornado.web.authenticated
    async def post(self, name: str, action: str) -> None:
        async def go() -> None:
            if action in ("halt", "stop", "kill"):
                try:
                    done = await kernel_action(self, name, action, self.body())
                except KernelOwned as exc:
                    self.send_json({"error": str(exc), "type": "KernelOwned", **exc.owner}, 409)
                    return
                if done is not None:
                    self.send_json(done)
                    return
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
        (rf"/workspaces/{NAME}/files/?", FilesHandler),
        (rf"/workspaces/{NAME}/snapshot/?", SnapshotHandler),
        (rf"/workspaces/{NAME}/egress/?", EgressHandler),
        (r"/snapshots/?", SnapshotsHandler),
        (rf"/snapshots/{NAME}/?", SnapshotsHandler),
        (rf"/workspaces/{NAME}/logs/?", LogsHandler),
        (rf"/workspaces/{NAME}/logs/stream/?", LogStreamHandler),
        (r"/volumes/?", VolumesHandler),
        (r"/kernels/?", KernelsHandler),
        (r"/kernels/([0-9a-fA-F-]{1,64})/sync/?", SyncHandler),
        (rf"/volumes/{NAME}/?", VolumeHandler),
    ]
    web_app.add_handlers(".*$", [(base + pattern, handler) for pattern, handler in routes])
