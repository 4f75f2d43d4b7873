"""One ``%microagent`` call as its subcommand handler sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from microagent_engine import Engine, ExecResult


@dataclass
class Call:
    """``sub`` as typed (an alias included), the words after it, the cell body (None for a line magic), the engine
    of the call's state directory, the IPython shell, whether widgets can render, and where a guest command's
    :class:`ExecResult` is recorded (``MicroagentMagics.last_result``)."""

    sub: str
    argv: list[str]
    cell: str | None
    engine: Engine
    shell: Any
    in_kernel: bool
    on_result: Callable[[ExecResult], None]
