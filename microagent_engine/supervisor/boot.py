"""The supervisor's part that boots the VM: cold, from a template or a workspace snapshot, its network and confinement,
the boot deadline and the restart policy's decision, then the guest's READY."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

from ..backends.qemu import QemuBackend
from ..errors import HostError, MicroagentError
from ..fsutil import open_private
from ..protocol import ExitStatus, FrameDecoder, FrameType, HaltMode, InfoKey, ReadyValue, encode_config
from ..records import now_iso, process_start_time
from ..sandbox import ConfinedVM, spawn_vm
from ..sandbox.network import NetworkSandbox
from ..snapshots.live import restore_argv
from ..snapshots.overlay import OVERLAY_KEY
from ..snapshots.templates import memory_of, new_ram_file
from ..snapshots.warm import BootPlan
from ..textsafe import safe_text
from ..timeline import mark
from .record import tail_text
from .timing import KVM_FAILURE_MARKERS

class Booting:
    """Booting the VM (a part of :class:`~.core.Supervisor`)."""

    async def boot_once(self) -> float:
        """Launch the VM and wait for it to exit; returns how long it ran."""
        self.ready = asyncio.Event()
        self.vm_exited = asyncio.Event()
        self.agent_writer = None
        if not self.asleep:  # a woken agent goes on with the channel where the saved one stopped
            self.agent_decoder = FrameDecoder()
        self.hello_seen = self.ready_seen = self.channel_failed = False
        self.state.dropped_frames = 0
        if self.mediation:
            self.mediation.reset()
        for name in self.state.readiness:
            self.set_signal(name, False, "booting")
        self.boot_t0 = time.monotonic()
        self.serial_note(f"boot at {now_iso()} (accel {self.launch.accel})")
        vm_log = open_private(self.ws.vm_log, "ab")
        vm_log.write(f"--- {now_iso()} {' '.join(self.launch.argv)}\n".encode())
        vm_log.flush()
        try:
            self.net = await NetworkSandbox.open(self.network_policy, self.ws.run_dir, self.launch.secrets,
                                                 self.launch.secret_values, self.ws.path)
            self.proc = await self.start_vm(vm_log)
        except (OSError, MicroagentError) as exc:
            await self.close_network()
            prefix = "" if isinstance(exc, MicroagentError) else "could not start the hypervisor: "
            self.save(state="failed", error=f"{prefix}{exc}")
            self.notify_ready(False, self.state.error)
            return 0.0
        for note in self.net.notes if self.net else []:
            self.serial_note(note)
        self.save(state="starting", vm_pid=self.proc.pid, vm_start_time=process_start_time(self.proc.pid),
                  started_at=now_iso(), stopped_at=None, boot_seconds=None, confinement=self.proc.confinement)
        watchers = [asyncio.create_task(self.watch_stderr(vm_log)), asyncio.create_task(self.boot_deadline())]
        rc = await self.proc.wait()
        mark("supervisor: VM exited")
        await asyncio.sleep(0)  # let the stderr watcher record a last line
        if self.liveness_task:
            watchers.append(self.liveness_task)
            self.liveness_task = None
        for task in watchers:
            task.cancel()
        vm_log.close()
        await self.close_network()
        self.vm_exited.set()
        self.state.exit_detail = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
        if self.intent != "sleep":  # asleep, the commands and streams wait for the wake
            self.hub.fail_all(f"the VM exited ({self.state.exit_detail}) before the command finished")
            self.tasks.fail_all("the VM exited")
        return time.monotonic() - self.boot_t0

    async def start_vm(self, vm_log: Any) -> ConfinedVM:
        """Spawn this boot's VM: a clone of the machine shape's template (snapshots.warm), or a cold boot when
        there is none to be had (the reason saved as ``cold_reason`` and noted in the serial log)."""
        self.restored = False
        if self.pending_restore is not None:
            restore, self.pending_restore = self.pending_restore, None
            return await self.start_restored(restore, vm_log)
        if self.ram_file is not None:
            return await self.start_ram_file(vm_log)
        plan = await self.warm.plan()
        if plan.mode == "cold":
            vm = await self.start_cold(plan.argv, vm_log)
        else:
            vm = await self.spawn(plan.argv, vm_log)
            mark("supervisor: VM spawned (warm)")
            error = await self.restore_paused(vm)
            mark("supervisor: VM restored")
            if error:
                vm.kill()
                await vm.wait()
                key = plan.template.key if plan.template else "?"
                plan = BootPlan("cold", self.launch.argv, f"restoring template {key} failed: {error}")
                vm = await self.start_cold(plan.argv, vm_log)
            else:
                await self.configure_clone()
        key = plan.template.key if plan.template else "?"
        built = ", built by this start" if plan.built else ""
        how = f"warm (clone of template {key}{built})" if plan.mode == "warm" else f"cold: {plan.reason}"
        self.serial_note(f"boot mode {how}")
        self.state.boot_mode, self.state.cold_reason = plan.mode, plan.reason
        return vm

    async def start_restored(self, restore: dict[str, Any], vm_log: Any) -> ConfinedVM:
        """Spawn a clone of a workspace snapshot and resume it (no cold fallback: its processes would be lost)."""
        name = restore.get("snapshot", "?")
        vm = await self.spawn(restore_argv(self.launch.argv, restore), vm_log)
        error = await self.restore_paused(vm, ignore_shared=restore.get("memory") == "file")
        if error:
            vm.kill()
            await vm.wait()
            raise HostError(f"restoring snapshot {name!r} failed: {error}; 'microagent start --cold' boots its disk "
                            f"without its processes")
        self.restored = True
        await self.configure_clone(f"agent resumed from snapshot {name}")
        self.serial_note(f"boot mode snapshot (resumed {name})")
        self.state.boot_mode, self.state.cold_reason = "snapshot", ""
        return vm

    async def start_ram_file(self, vm_log: Any) -> ConfinedVM:
        """Boot cold with the guest's RAM in the shared file ``ram_file`` (a snapshot of this VM keeps the file as
        its memory: snapshots/live.py)."""
        path, mib = Path(self.ram_file or ""), memory_of(self.launch.argv)
        new_ram_file(path, mib)
        vm = await self.start_cold(QemuBackend.memory_file_argv(self.launch.argv, mib, path, share=True), vm_log)
        reason = "its RAM is a file a snapshot keeps (Engine.start(ram_file=True))"
        self.serial_note(f"boot mode cold: {reason}")
        self.state.boot_mode, self.state.cold_reason = "cold", reason
        return vm

    async def start_cold(self, argv: list[str], vm_log: Any) -> ConfinedVM:
        """A cold boot whose vCPUs are held (``-S``) while the network's rules and uplink are set up beside QEMU's own
        start-up (its process, libraries, devices, kernel and initramfs loaded: ~20 ms either), and resumed after both;
        the guest runs no instruction before the network is enforced. A failed enforcement kills the VM unstarted
        (and raises); a QEMU that never answers its monitor (it failed to start: its stderr says why) is returned
        ended, as a cold boot's QEMU that exits at once always was."""
        vm = await self.spawn(QemuBackend.held_argv(argv), vm_log)
        mark("supervisor: VM spawned (cold)")
        try:
            error = await self.warm.resume(before_resume=self.enforce_network)
        except BaseException:
            vm.kill()
            await vm.wait()
            raise
        if error:
            vm.kill()  # a no-op for a QEMU that already exited
        else:
            mark("supervisor: VM resumed")
        return vm

    def enforce_network(self) -> None:
        """The network's rules and uplink (NetworkSandbox.enforce): before any guest instruction runs."""
        if self.net is not None and not self.net.enforced:
            self.net.enforce()
            mark("supervisor: network up")

    async def restore_paused(self, vm: ConfinedVM, ignore_shared: bool = True) -> str:
        """Restore a just-spawned (paused) VM and resume it, enforcing the network while QEMU loads the state:
        the guest runs only after both (snapshots.warm.WarmBoot.restore). A failed enforcement kills the VM."""
        try:
            return await self.warm.restore(vm, ignore_shared=ignore_shared, before_resume=self.enforce_network)
        except BaseException:
            vm.kill()
            await vm.wait()
            raise

    def disk_argv(self, argv: list[str]) -> list[str]:
        """``argv`` (the logical one, whose root drive is the raw image) with the root disk this workspace really
        has: a disposable clone's overlay over a snapshot's image (snapshots/overlay.py). Every VM of it, the
        template it builds included, is spawned with this."""
        overlay = self.launch.extra.get(OVERLAY_KEY)
        if not overlay:
            return argv
        return QemuBackend.overlay_argv(argv, overlay["root"], overlay["overlay"], overlay["base"])

    async def spawn(self, argv: list[str], vm_log: Any) -> ConfinedVM:
        launch = dataclasses.replace(self.launch, argv=self.disk_argv(argv))
        return await spawn_vm(self.ws, launch, self.state.backend, {
            "agent": self.on_agent, "ser0": self.on_serial,
            "mediation": self.mediation.on_port if self.mediation else None}, stdout=vm_log,
            join_namespaces=self.net.join_namespaces() if self.net else None)

    async def configure_clone(self, detail: str = "agent restored from a template") -> None:
        """A restored clone's agent said HELLO in the template (or snapshot): send its CONFIG (own hostname, env,
        disks, clock and RNG seed) now that it runs."""
        for _ in range(500):
            if self.agent_writer is not None:
                break
            await asyncio.sleep(0.002)
        self.hello_seen = True
        self.set_signal("guestReady", True, detail)
        self.write_agent(FrameType.CONFIG, 0, self.config_payload())  # first, even before frames held in a sleep

    async def close_network(self) -> None:
        if self.net is not None:
            await self.net.close()
            self.net = None

    def wants_restart(self, entrypoint_status: ExitStatus | None) -> bool:
        """The restart policy's verdict on a crash (None) or an entrypoint exit."""
        if self.restart_policy == "always":
            return True
        if self.restart_policy == "on-failure":
            return entrypoint_status is None or entrypoint_status.exit_code != 0
        return False

    async def watch_stderr(self, vm_log: Any) -> None:
        assert self.proc and self.proc.stderr
        while line := await self.proc.stderr.readline():
            vm_log.write(line)
            vm_log.flush()
            text = line.decode(errors="replace")
            if any(marker in text for marker in KVM_FAILURE_MARKERS) and self.proc.returncode is None:
                self.save(state="failed", error=f"the hypervisor reported: {text.strip()}; "
                                                f"try --accel tcg (see microagent doctor)")
                self.proc.kill()

    async def boot_deadline(self) -> None:
        timeout = self.launch.boot_timeout
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            if self.proc and self.proc.returncode is None and not self.setting_up:
                self.save(state="failed", error=f"the guest agent did not become ready within {timeout:.0f} s. "
                          f"Last console lines:\n{tail_text(self.ws.serial_log)}")
                self.proc.kill()

    async def on_ready(self, info: dict[str, str]) -> None:
        mark("supervisor: READY")
        shell = self.launch.shell
        if InfoKey.KERNEL in info:  # READY repeats it: a template clone's HELLO went to the template's host
            kernel = safe_text(info[InfoKey.KERNEL], 120)
            self.state.kernel_release = kernel
            version = safe_text(info.get(InfoKey.VERSION, "?"), 40)
            self.set_signal("guestReady", True, f"agent v{version} on kernel {kernel}")
        if info.get(InfoKey.SHELL) == ReadyValue.OK:
            self.set_signal("shellReady", True, f"{shell} on the serial console")
        else:
            self.set_signal("shellReady", False, error=f"shell {shell} not found in the guest")
        if self.mediation:
            med = safe_text(info.get(InfoKey.MEDIATION, ReadyValue.NONE), 200)
            ok = med == ReadyValue.OK
            self.mediation.guest_ready(ok, "" if ok else f"guest side: {med}")
        else:
            self.set_signal("mediationReady", False, "no mediation channel configured")
        errors = [safe_text(f"{k}: {v}", 300) for k, v in info.items()
                  if v.startswith(ReadyValue.ERROR) and k != InfoKey.MEDIATION]
        if info.get(InfoKey.MOUNTS, "").startswith(ReadyValue.ERROR):
            self.save(state="failed",
                      error="attaching disks failed in the guest: " + safe_text(info[InfoKey.MOUNTS], 500))
            self.intent = "setup-failed"
            self.to_agent(FrameType.HALT, 0, HaltMode.HALT.encode())
            return
        if self.launch.setup and not self.state.setup_done:
            self.setting_up = True
            if not await self.tasks.run_setup(self.launch.setup):
                return
            self.setting_up = False
        if self.channel_failed or self.vm_exited.is_set():
            return
        boot = round(time.monotonic() - self.boot_t0, 3)
        self.set_signal("execReady", True, f"agent ready after {boot} s")
        self.ever_ready = True
        self.save(state="running", boot_seconds=boot, error="; ".join(errors[:8]))
        self.agent_ready_after_wake()
        self.ready.set()
        self.notify_ready(True)
        self.liveness_task = asyncio.ensure_future(self.liveness_loop())
        if self.launch.entrypoint and not self.restored:  # a resumed snapshot's entrypoint is still running
            asyncio.ensure_future(self.tasks.run_entrypoint(self.launch.entrypoint))

    def config_payload(self) -> bytes:
        return encode_config(self.launch.hostname, self.launch.network, self.launch.shell, self.launch.env,
                             self.launch.mounts, self.mediation.cfg.port if self.mediation else None,
                             clock=time.time(), seed=secrets.token_bytes(32))
