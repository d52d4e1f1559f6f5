"""The import graph of neox and megatron_core, read from the source with ast (issue 19 seam 3).

- No circle among the imports that run (module level and inside functions; ``if TYPE_CHECKING:``
  blocks are left out, since they never execute).
- neox.config, the lowest layer of neox, imports nothing of neox but itself and neox.errors (type
  imports included): resolving a config never reaches the launcher, the model or training.
- megatron_core imports only torch, the standard library and itself.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("neox", "megatron_core")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path], with_type_only: bool) -> set[str]:
    """Every module ``name`` imports (``from pkg import sub`` counts as pkg.sub when that is a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not with_type_only:
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph(with_type_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path, modules, with_type_only) if m in modules and m != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_walker_sees_imports_inside_functions_and_packages():
    graph = _graph(with_type_only=False)  # the walker itself, against imports known to be there
    assert "neox.config.args" in graph["neox.config"]  # package __init__
    assert "neox.launcher" in graph["neox.metrics"]  # inside a function
    assert "megatron_core.topology" in graph["megatron_core.parallel_state"]


def test_no_import_circle():
    assert _cycles(_graph(with_type_only=False)) == []


def test_config_imports_no_higher_layer():
    upward = {name: sorted(m for m in imported if not m.startswith("neox.config") and m != "neox.errors")
              for name, imported in _graph(with_type_only=True).items() if name.startswith("neox.config")}
    assert {name: bad for name, bad in upward.items() if bad} == {}


def test_megatron_core_imports_only_torch_and_the_standard_library():
    modules = _modules()
    allowed = set(sys.stdlib_module_names) | {"torch", "megatron_core"}
    outside = {}
    for name, path in modules.items():
        if name.startswith("megatron_core"):
            tops = {m.split(".")[0] for m in _imports(name, path, modules, with_type_only=True) if m}
            if tops - allowed:
                outside[name] = sorted(tops - allowed)
    assert outside == {}
