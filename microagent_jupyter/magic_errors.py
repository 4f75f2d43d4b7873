"""What a ``%microagent`` cell raises when its guest command ends badly or is interrupted."""

from __future__ import annotations

import subprocess

from microagent_engine import ExecResult
from microagent_engine.protocol import ExitKind


class MicroagentCellError(subprocess.CalledProcessError):
    """A cell's command ended badly: non-zero exit, signal, timeout, or it could not start.

    ``returncode``/``exit_code`` is the command's exit code (as the CLI returns it); ``result`` the full
    :class:`~microagent_engine.ExecResult`; ``workspace`` where it ran.
    """

    def __init__(self, result: ExecResult, argv: list[str], workspace: str):
        super().__init__(result.exit_code, argv, result.stdout, result.stderr)
        self.result, self.workspace = result, workspace

    @property
    def exit_code(self) -> int:
        return self.returncode

    def __str__(self) -> str:
        cmd = " ".join(self.cmd)
        where = f"in workspace {self.workspace!r}"
        status = self.result.status
        if status == ExitKind.TIMED_OUT:
            return f"{cmd!r} {where} timed out (exit code {self.returncode})"
        if status == ExitKind.SIGNALED:
            return f"{cmd!r} {where} was killed by signal {self.result.code} (exit code {self.returncode})"
        if status == ExitKind.FAILED_TO_START:
            return f"{cmd!r} {where} could not start: {self.result.message} (exit code {self.returncode})"
        return f"{cmd!r} {where} exited with code {self.returncode}"


class MicroagentInterrupted(KeyboardInterrupt):
    """Ctrl-C / kernel interrupt during a guest command: the command was stopped (INT, TERM, then KILL).
    Shown as one ``KeyboardInterrupt: ...`` line instead of a traceback through the engine."""
