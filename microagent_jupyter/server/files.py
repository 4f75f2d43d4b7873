"""Upload and download one file of a workspace: ``PUT`` / ``GET /workspaces/NAME/files?path=/guest/path``.

Both go through the engine's ``cp`` (the guest agent when the workspace runs, its ext4 image when it is stopped),
with its rules: regular files only, the guest path normalised, a byte cap (:attr:`MicroagentConfig.max_transfer_mib`)
counted as the bytes arrive, and nothing kept from a transfer that failed. An upload is written to a private
temporary file on the host first; a download is always served as ``application/octet-stream`` with ``nosniff`` and
an ``attachment`` disposition, under a name reduced to safe characters: the browser saves it and never renders it.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from pathlib import Path

import tornado.web

from microagent_engine.storage.debugfs import normalize_guest_path

from .base import HANDLED, BadRequest, BaseHandler

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def download_name(guest_path: str) -> str:
    """The file name a browser is offered for ``guest_path``: its last part, safe characters only."""
    name = SAFE_NAME.sub("_", posixpath.basename(guest_path)).strip("._") or "download"
    return name[:120]


class FilesHandler(BaseHandler):
    def guest_path(self) -> str:
        raw = self.get_query_argument("path", "")
        if not raw:
            raise BadRequest("give the file's path in the guest: ?path=/absolute/path")
        if raw.endswith("/") and self.request.method == "PUT":
            raise BadRequest("give the path of the file to write, not of a directory")
        return normalize_guest_path(raw)

    @property
    def cap(self) -> int:
        return int(self.ma_config.max_transfer_mib) << 20

    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        try:
            path = self.guest_path()
            with tempfile.TemporaryDirectory(prefix="microagent-download-") as tmp:
                target = Path(tmp) / "file"
                await self.call_long(self.engine.cp, f"{name}:{path}", str(target), self.cap)
                self.set_header("Content-Type", "application/octet-stream")
                self.set_header("X-Content-Type-Options", "nosniff")
                self.set_header("Content-Disposition", f'attachment; filename="{download_name(path)}"')
                self.set_header("Content-Length", str(target.stat().st_size))
                with open(target, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        self.write(chunk)
                        await self.flush()
            await self.finish()
        except HANDLED as exc:
            self.send_error_json(exc)

    @tornado.web.authenticated
    async def put(self, name: str) -> None:
        try:
            path = self.guest_path()
            data = self.request.body
            if len(data) > self.cap:
                raise BadRequest(f"the upload is {len(data)} bytes; the limit is {self.cap} "
                                 f"(c.MicroagentConfig.max_transfer_mib)")
            with tempfile.TemporaryDirectory(prefix="microagent-upload-") as tmp:
                src = Path(tmp) / (download_name(path) or "upload")
                fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                where = await self.call_long(self.engine.cp, str(src), f"{name}:{path}", self.cap)
            self.send_json({"name": name, "path": path, "bytes": len(data), "copiedTo": str(where)}, 201)
        except HANDLED as exc:
            self.send_error_json(exc)
