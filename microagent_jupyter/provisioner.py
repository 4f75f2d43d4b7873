"""A jupyter_client kernel provisioner whose kernel runs in a microVM: "Python 3 (microagent sandbox)".

``launch_kernel`` creates and boots a one-off workspace (a :class:`~microagent_engine.WorkspaceSpec` in its JSON
form from the kernelspec's ``metadata.kernel_provisioner.config.workspace_spec``), starts a
:class:`~.guest_kernel.GuestKernel` in it (ports published over the agent channel; network ``isolated`` unless
configured) and a :class:`~.relay.Relay` that binds the
frontend's ports on 127.0.0.1: the frontend only ever talks to the relay, which verifies the guest's signatures,
applies the output policy, drops guest comms and re-signs with the frontend's key. Interrupt is the kernel's own
``interrupt_request`` (the kernelspec's ``interrupt_mode``; SIGINT through the agent for ``send_signal``); restart
keeps the VM and starts a new kernel in it; shutdown (``cleanup``) kills and deletes the workspace. A new kernel takes
a VM of the warm pool when one is ready (:mod:`.kernel_pool`, ``pool_size``) and the pool refills behind it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Integer, Unicode, default

from microagent_engine import Engine
from microagent_engine.errors import InvalidArgument, MicroagentError
from microagent_engine.fsutil import private_dir
from microagent_engine.workspace_spec import WorkspaceSpec

from . import kernel_board, kernel_pool
from .guest_kernel import GuestKernel, KernelDied
from .notebook_files import GUEST_NOTEBOOK_DIR, Background, copy_into
from .notebook_sync import check_folder, sync_back
from .output_policy import OutputPolicy
from .idle_sleep import IdleSleeper
from .relay import Relay
from .session_owner import record_owner, remove_workspace, sweep
from .warm_python import find_warm, session_spec, split_env, start_session_workspace

PROVISIONER_NAME = "microagent-provisioner"
#: kernels of this process with a writable folder, by kernel id (the save hook and REST's sync find them here)
SYNCING: dict[str, "MicroagentProvisioner"] = {}


class MicroagentProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs the kernel of a notebook inside a microagent workspace (see the module docstring)."""

    workspace_spec = Dict(config=True, help="the kernel's workspace in the JSON form of microagent_engine."
                          "WorkspaceSpec (REST's: image, profile, memoryMiB, cpus, network, attachments, env, ...); "
                          "default: the built-in Python image with no network")
    warm = Bool(True, config=True, help="start from the warm Python snapshot (imports done) when one fits")
    notebook_files = Bool(True, config=True, help="copy the notebook's directory into the VM (read-only, at "
                          "/notebook) and start the kernel there")
    notebook_copy_max_mib = Integer(256, config=True, help="the byte budget of that copy, in MiB")
    writable_folder = Unicode("", config=True, help="a folder of the notebook's (e.g. 'results') that the kernel may "
                              "write at /notebook/FOLDER; its files come back on save, restart, shutdown and "
                              "request (see microagent_jupyter.notebook_sync); '' (the default): none")
    sync_max_mib = Integer(256, config=True, help="the byte budget of bringing that folder back, in MiB")
    pool_size = Integer(config=True, help="kernels resumed from the warm Python snapshot, started and kept ready per "
                        "kind of workspace, so that a new notebook's kernel does not wait for one (0: no pool; "
                        "default: $MICROAGENT_KERNEL_POOL, else 1; see microagent_jupyter.kernel_pool)")

    @default("pool_size")
    def _pool_size_default(self) -> int:
        return kernel_pool.default_size()

    state_dir = Unicode("", config=True, help="microagent state dir (default: $MICROAGENT_STATE_DIR or ~/.microagent)")

    workspace: str | None = None
    _sync_lock = threading.Lock()  # one sync at a time (per process: syncs are rare and short)
    _cwd: str | None = None
    _notebook: str | None = None
    _pool_key: tuple[str, WorkspaceSpec, dict[str, str]] | None = None  # what the pool keeps ready for us
    _launched = False  # a kernel of this provisioner has answered before (a launch now is a restart)
    kernel: GuestKernel | None = None
    relay: Relay | None = None
    sleeper: IdleSleeper | None = None  # puts the kernel's VM to sleep when no request has waited for a while
    _engine: Engine | None = None
    _front: dict[str, Any] = {}
    warm_from: str | None = None
    cold_reason = ""

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.state_dir or os.environ.get("MICROAGENT_STATE_DIR") or None)
        return self._engine

    @property
    def has_process(self) -> bool:
        return self.kernel is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if km is not None:
            # the frontend's channels: unix sockets in a private (0700) directory, which only this user can open
            # (a port on 127.0.0.1 would let any local user subscribe to the notebook's outputs)
            km.transport = "ipc"
            km.ip = str(self._ipc_dir() / f"k-{(self.kernel_id or secrets.token_hex(8))[:12]}")
            km.write_connection_file()  # the frontend's endpoints and key: the relay binds these
        env = kwargs.pop("env", None) or {}
        self._notebook = env.get("JPY_SESSION_NAME") or None  # the notebook's path (jupyter_server sets it)
        self._cwd = kwargs.get("cwd")  # the notebook's directory (jupyter_server starts kernels there)
        return await super().pre_launch(cmd=kwargs.pop("cmd", []), **kwargs)

    def _ipc_dir(self) -> Path:
        """A private directory for the relay's sockets, short enough for a unix socket path."""
        path = Path(self.engine.state_dir) / "run" / "kernels"
        if len(str(path)) > 70:
            path = Path("/tmp") / f"microagent-{os.getuid()}" / "kernels"
        return private_dir(path)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        kid = self._board_id
        kernel_board.begin(kid, self._notebook, self.workspace)
        self.engine.progress = lambda message: kernel_board.step(kid, message)
        try:
            await asyncio.to_thread(self._launch)
        except BaseException as exc:
            kernel_board.failed(kid, str(exc))
            raise
        finally:
            self.engine.progress = lambda _message: None
        kernel_board.ready(kid)
        if self.warm and self.pool_size > 0 and self._pool_key is not None:
            # the next notebook's kernel, prepared behind this one once it answers (not while it starts)
            kernel_pool.refill(self.engine, *self._pool_key, self.pool_size,
                               on_error=lambda why: self.log.warning("microagent: %s", why))
        return self.connection_info

    @property
    def _board_id(self) -> str:
        return str(self.kernel_id or id(self))

    def _launch(self) -> None:
        km = self.parent
        engine = self.engine
        if self.workspace is not None and not self._vm_running():
            # a restart after the VM went away (halted or killed from the panel or the CLI, or deleted): the
            # kernel starts in a new VM rather than failing ("workspace ... is halted")
            self.log.warning("microagent kernel %s: its VM is not running; the kernel restarts in a new one",
                             self.workspace)
            self._remove()
        copying = None  # the notebook's folder, copied into a new VM
        if self.workspace is None:
            self._pool_key = pool_request(self.workspace_spec)
            _key, spec, env = self._pool_key
            owner = {"kind": "kernel", "kernel_id": self.kernel_id, "notebook": self._notebook,
                     "writable": self._writable_guest_dir()}
            taken = kernel_pool.take(engine, self._pool_key[0]) if self.warm and self.pool_size > 0 else None
            if taken is not None:
                self.workspace, self.kernel = taken
                record_owner(engine, self.workspace, **owner)  # the pool's VM is now this kernel's
                engine.progress(f"Took {self.workspace} from the warm pool: resumed, its kernel answering")
                self.warm_from, self.cold_reason = "pool", ""
                kernel_board.workspace(self._board_id, self.workspace)
            else:
                self.workspace = f"nbk-{(self.kernel_id or secrets.token_hex(4))[:8]}-{secrets.token_hex(2)}"
                kernel_board.workspace(self._board_id, self.workspace)
                try:
                    sweep(engine)  # VMs of kernels whose server was killed hard
                    self.warm_from, self.cold_reason = start_session_workspace(
                        engine, self.workspace, spec, env, owned=True, warm=self.warm, progress=engine.progress,
                        owner=owner)
                    if self.cold_reason:
                        self.log.info("microagent kernel %s boots cold: %s", self.workspace, self.cold_reason)
                except BaseException:
                    self._remove()
                    raise
            if self.notebook_files and self._cwd:
                engine.progress("Copying the notebook's folder into the VM")
                # one guest exec beside the kernel's launch (or the pooled kernel's connection); it moves in below
                copying = Background(self._copy_notebook_files)
        if self.kernel is None:
            self.kernel = GuestKernel(engine, self.workspace)
        try:
            if not self.kernel.alive:  # (a kernel taken from the pool answers already)
                engine.progress("Starting the Python kernel")
                self.kernel.launch()
            frontend = km.get_connection_info() if km is not None else {}
            self.connection_info = {k: v for k, v in frontend.items() if k != "kernel_name"}  # key: bytes, as km's
            key = self.connection_info.get("key", b"")
            self._front = {**self.connection_info, "key": key.decode() if isinstance(key, bytes) else key}
            if self.relay is not None:  # a restart: jupyter_client removed its ipc files, so bind them afresh
                self._stop_relay()
            if self.relay is None:
                kernel = self.kernel
                self.sleeper = IdleSleeper(engine, str(self.workspace))
                self.relay = Relay(self._front, kernel.host_info, alive=lambda: kernel.alive,
                                   policy=OutputPolicy(server_origins=server_origins()),
                                   announce_idle=self._launched,  # a restart, in this VM or a new one
                                   on_busy=self.sleeper.on_busy)
                self.relay.start()
            self._wait_ready()
            cwd = copying.result() if copying is not None else None
            if cwd is not None:  # (no frontend has the kernel yet: it learns of it when this returns)
                self.kernel.move_to(cwd)
            self.relay.kernel_ready()
            if self.sleeper is not None:
                self.sleeper.start()
            self._launched = True
        except BaseException:
            self._remove()
            raise

    def _copy_notebook_files(self) -> str | None:
        """The notebook's directory, copied into the VM: the guest directory the kernel starts in (None: none)."""
        if not self.notebook_files or not self._cwd or not Path(self._cwd).is_dir():
            return None
        writable = check_folder(self.writable_folder) if self.writable_folder else None
        line = copy_into(self.engine, str(self.workspace), Path(self._cwd), self.notebook_copy_max_mib << 20,
                         writable=writable)
        self.log.info("microagent kernel %s: %s", self.workspace, line)
        if writable:
            SYNCING[self._board_id] = self
        return GUEST_NOTEBOOK_DIR

    def _writable_guest_dir(self) -> str | None:
        """Where the writable folder is in the guest (None: there is none)."""
        if not (self.writable_folder and self.notebook_files and self._cwd):
            return None
        return f"{GUEST_NOTEBOOK_DIR}/{check_folder(self.writable_folder)}"

    def sync_files(self) -> str:
        """Bring the writable folder back into the notebook's folder now; a line saying what came back."""
        if not self.writable_folder or not self._cwd or not self.workspace:
            raise InvalidArgument("this kernel has no writable folder (set the provisioner's writable_folder, "
                                  "e.g. 'results', in its kernelspec)")
        with self._sync_lock:
            dest = Path(self._cwd) / self.writable_folder
            report = sync_back(self.engine, self.workspace, self.writable_folder, dest, self.sync_max_mib << 20)
        line = report.line(dest)
        self.log.info("microagent kernel %s: %s", self.workspace, line)
        return line

    def serves(self, notebook_dir: str, notebook_name: str) -> bool:
        """Whether this kernel serves the notebook ``notebook_dir/notebook_name`` (its save hook syncs)."""
        if not self._cwd or os.path.realpath(self._cwd) != os.path.realpath(notebook_dir):
            return False
        return not self._notebook or os.path.basename(self._notebook) == notebook_name

    def sync_quietly(self) -> None:
        """Sync (on save, before a restart or shutdown): a failure is logged, never raised."""
        if self._board_id not in SYNCING or not self._vm_running():
            return
        try:
            self.sync_files()
        except (MicroagentError, OSError) as exc:
            self.log.warning("microagent kernel %s: its writable folder did not come back: %s", self.workspace, exc)

    def _vm_running(self) -> bool:
        try:
            return self.engine.status(str(self.workspace)).state.state == "running"
        except MicroagentError:
            return False

    def _wait_ready(self) -> None:
        """Wait until the guest kernel answers *through the relay* (shell and iopub), so the frontend's first
        request is not lost while the guest's ports come up."""
        assert self.kernel is not None
        self.kernel.wait_ready_raw(self._front)

    async def poll(self) -> int | None:
        if self.kernel is None:
            return 0
        return self.kernel.exit_code()

    async def wait(self) -> int | None:
        while self.kernel is not None and self.kernel.alive:
            await asyncio.sleep(0.1)
        return await self.poll()

    async def send_signal(self, signum: int) -> None:
        if self.kernel is None:
            return
        if signum == signal.SIGINT:
            await asyncio.to_thread(self.kernel.interrupt)
        else:
            await asyncio.to_thread(self.kernel.signal, signum)

    async def kill(self, restart: bool = False) -> None:
        if self.kernel is not None:
            await asyncio.to_thread(self.kernel.signal, signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        if self.kernel is not None:
            await asyncio.to_thread(self.kernel.signal, signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """On restart keep the VM (a new kernel starts in it); otherwise stop the relay and remove the VM."""
        await asyncio.to_thread(self.sync_quietly)
        if restart:
            if self.kernel is not None:
                await asyncio.to_thread(self.kernel.stop)
            return
        kernel_board.forget(self._board_id)
        SYNCING.pop(self._board_id, None)
        await asyncio.to_thread(self._remove)

    def _stop_relay(self) -> None:
        if self.sleeper is not None:
            self.sleeper.close()
            self.sleeper = None
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def _remove(self) -> None:
        self._stop_relay()
        if self.kernel is not None:
            try:
                self.kernel.stop(timeout=3)
            except MicroagentError:
                pass
        self.kernel = None
        name, self.workspace = self.workspace, None
        if name is None:
            return
        remove_workspace(self.engine, name)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["workspace"] = self.workspace
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.workspace = provisioner_info.get("workspace")

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 10.0)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, 60.0)


