#!/usr/bin/env python3
"""Hash of the JupyterLab panel's sources, recorded next to its committed build.

    python scripts/panel_source_hash.py           print the hash of labextension/ sources
    python scripts/panel_source_hash.py --check   fail unless the committed build was made from these sources

The webpack bundle itself is not byte-reproducible across checkout paths (module ids differ), so CI compares
this hash, which `make labextension` writes after every successful build.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "labextension"
RECORD = ROOT / "microagent_jupyter" / "labextension" / "SOURCE_HASH"
INPUTS = ("src", "style", "schema", "package.json", "yarn.lock", "tsconfig.json", "install.json")


def source_hash() -> str:
    h = hashlib.sha256()
    for name in INPUTS:
        path = SOURCES / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(SOURCES)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def main() -> int:
    current = source_hash()
    if "--check" not in sys.argv:
        print(current)
        return 0
    recorded = RECORD.read_text().strip() if RECORD.exists() else "(none)"
    if recorded != current:
        print(f"the committed panel build ({RECORD}) was made from other sources: recorded {recorded}, "
              f"sources now {current}; rebuild with 'make labextension' and commit the result", file=sys.stderr)
        return 1
    print(f"panel build matches its sources ({current[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
