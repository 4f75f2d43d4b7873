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

from generated import write_or_check  # noqa: E402
from microagent_engine.protocol_doc import DOC_PATH, render_protocol_doc  # noqa: E402


def main() -> int:
    return write_or_check(ROOT / DOC_PATH, render_protocol_doc(), "microagent_engine/protocol.py",
                          "python scripts/protocol_doc.py")


if __name__ == "__main__":
    sys.exit(main())
