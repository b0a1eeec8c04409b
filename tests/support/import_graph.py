"""The import graph between the project's own modules, read with `ast` (nothing is imported or run).

    .venv/bin/python tests/support/import_graph.py      # prints circles and function-level imports

A module's edges are the project modules it imports, at the top level or inside a function; `from a.b import c`
counts as an edge to `a.b.c` when that is a module, else to `a.b`. Importing a package runs its `__init__`, so an
edge to `a.b.c` also counts as one to `a.b` (an import of a package face that re-exports is where circles hide).
`TYPE_CHECKING` blocks are left out: they never run. A package face that loads names on first use (PEP 562) lists
their modules in a module-level `_LAZY` dict: each module named there counts as an import of the face.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vae", "pipeline", "flows")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported project module
    line: int
    in_function: str | None  # the enclosing function's name, or None at module level
    comment: str  # the source line's trailing comment, if any


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every project module by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """The project imports of module `name` at `path`."""
    text = path.read_text()
    lines = text.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.stmt, function: str | None) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            # the import line's own comment, else a comment line just above it
            own = line.split("#", 1)[1].strip() if "#" in line else ""
            comment = own or (above.lstrip("# ") if above.startswith("#") else "")
            found.append(Import(name, target, node.lineno, function, comment))

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse, function)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, function)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in child.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, child, function)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, function or child.name)
            else:
                visit(child, function)

    tree = ast.parse(text)
    visit(tree, None)
    for node in tree.body:  # a lazy face's `_LAZY = {name: module}`: the modules it loads on first use
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            for value in ast.walk(node.value):
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value in known:
                    add(value.value, node, None)
    return found


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[Import]]:
    """(edges {module: modules it imports, packages' __init__ included}, every project import)."""
    known = modules(root)
    every = [imp for name, path in known.items() for imp in imports(name, path, known)]
    edges: dict[str, set[str]] = {name: set() for name in known}
    for imp in every:
        target = imp.target
        while target:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if target in known and target != imp.source and not imp.source.startswith(target + "."):
                edges[imp.source].add(target)
            target = target.rpartition(".")[0]
    return edges, every


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def main() -> None:
    edges, every = graph()
    found = circles(edges)
    local = [imp for imp in every if imp.in_function]
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} edges, {len(found)} circles, "
          f"{len(local)} project imports inside functions")
    for component in found:
        print("circle:", " <-> ".join(component))
    for imp in local:
        print(f"in function: {imp.source}:{imp.line} {imp.in_function}() -> {imp.target}  # {imp.comment}")


if __name__ == "__main__":
    main()
