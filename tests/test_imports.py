"""The package's import graph has no cycle, function-level imports included (a lazy import that only holds a
cycle apart still makes the modules depend on each other), and ``distributed`` stays below the orchestrators.

The graph comes from each module's AST: every ``import`` and ``from ... import`` anywhere in the file, relative
or absolute ``ttm_kernels.*``. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when it is a
source module, else to ``pkg`` when its ``__init__`` binds ``name``; else ``name`` is a compiled extension
(``_C``), which imports nothing of the package. The one dynamic import, ``_ops._load(name)``
(``importlib.import_module(f"ttm_kernels.{name}")``), is modelled explicitly: each call of ``_load`` with
literal module names is an edge from the calling module to them.

``TTM_KERNELS_DIR`` checks another copy of the package (e.g. a checkout of another branch).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = "ttm_kernels"
ROOT = Path(os.environ.get("TTM_KERNELS_DIR", Path(__file__).resolve().parent.parent / PACKAGE))
# The orchestrators and what stands on them: the collectives must not import any of them.
ABOVE_DISTRIBUTED = ("functional", "linear", "topk", "modules", "distill")


def _modules() -> dict:
    """Dotted name -> (path, whether it is a package's ``__init__``) of every source module of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _bound_names(tree: ast.Module) -> set:
    """The names a module binds at its top level by assignment, definition or import."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _literal_strings(node) -> list:
    """The module names a ``_load`` argument can take: a string literal, or a conditional of such."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literal_strings(node.body) + _literal_strings(node.orelse)
    raise AssertionError(f"_ops._load called with {ast.unparse(node)}: not literal module names, so the import "
                         "graph cannot model it; extend _literal_strings")


def import_graph() -> dict:
    """Dotted module name -> the set of package modules it imports (anywhere in its source)."""
    modules = _modules()
    trees = {name: ast.parse(path.read_text(), str(path)) for name, (path, _) in modules.items()}
    bound = {name: _bound_names(tree) for name, tree in trees.items() if modules[name][1]}
    graph = {}
    for name, tree in trees.items():
        package = name if modules[name][1] else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == PACKAGE:
                        # ``import a.b.c`` imports a, a.b and a.b.c; the deepest source module is the dependency
                        edges.add(max((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                                       if ".".join(parts[:i]) in modules), key=len))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                if base not in modules:
                    continue  # outside the package
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges.add(f"{base}.{alias.name}")
                    elif not modules[base][1] or alias.name in bound[base] or alias.name == "*":
                        edges.add(base)
                    # else: a compiled extension module (_C), which imports nothing of the package
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == "_load" and node.args:
                    edges.update(f"{PACKAGE}.{m}" for m in _literal_strings(node.args[0]))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One cycle of ``graph`` as a list of nodes (first = last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_sees_every_kind_of_import(graph):
    """The parser's cases, on imports the package is known to hold: a relative ``from . import x`` (a module), a
    relative ``from .x import y``, ``from .. import x`` from a subpackage, ``from . import _C`` (an extension: no
    edge) and the dynamic loads of ``_ops``."""
    p = PACKAGE + "."
    assert {p + "reference", p + "spec", p + "_ops", p + "functional"} <= graph[PACKAGE]
    assert {p + "_rows", p + "_stats"} <= graph[p + "_ops"] and p + "_ops" in graph[p + "_topk_ops"]
    assert p + "spec" in graph[p + "integrations.trl"]
    assert graph[p + "cpu_kernels"] == {p + "_stats"}
    assert {p + "cpu_kernels", p + "triton_kernels", p + "triton_topk"} <= graph[p + "_ops"]
    assert PACKAGE in graph[p + "demo"]  # ``from . import fused_kd_loss``: the package's own names


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_distributed_imports_no_orchestrator(graph):
    """The collectives stand below the losses that use them, transitively."""
    below = reachable(graph, f"{PACKAGE}.distributed")
    above = sorted(f"{PACKAGE}.{m}" for m in ABOVE_DISTRIBUTED if f"{PACKAGE}.{m}" in below)
    assert not above, f"ttm_kernels.distributed imports {above} (directly or through others)"
