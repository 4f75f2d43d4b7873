"""Creating and deleting workspaces: validate everything, build the rootfs in a staging directory, commit by
rename (so nothing half-made is ever visible), and remove a workspace's record and disks."""

from __future__ import annotations

import builtins
import os
import secrets
import shutil
from typing import Callable
from pathlib import Path

from ..config import get_profile, hostname_for, validate_name
from ..errors import AlreadyExists, InvalidArgument, MicroagentError, NotFound
from ..fsutil import file_lock, private_dir
from ..hostinfo import choose_accel
from ..images import builtin_cache
from ..images.builtin import builtin_base, canonical, is_builtin
from ..records import WorkspaceConfig, WorkspaceDir, WorkspaceState
from ..network_policy import NetworkPolicy
from ..snapshots import workspace as snapshots
from ..storage import debugfs
from ..storage.ext4 import clone_sized
from ..host_ports import check_publish_free
from ..states import require, transition
from ..secret import new_placeholder
from ..workspace_spec import WorkspaceSpec
from .context import EngineContext
from .store import WorkspaceInfo


class Provisioner:
    """``create`` and ``delete``."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def create(self, name: str | None, spec: WorkspaceSpec, *, one_shot: bool = False,
               overlay_root: bool = False) -> WorkspaceInfo:
        """Execute ``spec`` (see ``Engine.create``); ``one_shot``: made by ``run`` under a generated name;
        ``overlay_root``: a disposable clone of a snapshot (deleted by its creator) gets a copy-on-write root disk."""
        ctx = self.ctx
        name = validate_name(f"ws-{secrets.token_hex(4)}" if name is None else name)
        spec.check()
        if overlay_root and spec.from_snapshot is None:
            raise InvalidArgument("a disposable workspace is a clone of a snapshot: give from_snapshot with it")
        if spec.from_snapshot is not None:
            return self._create_from_snapshot(name, spec, one_shot, overlay_root)
        prof = get_profile(spec.profile)
        policy = spec.network or NetworkPolicy()
        if spec.accel:
            choose_accel(spec.accel)  # KVM's availability, up front
        atts, outs, ports = list(spec.attachments or ()), list(spec.outputs or ()), list(spec.publish or ())
        check_publish_free(ports)  # a taken host port fails now, before anything is written
        for att in atts:
            att.check_host_file()
        file_list = list(spec.files or ())
        for f in file_list:
            if not Path(f.src).is_file():
                raise NotFound(f"file {f.src} does not exist (or is not a regular file); fix files[].src")
        image, shell = spec.image, spec.shell
        ws = ctx.store.dir(name)
        if ws.path.exists():
            raise AlreadyExists(f"workspace {name!r} already exists; pick another name or delete it first "
                                f"('microagent delete {name} --yes')")
        cfg = WorkspaceConfig(
            name=name, image=canonical(image) if is_builtin(image) else str(image), profile=prof.name,
            memory_mib=spec.memory_mib or prof.memory_mib, cpus=spec.cpus or prof.cpus,
            size_mib=spec.size_mib or prof.disk_mib, env=dict(spec.env or {}),
            hostname=spec.hostname or hostname_for(name), network=policy.backend_mode, accel=spec.accel or "auto",
            kernel=str(Path(spec.kernel).resolve()) if spec.kernel else None, restart=spec.restart or "never",
            shell=shell or "/bin/sh", setup=list(spec.setup or ()), entrypoint=spec.entrypoint or None,
            mediation=spec.mediation, network_policy=policy, attachments=atts, outputs=outs,
            one_shot=one_shot, publish=ports, cold=bool(spec.cold), spec=spec.to_json(),
            secrets=[s.to_json() for s in spec.secrets or ()],
            placeholders={s.name: new_placeholder(s.name) for s in spec.secrets or ()})
        for name_, placeholder in cfg.placeholders.items():
            if name_ in cfg.env:
                raise InvalidArgument(f"{name_} is both a secret and an environment variable; give it once")
            cfg.env[name_] = placeholder  # the guest holds the placeholder, never the value
        for att in atts:
            if att.kind == "volume":
                try:
                    ctx.volumes.get(att.source)
                except NotFound:
                    raise NotFound(f"no volume named {att.source!r}; create it first: microagent volume create "
                                   f"{att.source}") from None
        ctx.resolve_kernel(cfg.kernel)  # installs the default kernel on first need, as the seeds' create does
        if is_builtin(image):
            built = builtin_base(image, ctx.state_dir, spec.packages or (), ctx.progress)
            base, cfg.image_id = built.path, builtin_cache.image_id(built.path)
            cfg.env = {**built.env, **cfg.env}
            cfg.size_mib = max(cfg.size_mib, built.size_mib)
        else:
            img = ctx.images.ensure(str(image))
            base = img.path
            cfg.image_id = img.id
            cfg.env = {**img.env, **cfg.env}  # the image's Env, overridden by the user's
            cfg.workdir = img.config.get("WorkingDir") or "/"
            cfg.size_mib = max(cfg.size_mib, img.size_mib)

        def fill(staging: WorkspaceDir) -> None:
            ctx.progress(f"Building rootfs ({cfg.size_mib} MiB) from {cfg.image}")
            clone_sized(base, staging.rootfs, cfg.size_mib)
            for f in file_list:
                debugfs.copy_in(staging.rootfs, Path(f.src), f.dst, mode=f.mode)
            if cfg.secrets:  # the guest trusts the workspace's egress CA (its key stays in the staging dir)
                from ..sandbox.egress_tls import make_ca, trust_ca  # (ssl and asyncio: only for secrets)

                trust_ca(staging.rootfs, make_ca(staging.path, cfg.name))
            if shell and not debugfs.exists(staging.rootfs, shell):
                raise InvalidArgument(f"shell {shell} does not exist in image {cfg.image}; pick a shell the "
                                      f"image has (e.g. /bin/sh or /bin/bash)")
            staging.save_config(cfg)
            staging.save_state(WorkspaceState(state=transition(None, "prepared")))

        return self._staged(name, fill)

    def _staged(self, name: str, fill: Callable[[WorkspaceDir], None]) -> WorkspaceInfo:
        """Build a workspace in a private staging directory (``fill``), then commit it by one rename: a failed or
        killed create leaves nothing visible (the next create sweeps its staging directory)."""
        ctx = self.ctx
        ws = ctx.store.dir(name)
        private_dir(ctx.state_dir)
        private_dir(ctx.store.workspaces_dir)
        ctx.store.sweep_leftovers()
        staging = WorkspaceDir(ctx.store.workspaces_dir / f".creating-{name}-{secrets.token_hex(4)}")
        staging.path.mkdir(mode=0o700)
        try:
            with file_lock(staging.ops_lock):  # held while this create lives: the sweep leaves it alone
                fill(staging)
                try:
                    os.rename(staging.path, ws.path)
                except OSError:
                    raise AlreadyExists(f"workspace {name!r} already exists; pick another name") from None
        finally:
            if staging.path.exists():
                shutil.rmtree(staging.path, ignore_errors=True)
        return ctx.store.info(ws)

    def _create_from_snapshot(self, name: str, spec: WorkspaceSpec, one_shot: bool = False,
                              overlay_root: bool = False) -> WorkspaceInfo:
        """A new workspace whose first start resumes ``spec.from_snapshot`` (its own copy of the disk, or an
        overlay over it)."""
        ctx = self.ctx
        snapshot = str(spec.from_snapshot)
        cfg, meta = snapshots.clone_config(ctx.state_dir, snapshot, name, spec.hostname, dict(spec.env or {}))
        cfg.spec, cfg.one_shot = spec.to_json(), one_shot
        ws = ctx.store.dir(name)
        if ws.path.exists():
            raise AlreadyExists(f"workspace {name!r} already exists; pick another name or delete it first "
                                f"('microagent delete {name} --yes')")

        def fill(staging: WorkspaceDir) -> None:
            if not overlay_root:
                ctx.progress(f"Copying snapshot {snapshot}'s disk")
            snapshots.fill_clone(ctx.state_dir, snapshot, staging, overlay_root)
            staging.save_config(cfg)
            staging.save_state(WorkspaceState(state=transition(None, "prepared"),
                                              setup_done=bool(meta.get("setupDone"))))

        return self._staged(name, fill)

    def prune(self) -> builtins.list[str]:
        """Delete the one-shot records whose VM is not running; the names removed."""
        gone = []
        for info in self.ctx.store.list():
            if info.config.one_shot and not self.ctx.store.vm_alive(info):
                try:
                    self.delete(info.name)
                except MicroagentError:  # deleted, started or busy meanwhile (another process): leave it
                    continue
                gone.append(info.name)
        return gone

    def delete(self, name: str) -> None:
        ctx = self.ctx
        ws = ctx.store.existing(name)
        with file_lock(ws.ops_lock, blocking=False, what=f"workspace {name!r}"):
            info = ctx.store.info(ws)
            require("delete", info.state.state, name, ctx.store.vm_alive(info))
            trash = ctx.store.workspaces_dir / f".deleting-{name}-{secrets.token_hex(4)}"
            run_dir = ws.run_dir
            os.rename(ws.path, trash)
            ctx.volumes.release(name)  # the data stays for the next attach
        shutil.rmtree(trash, ignore_errors=True)
        if run_dir.exists() and not str(run_dir).startswith(str(trash)):
            shutil.rmtree(run_dir, ignore_errors=True)
