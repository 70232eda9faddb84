"""Architecture rules of the source tree, checked on the AST (fast: nothing is imported).

The import graph of ``src/mpqkit`` has no cycle. An edge ``a -> b`` is any ``import`` or
``from ... import`` in module ``a`` (at any depth, so imports inside functions count too), with
relative imports resolved and a dotted name resolved to the deepest module that exists
(``from mpqkit.quant.layers import QConv2d`` -> ``mpqkit.quant.layers``). A module's imports of
its own parent packages are ignored (importing a submodule runs its package anyway).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mpqkit"



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    files = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] or [prefix]
            else:
                continue
            for t in targets:
                while t and t not in files:  # deepest existing module
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One import cycle through the component, as ``a -> b -> ... -> a``."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    queue = [start]
    while queue:  # BFS inside the component back to start
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_graph_and_cycle_finder() -> None:
    graph = import_graph()
    assert "mpqkit.complexity" in graph["mpqkit.policy"]
    assert "mpqkit.quant.layers" in graph["mpqkit.complexity"]
    assert "mpqkit.runio" in graph["mpqkit.policy"]  # imported inside Policy.save only
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(toy) == [["a", "b", "c"]]
    assert _cycle_path(toy, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    msg = "\n".join("import cycle: " + " -> ".join(_cycle_path(graph, c)) for c in cycles)
    assert not cycles, msg


MAX_FUNCTION_LINES = 80


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str]]:
    """Functions and methods of the package longer than ``limit`` lines, longest first.

    A function's length is ``end_lineno - lineno + 1`` of its AST node (decorators not
    counted, its docstring and nested functions included), as ``arch_check.py`` counts it.
    """
    out = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{path.relative_to(SRC)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_function_is_too_long() -> None:
    offenders = long_functions()
    msg = "\n".join(f"{n} lines: {where}" for n, where in offenders)
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines:\n{msg}"
