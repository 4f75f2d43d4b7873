"""The supervisor's warm boot: restore a clone of the shape's template, building the template first when there is
none (the first boot of a shape: a cold boot to the agent's HELLO, saved, then cloned), or say why it boots cold.

Recipe (DESIGN.md, "Facts for Python sessions and warm start"): the template's RAM is a ``memory-backend-file``
with ``share=on`` on tmpfs; at HELLO it is stopped and its device state migrated (``x-ignore-shared``: RAM stays in
the file) to a file through a descriptor passed with ``getfd``. A clone maps the same file ``share=off``
(copy-on-write), starts with ``-incoming defer``, sets the capability and restores from its inherited descriptor
(``migrate-incoming fd:N``). QEMU's seccomp forbids ``exec:`` migration URIs, so descriptors it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..backends.qemu import RO_OPEN_NAME, QemuBackend
from ..fsutil import file_lock
from ..errors import Busy, MicroagentError
from ..protocol import FrameDecoder, FrameType
from ..sandbox import spawn_vm
from ..backends.qmp import QmpError, QmpSession, ignore_shared_caps
from .shim import ro_open_library
from .templates import COLD_KEY, Template, memory_of, new_ram_file, seal_ram_file, template_for

if TYPE_CHECKING:
    from ..sandbox import ConfinedVM
    from ..supervisor.roles import TemplateBoot



@dataclass
class BootPlan:
    mode: str  # "warm" | "cold"
    argv: list[str]
    reason: str = ""  # why cold
    template: Template | None = None
    built: bool = False  # this boot built the template it clones


class WarmBoot:
    """Plans each boot of one supervisor's VM and restores clones."""

    def __init__(self, sup: TemplateBoot) -> None:
        self.sup = sup
        self.state_dir = sup.ws.path.parent.parent

    def _cold(self, reason: str) -> BootPlan:
        return BootPlan("cold", self.sup.launch.argv, reason)

    def _clone_argv(self, t: Template) -> list[str]:
        return QemuBackend.memory_file_argv(self.sup.launch.argv, t.memory_mib, t.memory, share=False,
                                            incoming=t.state_file)

    async def plan(self) -> BootPlan:
        """How to boot now: a clone of the shape's template (built now if missing), or cold with the reason."""
        launch = self.sup.launch
        if launch.extra.get(COLD_KEY):
            return self._cold("cold boot requested (--cold)")
        if self.sup.state.backend not in ("", "qemu"):
            return self._cold(f"templates need the qemu backend, not {self.sup.state.backend}")
        t = template_for(self.state_dir, launch.argv)
        problem = t.problem()
        if problem is None:
            return BootPlan("warm", self._clone_argv(t), template=t)
        if problem:
            try:
                with file_lock(t.lock_file, blocking=False, what="the template"):
                    t.discard()
            except Busy:
                pass
            return self._cold(f"template {t.key} not usable: {problem}; it was removed, the next start builds "
                              f"a new one")
        try:
            with file_lock(t.lock_file, blocking=False, what="the template"):
                if t.problem() is None:  # built by another start meanwhile
                    return BootPlan("warm", self._clone_argv(t), template=t)
                error = await self.build(t)
        except Busy:
            return self._cold(f"the template for this machine shape ({t.key}) is being built by another start")
        if error:
            t.discard()
            self.sup.serial_note(f"building the template failed: {error}; booting cold")
            return self._cold(f"building the template {t.key} failed: {error}")
        return BootPlan("warm", self._clone_argv(t), template=t, built=True)

    # ---- template ------------------------------------------------------------------------------
    async def build(self, t: Template) -> str:
        """Boot the shape's template to the agent's HELLO and save it; "" on success, else what failed."""
        sup = self.sup
        sup.enforce_network()  # the template's guest boots in the workspace's network namespace
        t0 = time.monotonic()
        t.prepare_build()
        shutil.copyfile(ro_open_library(self.state_dir / "cache"), t.memory.parent / RO_OPEN_NAME)
        os.chmod(t.memory.parent / RO_OPEN_NAME, 0o644)
        new_ram_file(t.memory, t.memory_mib)
        argv = sup.disk_argv(QemuBackend.memory_file_argv(sup.launch.argv, t.memory_mib, t.memory, share=True))
        hello = asyncio.Event()
        sup.serial_note(f"building the template {t.key} for this machine shape (cold boot to the agent's HELLO)")
        try:
            vm = await spawn_vm(sup.ws, replace(sup.launch, argv=argv), sup.state.backend,
                                {"agent": self._hello_waiter(hello), "ser0": sup.on_serial},
                                stdout=asyncio.subprocess.DEVNULL,
                                join_namespaces=sup.net.join_namespaces() if sup.net else None)
        except (OSError, MicroagentError) as exc:
            return f"could not start the template VM: {exc}"
        try:
            waiter = asyncio.ensure_future(vm.wait())
            done, _ = await asyncio.wait([asyncio.ensure_future(hello.wait()), waiter],
                                         timeout=sup.launch.boot_timeout, return_when=asyncio.FIRST_COMPLETED)
            if not hello.is_set():
                return "the template VM " + ("exited" if waiter in done else "did not reach HELLO") + " during boot"
            state_bytes = await asyncio.to_thread(self._save, t)
        except (OSError, QmpError) as exc:
            return f"saving the template failed: {exc}"
        finally:
            vm.kill()
            await vm.wait()
        seal_ram_file(t.memory)
        t.finish_build(time.monotonic() - t0, state_bytes)
        sup.serial_note(f"template {t.key} saved in {time.monotonic() - t0:.2f} s")
        return ""

    @staticmethod
    def _hello_waiter(hello: asyncio.Event) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                         Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            decoder = FrameDecoder()
            try:
                while not hello.is_set() and (data := await reader.read(65536)):
                    if any(f.type == FrameType.HELLO and f.stream == 0 for f in decoder.feed(data)):
                        hello.set()
                await reader.read()  # hold the channel open until the template VM is gone
            except (ConnectionError, OSError, MicroagentError):
                pass
            writer.close()
        return serve

    def _save(self, t: Template) -> int:
        """Stop the template VM and migrate its device state (not its RAM) into the template's state file."""
        tmp = t.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with QmpSession(self.sup.ws.qmp_socket) as qmp:
                qmp.command("stop")
                qmp.command("migrate-set-capabilities", ignore_shared_caps(True))
                qmp.command("getfd", {"fdname": "template"}, fds=[fd])
                qmp.command("migrate", {"uri": "fd:template"})
                qmp.wait_migration()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, t.state_file)
        return t.state_file.stat().st_size

    # ---- clone ---------------------------------------------------------------------------------
    async def restore(self, vm: "ConfinedVM", ignore_shared: bool = True,
                      before_resume: Callable[[], None] | None = None) -> str:
        """Restore a just-spawned clone from its inherited state descriptor; "" once it runs, else the error.
        ``ignore_shared``: the stream holds device state only (a template's); False: RAM too (a workspace
        snapshot). The capability changes the stream's format, so it must match the saving side's.
        ``before_resume`` runs in this thread while QEMU loads the state (the guest is paused until ``cont``);
        what it raises is raised here, and the guest is not resumed."""
        fd = vm.cmd.incoming_fd
        if fd is None:
            return "the clone's argv has no incoming state"

        def load(qmp: QmpSession) -> None:
            qmp.command("migrate-set-capabilities", ignore_shared_caps(ignore_shared))
            qmp.command("migrate-incoming", {"uri": f"fd:{fd}"})
            qmp.wait_migration()
        return await self.resume(load, before_resume)

    async def resume(self, load: Callable[[QmpSession], None] | None = None,
                     before_resume: Callable[[], None] | None = None) -> str:
        """Resume a VM spawned with its vCPUs held (a clone's ``-incoming defer``, a cold boot's ``-S``) once
        ``load`` ran through its monitor (in a thread: a clone's state) and ``before_resume`` here, side by side;
        "" once it runs, else the error. What ``before_resume`` raises is raised here, and the guest not resumed."""
        def connect() -> QmpSession:
            qmp = QmpSession(self.sup.ws.qmp_socket)  # its greeting comes once QEMU's main loop runs
            try:
                if load is not None:
                    load(qmp)
            except BaseException:
                qmp.close()
                raise
            return qmp

        def cont(qmp: QmpSession) -> None:
            with qmp:
                status = qmp.command("query-status") or {}
                if not status.get("running"):
                    qmp.command("cont")
        loading = asyncio.get_running_loop().run_in_executor(None, connect)  # submitted now, beside before_resume
        try:
            if before_resume is not None:
                before_resume()
        except BaseException:
            with contextlib.suppress(Exception):
                (await loading).close()
            raise
        try:
            await asyncio.to_thread(cont, await loading)
        except (OSError, QmpError) as exc:
            return str(exc)
        return ""


__all__ = ["COLD_KEY", "BootPlan", "WarmBoot", "memory_of"]
