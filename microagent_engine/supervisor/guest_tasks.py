"""Commands the supervisor itself runs in the guest: setup (once, before the first start) and the entrypoint
(at every start, feeding the restart policy)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from ..fsutil import open_private
from ..protocol import ExitCode, ExitKind, ExitStatus, FrameType, HaltMode, encode_exec

if TYPE_CHECKING:
    from .roles import TaskHost

SETUP_TIMEOUT = 3600.0
STOP_TIMEOUT = 5.0


class InternalExec:
    """A command the supervisor itself runs in the guest."""

    def __init__(self, on_output: Callable[[bytes], None]) -> None:
        self.on_output = on_output
        self.done: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()


class GuestTasks:
    """Internal execs: their streams, setup and the entrypoint."""

    def __init__(self, sup: TaskHost) -> None:
        self.sup = sup
        self.jobs: dict[int, InternalExec] = {}

    def deliver(self, ftype: int, stream: int, payload: bytes) -> bool:
        """Take a guest frame for an internal exec; False if ``stream`` is not one."""
        job = self.jobs.get(stream)
        if job is None:
            return False
        if ftype in (FrameType.STDOUT, FrameType.STDERR):
            job.on_output(payload)
        elif ftype == FrameType.EXIT:
            del self.jobs[stream]
            job.done.set_result(ExitStatus.parse(payload))
        elif ftype == FrameType.ERROR:
            job.on_output(b"microagent: " + payload + b"\n")
        return True

    def fail_all(self, message: str) -> None:
        for job in self.jobs.values():
            if not job.done.done():
                job.done.set_result(ExitStatus(ExitKind.FAILED_TO_START, ExitCode.NOT_FOUND, message))
        self.jobs.clear()

    def start(self, argv: list[str], on_output: Callable[[bytes], None],
              timeout: float | None = None) -> InternalExec:
        gsid = self.sup.new_stream()
        job = InternalExec(on_output)
        self.jobs[gsid] = job
        self.sup.to_agent(FrameType.EXEC, gsid, encode_exec(argv, self.sup.launch.env, "/", timeout))
        return job

    async def run_setup(self, commands: list[str]) -> bool:
        sup = self.sup
        log_path = sup.ws.path / "setup.log"
        with open_private(log_path, "ab") as log:
            def out(data: bytes) -> None:
                log.write(data)
                log.flush()
                sup.to_console(data)

            for i, command in enumerate(commands, 1):
                out(f"--- microagent: setup {i}/{len(commands)}: {command}\n".encode())
                st = await self.start(["/bin/sh", "-c", command], out, SETUP_TIMEOUT).done
                out(f"--- microagent: setup {i} ended: {st.status} {st.code}\n".encode())
                if st.status != ExitKind.EXITED or st.code != 0:
                    error = (f"setup command {i} ({command!r}) failed ({st.status} {st.code}); its output is "
                             f"in {log_path} and the serial log. Fix it, then delete and recreate the workspace")
                    sup.save(state="failed", error=error)
                    sup.intent = "setup-failed"
                    sup.to_agent(FrameType.HALT, 0, HaltMode.HALT.encode())
                    return False
        sup.save(setup_done=True)
        return True

    async def run_entrypoint(self, command: str) -> None:
        sup = self.sup
        sup.save(entrypoint="running")
        st = await self.start(["/bin/sh", "-c", command], sup.to_console).done
        if sup.vm_exited.is_set() or sup.intent is not None:
            return
        sup.save(entrypoint=f"{st.status} {st.code}")
        sup.serial_note(f"entrypoint ended: {st.status} {st.code}")
        if sup.wants_restart(st) and sup.state.state == "running":
            sup.intent = "restart"
            sup.to_agent(FrameType.HALT, 0, HaltMode.POWEROFF.encode())
            try:
                await asyncio.wait_for(sup.vm_exited.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                sup.kill_vm()