__all__ = ["PROVISIONER_NAME", "KernelDied", "MicroagentProvisioner"]


def server_origins() -> frozenset[str]:
    """The origins of the Jupyter server this provisioner runs in (links to them are never passed from a guest)."""
    from urllib.parse import urlsplit

    # a server that runs in this process has imported its app: importing it here would cost a client without one
    # (nbclient, a KernelManager) ~1 s at its first kernel (jsonschema's format grammars are compiled)
    serverapp = sys.modules.get("jupyter_server.serverapp")
    if serverapp is None:
        return frozenset()
    try:
        ServerApp = serverapp.ServerApp
        if not ServerApp.initialized():
            return frozenset()
        app = ServerApp.instance()
        urls = [app.connection_url, *(getattr(app, "display_urls", "") or "").split("\n")]
    except Exception:  # noqa: BLE001 (no server, or one without these attributes: loopback is refused anyway)
        return frozenset()
    out = set()
    for url in urls:
        parts = urlsplit(url.strip())
        if parts.scheme in ("http", "https") and parts.hostname:
            out.add(f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else ""))
    return frozenset(out)


def pool_request(workspace_spec: dict[str, Any]) -> tuple[str, WorkspaceSpec, dict[str, str]]:
    """What a kernel's workspace is asked to be (the provisioner's ``workspace_spec``): the warm pool's key, the
    spec, and the guest environment."""
    spec, env = split_env(session_spec(WorkspaceSpec.from_json(dict(workspace_spec), what="the kernel's workspace")))
    return kernel_pool.request_key(spec, env), spec, env


def prefill_pool(provisioner: MicroagentProvisioner) -> bool:
    """Start preparing the pooled kernels of ``provisioner``'s kernelspec now (at the server's start), so that the
    first notebook opened takes one too; only from a warm snapshot already built (this never builds one). Whether
    a fill began."""
    if not (provisioner.warm and provisioner.pool_size > 0):
        return False
    key, spec, env = pool_request(provisioner.workspace_spec)
    if find_warm(provisioner.engine, spec) is None:
        return False
    kernel_pool.refill(provisioner.engine, key, spec, env, provisioner.pool_size,
                       on_error=lambda why: provisioner.log.warning("microagent: %s", why))
    return True
