#!/usr/bin/env python3
"""Headless main job: execute notebooks/quickstart.ipynb in a real kernel and print what each cell showed.

Usage: python scripts/demo.py [NOTEBOOK]   (the executed copy is written next to it as *.out.ipynb in /tmp)
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            title = next((ln for ln in cell.source.splitlines() if ln.startswith("#")), None)
            if title:
                print(f"\n{title}")
            continue
        print(f"\n[{i}] " + cell.source.strip().replace("\n", "\n    "))
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                print("    " + out.text.rstrip().replace("\n", "\n    "))
            elif out.output_type == "error":
                print(f"    ! {out.ename}: {out.evalue}")
            elif "text/plain" in out.get("data", {}):
                print("    " + out["data"]["text/plain"].rstrip().replace("\n", "\n    "))
    out_path = Path("/tmp") / (path.stem + ".out.ipynb")
    nbformat.write(nb, out_path)
    print(f"\nExecuted notebook written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
