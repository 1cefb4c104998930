"""Imports inside the smtpguard package run one way."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "smtpguard"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path, modules: set[str]) -> Iterator[str]:
    """Every module of the package this file imports, wherever the import
    statement sits (top level, a function, `if TYPE_CHECKING:`)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the submodule when name is one, else pkg itself.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                       else source for alias in node.names]
        else:
            continue
        yield from (t for t in targets if t in modules)


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a package is its __init__)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {name: set(imports(path, root, set(files))) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or of one that
    imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or v in edges[v]:
                found.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_cycle_finder_sees_a_cycle() -> None:
    """The finder itself: a three-module loop and a self-import are reported,
    a diamond is not."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"},
             "f": {"g", "h"}, "g": {"i"}, "h": {"i"}, "i": set()}
    assert cycles(edges) == [["a", "b", "c"], ["e"]]


def test_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The graph holds imports made inside functions and under TYPE_CHECKING,
    resolves relative ones, and a `from package import name` is the submodule
    when name is one and the package's __init__ when it is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\n\ndef f():\n    from pkg.sub import c\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n",
        "sub/__init__.py": "X = 1\n",
        "sub/c.py": "import os\nfrom .. import a\nfrom pkg.sub import X\n",
        "d.py": "import pkg.sub.c\nimport pkg\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert graph(pkg) == {
        "pkg": set(), "pkg.a": {"pkg.b", "pkg.sub.c"}, "pkg.b": {"pkg.a"},
        "pkg.sub": set(), "pkg.sub.c": {"pkg.a", "pkg.sub"}, "pkg.d": {"pkg.sub.c", "pkg"},
    }
    assert cycles(graph(pkg)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_no_import_cycles() -> None:
    """No module of agent/smtpguard imports, directly or through others, one
    that imports it back: not at the top, not inside a function, not under
    `if TYPE_CHECKING:` (a cycle that only type checking sees is still a
    cycle in the design). A room that must call upward gets a small Protocol
    of what it needs instead."""
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)
