"""The REST side of "a kernel owns its VM": which notebook a workspace serves, and actions that go through it.

A sandboxed kernel's VM (``nbk-…``) belongs to the kernel: halting or killing it under the kernel leaves the notebook
on a dead kernel. So the listing names each such workspace's kernel and notebook (``owner``), and ``halt``, ``stop``
and ``kill`` of one whose kernel this server runs are refused (409, with the kernel and notebook) unless the request
says what becomes of the kernel: ``{"kernel": "restart"}`` (the VM goes, the kernel restarts in a new one) or
``{"kernel": "shutdown"}`` (the kernel shuts down, which removes its VM). ``GET /kernels`` is
:mod:`..kernel_board` (preparation steps of the kernels being started) joined with the live sessions.
``POST /kernels/ID/sync`` and the post-save hook :func:`sync_on_save` bring a kernel's writable folder back
(:mod:`..notebook_sync`).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import tornado.web

from microagent_engine.errors import NotFound

from .. import kernel_board
from ..session_owner import owner_of
from .base import HANDLED, BadRequest, BaseHandler

#: what a request may ask of the kernel of a workspace it halts, stops or kills
KERNEL_CHOICES = ("restart", "shutdown")


class KernelOwned(Exception):
    """The workspace runs a kernel of this server; the request did not say what to do with it."""

    def __init__(self, message: str, owner: dict[str, Any]) -> None:
        super().__init__(message)
        self.owner = owner


async def notebooks_by_kernel(handler: BaseHandler) -> dict[str, str]:
    """kernel id -> the notebook's path now (a renamed notebook keeps its kernel), for this server's sessions."""
    manager = handler.settings.get("session_manager")
    if manager is None:
        return {}
    try:
        sessions = await manager.list_sessions()
    except Exception:  # noqa: BLE001 (the listing still answers without notebook names)
        return {}
    return {s["kernel"]["id"]: s.get("path", "") for s in sessions if isinstance(s.get("kernel"), dict)}


def _kernel_running(handler: BaseHandler, kernel_id: object) -> bool:
    manager = handler.settings.get("kernel_manager")
    return isinstance(kernel_id, str) and manager is not None and kernel_id in manager


def owner_json(handler: BaseHandler, name: str, notebooks: dict[str, str]) -> dict[str, Any] | None:
    """The ``owner`` field of a workspace in the listing (None: nobody's session)."""
    owner = owner_of(handler.engine, name)
    if owner is None:
        return None
    kid = owner.get("kernelId")
    if isinstance(kid, str) and kid in notebooks:
        owner["notebook"] = notebooks[kid]
    owner["thisServer"] = _kernel_running(handler, kid)
    owner.pop("pid", None)
    return owner


async def with_owners(handler: BaseHandler, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workspaces' JSON with their ``owner``."""
    notebooks = await notebooks_by_kernel(handler)
    for item in items:
        item["owner"] = owner_json(handler, item["name"], notebooks)
    return items


async def kernel_action(handler: BaseHandler, name: str, action: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Halt/stop/kill ``name``: None when no kernel of this server owns it (the caller acts on the VM); else
    what was done to the kernel, or :class:`KernelOwned` when the request did not say."""
    owner = owner_of(handler.engine, name)
    if owner is None or owner.get("kind") != "kernel" or not _kernel_running(handler, owner.get("kernelId")):
        return None
    kid = str(owner["kernelId"])
    choice = body.get("kernel")
    notebook = (await notebooks_by_kernel(handler)).get(kid) or owner.get("notebook") or "?"
    if choice is None:
        raise KernelOwned(f"{name} runs the kernel of notebook {notebook}: {action} it through that kernel, "
                          f"with \"kernel\": \"restart\" (the kernel restarts in a new VM) or \"shutdown\"",
                          {"kernelId": kid, "notebook": notebook})
    if choice not in KERNEL_CHOICES:
        raise BadRequest(f"'kernel' must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    manager = handler.settings["kernel_manager"]
    if choice == "shutdown":
        await manager.shutdown_kernel(kid)  # the provisioner removes the VM
    else:
        # the action ends the kernel's VM: its auto-restarter, which polls the kernel, must not see it dead and
        # restart it beside the restart below (two launches of one kernel); the restart starts it again
        km = manager.get_kernel(kid)
        km.stop_restarter()
        try:
            await handler.call(getattr(handler.engine, action), name)
        except BaseException:
            km.start_restarter()
            raise
        await manager.restart_kernel(kid)  # the provisioner finds its VM gone and starts the kernel in a new one
    return {"name": name, "kernel": choice, "kernelId": kid, "notebook": notebook}


def _syncing() -> dict[str, Any]:
    """This process's kernels with a writable folder, by kernel id (empty until a sandboxed kernel ran here: the
    provisioner, which imports jupyter_client's provisioning, is not loaded before)."""
    if "microagent_jupyter.provisioner" not in sys.modules:
        return {}
    from ..provisioner import SYNCING

    return SYNCING


def sync_on_save(model: dict[str, Any] | None = None, os_path: str = "", **_kwargs: Any) -> None:
    """The contents manager's post-save hook: a saved notebook's kernel brings its writable folder back (in a
    thread: the save answers at once; failures are logged by the provisioner)."""
    if not os_path or (model or {}).get("type") != "notebook":
        return
    notebook_dir, notebook_name = os.path.dirname(os_path), os.path.basename(os_path)
    for prov in list(_syncing().values()):
        if prov.serves(notebook_dir, notebook_name):
            threading.Thread(target=prov.sync_quietly, name="microagent-sync", daemon=True).start()


class SyncHandler(BaseHandler):
    """POST /kernels/ID/sync: bring that kernel's writable folder back into the notebook's folder now."""

    @tornado.web.authenticated
    async def post(self, kernel_id: str) -> None:
        try:
            prov = _syncing().get(kernel_id)
            if prov is None:
                raise NotFound(f"kernel {kernel_id} of this server has no writable folder (set writable_folder in "
                               f"the sandboxed kernelspec's config, e.g. \"writable_folder\": \"results\")")
            message = await self.call_long(prov.sync_files)
            self.send_json({"kernelId": kernel_id, "message": message})
        except HANDLED as exc:
            self.send_error_json(exc)


class KernelsHandler(BaseHandler):
    """GET /kernels: this server's sandboxed kernels (being prepared, ready or failed), by notebook."""

    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            notebooks = await notebooks_by_kernel(self)
            out = []
            for entry in kernel_board.entries():
                if entry["kernelId"] in notebooks:
                    entry["notebook"] = notebooks[entry["kernelId"]]
                out.append(entry)
            self.send_json(out)
        except HANDLED as exc:
            self.send_error_json(exc)


def prefill_kernel_pools(serverapp: Any) -> threading.Thread:
    """In a background thread: for every kernelspec run by the microagent provisioner, start its warm pool now (see
    :func:`~..provisioner.prefill_pool`), so that the first notebook after the server's start
    takes a kernel already resumed and answering. Its traits come from the kernelspec and the server's config (as
    for a kernel); a spec that cannot be read is logged and skipped."""
    def run() -> None:
        from ..provisioner import PROVISIONER_NAME, MicroagentProvisioner, prefill_pool

        try:
            specs = serverapp.kernel_spec_manager.get_all_specs()
        except Exception as exc:  # noqa: BLE001 (kernelspecs are the user's files; the server goes on)
            serverapp.log.warning("microagent: no warm pool at start: the kernelspecs could not be read (%s)", exc)
            return
        for name, entry in sorted(specs.items()):
            meta = ((entry.get("spec") or {}).get("metadata") or {}).get("kernel_provisioner") or {}
            if meta.get("provisioner_name") != PROVISIONER_NAME:
                continue
            try:
                provisioner = MicroagentProvisioner(kernel_id="", kernel_spec=None, parent=serverapp,
                                                    **(meta.get("config") or {}))
                if prefill_pool(provisioner):
                    serverapp.log.info("microagent: preparing a pooled kernel for %r", name)
            except Exception as exc:  # noqa: BLE001 (one bad kernelspec does not stop the server or the others)
                serverapp.log.warning("microagent: no warm pool for kernelspec %r: %s", name, exc)

    thread = threading.Thread(target=run, name="microagent-pool-prefill", daemon=True)
    thread.start()
    return thread
