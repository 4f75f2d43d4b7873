"""What every REST handler shares: the base class (engine, config, JSON in and out, guarded calls, host-path
checks), the request errors and the one mapping of errors to HTTP status codes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from jupyter_server.base.handlers import APIHandler

from microagent_engine import Engine
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
from microagent_engine.model import Attachment

from .config import MicroagentConfig

NAME = r"(?P<name>[^/]+)"
MAX_BODY_BYTES = 1024 * 1024  # a create or exec request is a few KiB; larger bodies are refused
TEXT = "text/plain; charset=utf-8"
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
