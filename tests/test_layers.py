"""The architecture, pinned: layers, no import cycle, rooms under 600 lines.

Every module of ``infron_dagster`` is read with ``ast`` (never imported) and put in a layer
(docs/DESIGN "Layers"), lowest first:

1. **wire**: the HTTP client and the batch object model (:data:`WIRE`). No Dagster, no pandas.
2. **local**: the emulator, ``infron_dagster/local/*``. No Dagster.
3. **data**: every other Dagster-free module (prepare, collect, storage, manifest, ...). A new
   module is data by default, so it must not import Dagster, not even lazily.
4. **dagster**: the modules in :data:`DAGSTER` (resource, assets, sensor, checks, jobs,
   components, Dagster metadata). A module that imports Dagster must be listed there.
5. **face**: the package ``infron_dagster`` itself, which re-exports the public names.

What is checked:

- No module imports one of a higher layer. Every import counts here: top-level, lazy (inside
  a function) and ``if TYPE_CHECKING:`` alike, since a lazy import is still a dependency.
- The data, local and wire layers import no Dagster at all (the wire no pandas either).
- No import cycle among modules. Only imports that run while the module is imported count:
  module level (including ``try``/``if`` blocks) and class bodies. An import inside a
  function runs once both modules are loaded, so it cannot break import order, and one under
  ``if TYPE_CHECKING:`` never runs; both are left out of the graph. The implicit import of a
  parent package by a submodule is left out too (only what the source says counts).
- Every module is under :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "infron_dagster"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE  # read, never imported
MAX_LINES = 600

WIRE = frozenset(
    f"{PACKAGE}.{name}"
    for name in ("errors", "untrusted", "models", "client", "retry", "infron_style")
)
DAGSTER = frozenset(
    f"{PACKAGE}.{name}"
    for name in (
        "resources",
        "assets",
        "sensor",
        "checks",
        "cancel_job",
        "metadata",
        "table_loader",
        "progress",
        "resume",
        "run_config",
        "collect_asset",
        "auto_retry",
        "status",
    )
)
DAGSTER_PACKAGES = (f"{PACKAGE}.components",)
LAYERS = ("wire", "local", "data", "dagster", "face")
# Third-party top-level packages a layer must never import (not even lazily).
FORBIDDEN = {
    "wire": ("dagster", "pandas"),
    "local": ("dagster",),
    "data": ("dagster",),
}


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name (for ours: the module, not a name inside it)
    line: int
    runs_at_import: bool  # module level or class body, not under TYPE_CHECKING


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> str:
    """The layer a module belongs to (see the module docstring for the rule)."""
    if module == PACKAGE:
        return "face"
    if module in WIRE:
        return "wire"
    if module in DAGSTER or module.startswith(DAGSTER_PACKAGES):
        return "dagster"
    if module == f"{PACKAGE}.local" or module.startswith(f"{PACKAGE}.local."):
        return "local"
    return "data"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The absolute modules a ``from ... import ...`` names: ``from . import engine`` is the
    module ``<package>.engine`` when it is one, else the package itself."""
    if node.level:
        is_package = SOURCES[module].name == "__init__.py"
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base)
        source = f"{prefix}.{node.module}" if node.module else prefix
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        out.append(candidate if candidate in SOURCES else source)
    return out


def imports_of(module: str) -> list[Import]:
    """Every import statement of ``module``, resolved, with where it runs."""
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8"))
    found: list[Import] = []

    def visit(node: ast.AST, runs: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, False)
                for stmt in child.orelse:
                    visit_stmt(stmt, runs)
            else:
                visit_stmt(child, runs)

    def visit_stmt(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, runs) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend(Import(t, node.lineno, runs) for t in _resolve(module, node))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(node, False)
        else:
            visit(node, runs)

    visit(tree, True)
    return found


IMPORTS = {module: imports_of(module) for module in SOURCES}


def _ours(target: str) -> str | None:
    """The module of ours an import names, None for one that does not exist (or not ours)."""
    return target if target in SOURCES else None


def _where(module: str, imp: Import) -> str:
    lazy = "" if imp.runs_at_import else " (lazy)"
    return f"{SOURCES[module].relative_to(ROOT.parent)}:{imp.line}{lazy}"


def test_every_module_has_a_layer_and_the_sets_name_real_modules():
    assert len(SOURCES) > 30, "the package was not found"
    assert {layer_of(m) for m in SOURCES} <= set(LAYERS)
    # The wire and the Dagster list name modules that exist (a rename updates the list).
    missing = sorted(m for m in WIRE if m not in SOURCES)
    assert not missing, f"WIRE names modules that do not exist: {missing}"


def test_no_module_imports_a_higher_layer():
    upward = set()
    for module, imports in IMPORTS.items():
        mine = LAYERS.index(layer_of(module))
        for imp in imports:
            target = _ours(imp.target) if imp.target.startswith(PACKAGE) else None
            if target is None or target == module:
                continue
            theirs = LAYERS.index(layer_of(target))
            if theirs > mine:
                upward.add(
                    f"{_where(module, imp)}: {module} ({LAYERS[mine]}) imports "
                    f"{target} ({LAYERS[theirs]})"
                )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_lower_layers_import_no_dagster_not_even_lazily():
    found = []
    for module, imports in IMPORTS.items():
        layer = layer_of(module)
        for imp in imports:
            top = imp.target.split(".")[0]
            for banned in FORBIDDEN.get(layer, ()):
                if top == banned or top.startswith(f"{banned}_"):
                    found.append(f"{_where(module, imp)}: {module} ({layer}) imports {imp.target}")
    assert not found, (
        "a Dagster-free layer imports what it must not (a module built on Dagster belongs "
        "in DAGSTER in tests/test_layers.py; anything else must stay Dagster-free):\n"
        + "\n".join(found)
    )


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module, imports in IMPORTS.items():
        for imp in imports:
            if not imp.runs_at_import or not imp.target.startswith(PACKAGE):
                continue
            target = _ours(imp.target)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """One shortest path ``start -> ... -> start`` (breadth first), to show a cycle."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return [start]


def test_no_import_cycle():
    graph = _import_graph()
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other at import time:\n" + "\n".join(
        f"{len(c)} modules ({', '.join(c)}), e.g. {' -> '.join(_shortest_cycle(graph, c[0]))}"
        for c in cycles
    )


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _shortest_cycle(graph, "a") == ["a", "b", "c", "a"]


def test_imports_are_read_with_where_they_run():
    # A lazy import and a TYPE_CHECKING one are seen, and marked as not run at import time.
    client = {i.target: i for i in IMPORTS[f"{PACKAGE}.client"]}
    assert client[f"{PACKAGE}.retry"].runs_at_import
    lazy = [i for imports in IMPORTS.values() for i in imports if not i.runs_at_import]
    assert lazy, "no lazy import found at all: the reader is broken"


def test_every_module_is_under_the_line_limit():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in SOURCES.items()}
    over = sorted((n, m) for m, n in sizes.items() if n >= MAX_LINES)
    assert not over, f"modules of {MAX_LINES} lines or more (split by idea):\n" + "\n".join(
        f"{n:5d} {SOURCES[m].relative_to(ROOT.parent)}" for n, m in reversed(over)
    )
