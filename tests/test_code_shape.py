"""The code's shape: no class over 300 lines, and the packages' import graph has no circle: imports inside functions and under TYPE_CHECKING count too (a
circle hidden there is still a circle). ``from pkg import sub`` depends on ``sub``; importing a name defined in a
package's ``__init__`` depends on the package."""

from __future__ import annotations

import ast
from pathlib import Path

from jupyter_conftest_helpers import REPO

PACKAGES = ("microagent_engine", "microagent_jupyter")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods and a.name != name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names}
                graph[name] |= subs & set(mods)
                if target in mods and target != name and subs - set(mods):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    graph = import_graph(REPO)
    found = cycles(graph)
    detail = "\n".join(" <-> ".join(group) + "\n  " + "\n  ".join(
        f"{m} imports {sorted(graph[m] & set(group))}" for m in group) for group in found)
    assert not found, f"import circles (break each by moving the shared fact into a leaf module):\n{detail}"


def test_the_check_sees_a_circle_hidden_in_a_function(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "microagent_engine" / "a.py").write_text("from .b import x\n")
    (tmp_path / "microagent_engine" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\ndef f():\n    from . import a\nx = 1\n")
    assert cycles(import_graph(tmp_path)) == [["microagent_engine.a", "microagent_engine.b"]]


MAX_CLASS_LINES = 300


def test_no_class_over_300_lines() -> None:
    big = []
    for name, path in modules(REPO).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, f"classes over {MAX_CLASS_LINES} lines (split them by concern): {big}"


def test_the_cli_leaves_the_supervisors_side_to_its_standby() -> None:
    # the CLI's modules do not import the supervisor's side (asyncio, the jail, the supervisor): a command that
    # starts a VM has its standby import those beside the CLI's own imports (engine/spawn.py), ~30 ms of every start
    import subprocess
    import sys

    code = ("import sys, microagent_engine.cli, microagent_engine.engine.facade\n"
            "print(' '.join(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith(("
            "'microagent_engine.supervisor', 'microagent_engine.sandbox.')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == [], f"the CLI imports the supervisor's side: {out}"
