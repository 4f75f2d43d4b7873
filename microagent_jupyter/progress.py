"""Progress of a cell's preparation (kernel install, image pull, rootfs build, boot), shown in place.

An instance is the engine's progress callback (``Engine(progress=...)``, the same ``Callable[[str], None]`` the
CLI passes); ``done()`` is called when the command starts and collapses the display.
"""

from __future__ import annotations

import html
import sys
import time
from typing import Any

QUICK_SECONDS = 5.0  # a preparation shorter than this leaves no trace once the command starts


class CellProgress:
    """In a kernel: one display that each step replaces, then a collapsed summary (or nothing, if it was quick).
    In a terminal: one line per step on stderr, as the CLI prints them."""

    def __init__(self, in_kernel: bool) -> None:
        self.in_kernel = in_kernel
        self.steps: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.handle: Any = None
        self.finished = False

    def __call__(self, message: str) -> None:
        if self.finished:
            return
        self.steps.append((time.monotonic() - self.started, message))
        if not self.in_kernel:
            print(message, file=sys.stderr, flush=True)
            return
        from IPython.display import HTML, display

        done = "".join(f"<div style='opacity:.6'>✓ {html.escape(m)}</div>" for _, m in self.steps[:-1])
        body = HTML(f"<div class='microagent-progress'>{done}<div>… {html.escape(message)}</div></div>")
        if self.handle is None:
            self.handle = display(body, display_id=True)
        else:
            self.handle.update(body)

    def done(self) -> None:
        """The command started (or the cell failed): collapse the steps into one summary line."""
        if self.finished:
            return
        self.finished = True
        if self.handle is None:
            return
        from IPython.display import HTML

        total = time.monotonic() - self.started
        if total < QUICK_SECONDS:
            self.handle.update(HTML(""))
            return
        rows = "".join(f"<div>{t:6.1f} s  {html.escape(m)}</div>" for t, m in self.steps)
        self.handle.update(HTML(f"<details class='microagent-progress'><summary>prepared in {total:.1f} s "
                                f"({len(self.steps)} steps)</summary><pre>{rows}</pre></details>"))

