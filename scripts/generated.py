"""Files generated from the code (docs/protocol.md, the panel's types): write them, or check the committed ones."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, text: str, source: str, command: str) -> int:
    """Write ``text`` to ``path``; with ``--check`` on the command line, 1 (saying how to regenerate) unless the
    committed file is ``text`` already. ``source`` names what it is generated from."""
    if "--check" not in sys.argv:
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    if not path.exists() or path.read_text() != text:
        print(f"{path} is not what {source} generates: run {command}", file=sys.stderr)
        return 1
    return 0
