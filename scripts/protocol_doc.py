#!/usr/bin/env python3
"""docs/protocol.md from microagent_engine/protocol.py (via microagent_engine/protocol_doc.py).

    python scripts/protocol_doc.py           write docs/protocol.md
    python scripts/protocol_doc.py --check   fail unless the committed docs/protocol.md is what protocol.py renders
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from microagent_engine.protocol_doc import DOC_PATH, render_protocol_doc  # noqa: E402


def main() -> int:
    path = ROOT / DOC_PATH
    text = render_protocol_doc()
    if "--check" not in sys.argv:
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    if not path.exists() or path.read_text() != text:
        print(f"{path} is not what microagent_engine/protocol.py renders: run python scripts/protocol_doc.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
