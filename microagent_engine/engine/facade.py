"""The engine's typed Python API: one object whose methods the CLI, the magics and the REST handlers call.

Each concern lives in its own collaborator (records in ``store``, ``provision``, ``lifecycle``, ``sessions``,
``transfer``, ``imaging``); this class is the public surface and composes them.
"""

from __future__ import annotations

import builtins
import os
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator

from ..client import DEFAULT_MAX_OUTPUT, ExecResult, OutputCallback, SupervisorConnection
from ..config import default_state_dir
from ..errors import InvalidArgument
from ..model import PUBLISH_DEFAULT_HOST_IP
from ..workspace_spec import WorkspaceSpec
from ..snapshots import workspace as snapshot_store
from ..storage.volumes import VolumeRegistry
from .context import EngineContext, Progress
from .egress import Egress
from .imaging import Imaging
from .lifecycle import Lifecycle
from .provision import Provisioner
from .sessions import Sessions
from . import oneshot
from .oneshot import RunOptions, split_run_kwargs
from .store import WorkspaceInfo
from .transfer import Transfer

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..images.store import ImageInfo, ImageStore


class Engine:
    """Entry point of the Python API. All state lives under ``state_dir`` (default ``~/.microagent``)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> None:
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        self._ctx = EngineContext(self.state_dir, progress)
        self._provision = Provisioner(self._ctx)
        self._lifecycle = Lifecycle(self._ctx)
        self._sessions = Sessions(self._ctx)
        self._transfer = Transfer(self._ctx)
        self._imaging = Imaging(self._ctx)
        self._egress = Egress(self._ctx)

    @property
    def progress(self) -> Progress:
        return self._ctx.progress

    @progress.setter
    def progress(self, callback: Progress) -> None:
        self._ctx.progress = callback

    @property
    def volumes(self) -> VolumeRegistry:
        """Named volumes: ``create``, ``list``, ``get``, ``delete``."""
        return self._ctx.volumes

    @property
    def images(self) -> "ImageStore":
        """The OCI image cache."""
        return self._ctx.images

    @property
    def backend(self) -> "Backend":
        """The hypervisor backend (QEMU)."""
        return self._ctx.backend

    @property
    def workspaces_dir(self) -> Path:
        return self._ctx.store.workspaces_dir

    # ---- queries -------------------------------------------------------------------------------
    def status(self, name: str) -> WorkspaceInfo:
        """A workspace's config, state, readiness and allowed actions."""
        return self._ctx.store.status(name)

    def list(self) -> builtins.list[WorkspaceInfo]:
        """Every workspace, by name."""
        return self._ctx.store.list()

    def ps(self) -> builtins.list[WorkspaceInfo]:
        """The workspaces whose VM (or supervisor) is alive."""
        return [info for info in self.list() if info.running or info.vm_alive]

    # ---- create / delete -----------------------------------------------------------------------
    def create(self, name: str | None = None, spec: WorkspaceSpec | None = None, *, disposable: bool = False,
               **fields: Any) -> WorkspaceInfo:
        """Record a new workspace from ``spec`` and build its rootfs (state ``prepared``). Nothing is left on
        failure. ``fields`` (``image=...``, ``memory_mib=...``: :class:`WorkspaceSpec`'s) build the spec when none
        is given; everything is validated before anything is written.

        ``spec.from_snapshot``: a clone of that workspace snapshot (its own copy of the disk) whose first start
        resumes it with its processes running; only ``hostname`` and ``env`` may be given with it. With
        ``disposable=True`` (a clone its creator deletes when done with it) its root disk is a copy-on-write
        overlay over the snapshot's instead of a copy: no disk is copied, and cp, outputs, commit and snapshot,
        which read a stopped workspace's ext4 image, refuse it. ``spec.cold``:
        every start of this workspace boots cold, never from a template. ``spec.packages`` (Debian package names)
        are added to the built-in ``builtin:python`` image (built on first need, once per package set)."""
        return self._provision.create(name, _spec(spec, fields), overlay_root=disposable)

    def delete(self, name: str) -> None:
        """Remove the workspace record and its disks. Refuses while its VM runs."""
        self._provision.delete(name)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, name: str, *, boot_timeout: float | None = None, cold: bool = False,
              ram_file: bool = False) -> WorkspaceInfo:
        """Boot the workspace's VM and return once its agent is ready (state ``running``): a clone of the machine
        shape's template when there is one (``bootMode`` warm), else a cold boot (``coldReason`` says why);
        ``cold=True`` forces a cold boot. ``ram_file=True`` boots cold with the guest's RAM in a file, which a
        :meth:`snapshot` then keeps as the snapshot's memory (its clones map it copy-on-write instead of reading a
        RAM stream) and the VM ends with that snapshot."""
        return self._lifecycle.start(name, boot_timeout=boot_timeout, cold=cold, ram_file=ram_file)

    def pause(self, name: str) -> WorkspaceInfo:
        """Freeze a running workspace's VM (state ``paused``): its processes keep their state; exec is refused."""
        return self._lifecycle.pause(name)

    def resume(self, name: str) -> WorkspaceInfo:
        """Continue a paused workspace, or wake a sleeping one (state ``running``)."""
        return self._lifecycle.pause(name, resume=True)

    def sleep(self, name: str) -> WorkspaceInfo:
        """Scale to zero: save a running (or paused) workspace's memory to a file and end its VM (state
        ``sleeping``); only its supervisor stays, holding every exec stream, published port and connection. The
        next :meth:`exec`, connection or byte on a published port, or :meth:`resume`, wakes it: its memory is
        restored into a new VM and everything carries on where it stopped (a running command just pauses)."""
        return self._lifecycle.sleep(name)

    def snapshot(self, name: str, snapshot: str, *, internal: bool = False) -> dict[str, Any]:
        """Save the running (or paused) workspace as ``snapshot``: memory, device state and a copy of its root disk,
        the VM stopped for a moment (``stoppedSeconds``); it runs on. ``create(NEW, from_snapshot=snapshot)`` makes
        a workspace that resumes it. Returns the snapshot's meta (name, workspace, sizes, times). An ``internal``
        snapshot (a frontend's own, such as the warm Python one) is left out of :meth:`snapshots`."""
        return self._lifecycle.snapshot(name, snapshot, internal)

    def snapshots(self, *, internal: bool = False) -> builtins.list[dict[str, Any]]:
        """Every workspace snapshot's meta, by name (internal ones too with ``internal``)."""
        return snapshot_store.list_all(self.state_dir, internal)

    def remove_snapshot(self, snapshot: str) -> None:
        """Delete a snapshot (workspaces created from it keep their own disks)."""
        snapshot_store.remove(self.state_dir, snapshot)

    def halt(self, name: str, timeout: float | None = None) -> WorkspaceInfo:
        """Clean, disk-preserving shutdown through the guest agent (``timeout`` seconds, default 30)."""
        return self._lifecycle.halt(name, timeout)

    def stop(self, name: str) -> WorkspaceInfo:
        """Ask the guest to power off; after 5 s without exit the workspace is marked failed (no kill)."""
        return self._lifecycle.stop(name)

    def kill(self, name: str) -> WorkspaceInfo:
        """Terminate the VM at once."""
        return self._lifecycle.kill(name)

    def quarantine(self, name: str) -> WorkspaceInfo:
        """Sever networking and mediation of a running workspace; keeps disk and logs. Start is refused until
        halt, stop or kill."""
        return self._lifecycle.quarantine(name)

    # ---- published ports -----------------------------------------------------------------------
    def publish(self, name: str, guest_port: int, host_port: int = 0,
                host_ip: str = PUBLISH_DEFAULT_HOST_IP) -> tuple[str, int]:
        """Forward a host TCP port into the running workspace: connections to ``host_ip:host_port`` reach
        ``127.0.0.1:guest_port`` inside the guest, carried by the guest agent over virtio-serial (so this works
        with ``network="isolated"`` too). ``host_port=0`` binds a free port; the bound ``(host_ip, host_port)``
        is returned. ``host_ip`` defaults to 127.0.0.1 (this host only); a non-loopback address exposes the
        guest port to the network and must be asked for. The forwarding lasts until :meth:`unpublish` or until
        the workspace stops (it survives VM restarts of the same start); ``-p`` flags at create are re-bound at
        every start instead. Each connection is relayed with half-close and per-connection flow control; a
        guest port nobody listens on gives a connection that is closed at once.

        Raises InvalidState when the workspace is not running, PortUnavailable when the host port is taken
        (the message names it)."""
        return self._lifecycle.publish(name, guest_port, host_port, host_ip)

    def publish_socket(self, name: str, guest_port: int) -> str:
        """Like :meth:`publish`, on a unix socket instead of a TCP port: ``<run dir>/ports/p-GUEST_PORT`` in the
        workspace's private (0700) run directory, mode 0600, so only this user can connect (a TCP port on
        127.0.0.1 is open to every local user). ZMQ reaches it as ``ipc://PATH``. Returns the path."""
        return self._lifecycle.publish_socket(name, guest_port)

    def unpublish_socket(self, name: str, path: str) -> None:
        """Stop forwarding the unix socket ``path`` made by :meth:`publish_socket`."""
        self._lifecycle.unpublish_socket(name, path)

    def unpublish(self, name: str, host_port: int, host_ip: str = PUBLISH_DEFAULT_HOST_IP) -> None:
        """Stop forwarding ``host_ip:host_port`` (published by :meth:`publish` or ``-p``); its listener closes
        and its open connections are closed. GuestError if nothing is published there."""
        self._lifecycle.unpublish(name, host_port, host_ip)

    def published(self, name: str) -> builtins.list[dict[str, Any]]:
        """The workspace's published ports as status shows them: ``{hostIp, hostPort, guestPort, listening,
        error, dynamic, connections}`` each (empty when not running)."""
        return self.status(name).to_json()["publish"]

    # ---- commands and console ------------------------------------------------------------------
    def connection(self, name: str) -> SupervisorConnection:
        """A fresh connection to the running workspace's supervisor."""
        return self._sessions.connection(name)

    def exec(
        self,
        name: str,
        argv: builtins.list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | IO[bytes] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture: bool = True,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` in the running workspace (a sleeping one wakes for it); output streams to the callbacks as
        the guest produces it. Captured stdout/stderr keep ``max_output`` bytes each (then ``truncated`` and a
        marker)."""
        return self._sessions.exec(name, argv, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                                   on_stdout=on_stdout, on_stderr=on_stderr, capture=capture,
                                   max_output=max_output)

    def ping(self, name: str) -> float:
        """Round trip to the guest agent, in seconds."""
        return self._sessions.ping(name)

    def logs(self, name: str, *, follow: bool = False, poll: float = 0.1,
             stop: threading.Event | None = None) -> Iterator[bytes]:
        """The serial console log; with ``follow`` keep yielding new bytes while the workspace runs (or until
        ``stop`` is set, checked every ``poll`` seconds even while the console is silent)."""
        return self._sessions.logs(name, follow=follow, poll=poll, stop=stop)

    def console(self, name: str) -> SupervisorConnection:
        """A connection switched to the serial console: STDOUT frames out, STDIN frames in (stream 0)."""
        return self._sessions.console(name)

    def console_send(self, name: str, line: str, timeout: float = 30.0) -> str:
        """Type ``line`` into the serial console shell and return what it printed."""
        return self._sessions.console_send(name, line, timeout)

    # ---- egress ----------------------------------------------------------------------------------
    def egress(self, name: str) -> dict[str, Any]:
        """What the workspace's DNS and egress proxy refused (counters, recent refusals) and its policy."""
        return self._egress.report(name)

    def allow(self, name: str, entries: builtins.list[str]) -> WorkspaceInfo:
        """Widen the workspace's allow-list (``--allow`` entries: names, ``*.suffix``, presets, CIDRs), at once
        when it runs."""
        return self._egress.allow(name, entries)

    # ---- one-shot ------------------------------------------------------------------------------
    def run(self, argv: builtins.list[str], spec: WorkspaceSpec | None = None, options: RunOptions | None = None,
            **kwargs: Any) -> tuple[WorkspaceInfo, ExecResult]:
        """create + start + exec, then halt (and delete with ``options.delete``). Never leaves a VM running, and
        leaves no record when the workspace could not start (the error then quotes the end of its boot log).

        Without ``options.name`` the workspace is named ``run-<ns>`` and marked one-shot (``oneShot``), so
        :meth:`prune` removes it once stopped. ``kwargs``: :class:`RunOptions` and :class:`WorkspaceSpec` fields,
        when ``options``/``spec`` are not given."""
        option_kwargs, spec_kwargs = split_run_kwargs(kwargs)
        if option_kwargs and options is not None:
            raise InvalidArgument(f"give run options either as RunOptions or as keywords, not both "
                                  f"({', '.join(option_kwargs)})")
        return oneshot.run(self, argv, _spec(spec, spec_kwargs), options or RunOptions(**option_kwargs))

    def prune(self) -> builtins.list[str]:
        """Delete the stopped one-shot workspaces (those ``run`` made under a generated name); their names. Also
        sweeps what a killed snapshot left behind (listing never deletes anything)."""
        snapshot_store.sweep_unfinished(self.state_dir)
        return self._provision.prune()

    # ---- data ----------------------------------------------------------------------------------
    def cp(self, src: str, dst: str, max_size: int | str | None = None) -> Path | str:
        """Copy one regular file between the host and a workspace that is not running.

        Workspace side: ``WS:/path`` (its rootfs) or ``WS:DISK:/path`` (an attached volume or disk). A copy out
        keeps holes and is refused above ``max_size`` (bytes or ``20G``; default ``config.DEFAULT_MAX_COPY``)."""
        return self._transfer.cp(src, dst, max_size)

    def outputs(self, name: str) -> builtins.list[dict[str, Any]]:
        """The declared outputs of a workspace, and whether each exists now (read without booting)."""
        return self._transfer.outputs(name)

    def output_get(self, name: str, output: str, dest: str | os.PathLike[str] | None = None,
                   max_size: int | str | None = None) -> bytes | Path:
        """An output's bytes (``dest`` None, up to ``config.MAX_INLINE_OUTPUT``) or a copy at ``dest`` (holes kept,
        refused above ``max_size``: bytes or ``20G``, default ``config.DEFAULT_MAX_COPY``); the workspace must not
        be running."""
        return self._transfer.output_get(name, output, dest, max_size)

    # ---- images --------------------------------------------------------------------------------
    def pull(self, ref: str) -> "ImageInfo":
        """Fetch ``ref`` (re-resolving its tag) and build its rootfs image."""
        return self._imaging.pull(ref)

    def commit(self, name: str, ref: str, max_size: int | str | None = None) -> "ImageInfo":
        """Write a stopped workspace's rootfs as an OCI image (under ``<state-dir>/committed/``) that
        ``create --image REF`` boots. The filesystem is checked first (``e2fsck -fn``). Refused when its files add
        up to more than ``max_size`` (bytes or ``20G``; default ``config.DEFAULT_MAX_COPY``)."""
        return self._imaging.commit(name, ref, max_size)

    def list_images(self) -> builtins.list["ImageInfo"]:
        """The cached images: pulled and committed OCI images, and the built-in Debian ones (``builtin:python``)."""
        return self._imaging.list()

    def prune_images(self) -> builtins.list["ImageInfo"]:
        """Remove cached images (and their blobs) that no workspace was created from."""
        return self._imaging.prune()


def _spec(spec: WorkspaceSpec | None, fields: dict[str, Any]) -> WorkspaceSpec:
    """``spec``, or one built from ``fields`` (not both)."""
    if spec is not None and fields:
        raise InvalidArgument(f"give the workspace either as a WorkspaceSpec or as keywords, not both "
                              f"({', '.join(fields)})")
    if spec is not None and not isinstance(spec, WorkspaceSpec):
        raise InvalidArgument(f"spec must be a microagent_engine.WorkspaceSpec, got {type(spec).__name__}")
    try:
        return spec if spec is not None else WorkspaceSpec(**fields)
    except TypeError as exc:  # an unknown keyword: name the known ones
        raise InvalidArgument(f"{exc}; the fields of a workspace are those of WorkspaceSpec") from None
