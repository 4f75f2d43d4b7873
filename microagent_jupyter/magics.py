"""IPython magics: ``%%microagent run`` runs a cell inside a microVM; ``%microagent ...`` manages workspaces.

Load with ``%load_ext microagent_jupyter``. The state directory is ``$MICROAGENT_STATE_DIR`` (read at every
call), else ``~/.microagent``; ``%microagent --state-dir DIR ...`` overrides it for one call. The subcommands are
the table in :mod:`microagent_jupyter.magic_table`.
"""

from __future__ import annotations

import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from microagent_engine import Engine, ExecResult
from microagent_engine.errors import MicroagentError

from . import display as D
from . import magic_table
from ._engine import get_engine
from .magic_call import Call
from .magic_errors import MicroagentCellError, MicroagentInterrupted
from .magic_run import unbuffered_python

__all__ = ["MicroagentCellError", "MicroagentInterrupted", "MicroagentMagics", "load_ipython_extension",
           "split_line", "unbuffered_python", "unload_ipython_extension"]


def split_line(line: str) -> list[str]:
    """Split a magic line like a shell would (quotes, backslash escapes). IPython has already expanded
    ``$var`` and ``{expr}`` in it."""
    try:
        return shlex.split(line, posix=True)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise UsageError(f"cannot split the line into words: {exc}; close the quote or escape it") from None


def _short_traceback(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
    if issubclass(etype, KeyboardInterrupt):
        etype = KeyboardInterrupt  # what the user did, and what a kernel's error reply should name
    stb = [f"\x1b[0;31m{etype.__name__}\x1b[0m: {D.notebook_wording(str(value))}"]
    shell._showtraceback(etype, value, stb)
    return stb


@magics_class
class MicroagentMagics(Magics):
    """``%microagent`` / ``%%microagent``: microVM workspaces from a notebook."""

    def __init__(self, shell: Any = None, state_dir: str | None = None):
        super().__init__(shell)
        self.state_dir = state_dir
        self.last_result: ExecResult | None = None

    def engine(self, state_dir: str | None = None) -> Engine:
        return get_engine(state_dir or self.state_dir)

    @property
    def in_kernel(self) -> bool:
        """True under a Jupyter kernel (widgets can render); False in a terminal IPython."""
        return getattr(self.shell, "kernel", None) is not None

    @line_cell_magic
    def microagent(self, line: str = "", cell: str | None = None) -> Any:
        state_dir = None
        words = split_line(line)
        if words[:1] == ["--state-dir"] and len(words) > 1:
            state_dir, words = words[1], words[2:]
        elif words[:1] and words[0].startswith("--state-dir="):
            state_dir, words = words[0].split("=", 1)[1], words[1:]
        if not words or words[0] in ("-h", "--help"):
            return D.Text(magic_table.help_text())
        sub, rest = words[0], words[1:]
        entry = magic_table.lookup(sub)
        if rest[:1] in (["-h"], ["--help"]):
            return D.Text(magic_table.usage_of(sub))
        if cell is not None and cell.strip() and not entry.cell:
            raise UsageError(f"%%microagent {sub} takes no cell body; use %microagent {sub} ... (one %)")
        return entry.handler(Call(sub, rest, cell, self.engine(state_dir), self.shell, self.in_kernel,
                                  self._record))

    microagent.__doc__ = magic_table.help_text()

    def _record(self, result: ExecResult) -> None:
        self.last_result = result


_installed_handler: list[bool] = []


def _bodiless_cell_as_line(lines: list[str]) -> list[str]:
    """IPython refuses a cell magic with an empty body; ``%%microagent run --help`` alone in a cell is a line
    magic call, so rewrite it as one (an input transformer, run before IPython's magic parsing)."""
    body = [ln for ln in lines[1:] if ln.strip()]
    if lines and not body and lines[0].lstrip().startswith("%%microagent"):
        return [lines[0].lstrip()[1:]] + lines[1:]
    return lines


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(MicroagentMagics)
    if _bodiless_cell_as_line not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(_bodiless_cell_as_line)
    from .completion import install_completer
    install_completer(ipython)
    # engine errors are messages for the user, not bugs: show them without a traceback into the engine,
    # unless the user already installed their own custom exception handler
    if not ipython.custom_exceptions:
        ipython.set_custom_exc((MicroagentError, MicroagentCellError, MicroagentInterrupted), _short_traceback)
        _installed_handler.append(True)
    from .python_session import prewarm
    prewarm()  # the notebook's default Python session, when a warm snapshot is ready (background)


def unload_ipython_extension(ipython: Any) -> None:
    if _bodiless_cell_as_line in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(_bodiless_cell_as_line)
    from .completion import uninstall_completer
    uninstall_completer(ipython)
    if _installed_handler:
        ipython.set_custom_exc((), None)
        _installed_handler.clear()
