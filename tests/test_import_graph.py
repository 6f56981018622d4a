"""The library's shape, read from its source: no import cycle, leaf errors, small modules.

Every import counts here, at module level, inside functions and under ``TYPE_CHECKING``: a
cycle closed by a late import is still two modules that each need the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "edadm"
MAX_LINES = 420  # "about 400": a module past it holds more than one concept


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The edadm module that importing ``name`` (a module, or a name in one) loads."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the edadm modules it imports (every import statement, wherever it stands)."""
    graph = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        graph[name] = {m for t in targets if (m := _resolve(t)) and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_library_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_late_and_type_only_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    # edadm.recon.caching takes Step from edadm.recon.plan; plan must not import caching back
    assert "edadm.recon.plan" in import_graph()["edadm.recon.caching"]


def test_errors_are_a_leaf_and_package_inits_import_no_siblings():
    graph = import_graph()
    assert graph["edadm.errors"] == set()
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            assert graph[name] == set(), f"{path} imports {sorted(graph[name])}: import from the modules"


def test_the_model_lives_in_quant_and_does_not_need_reconstruction_or_deployment():
    graph = import_graph()
    for name in (n for n in graph if n.startswith("edadm.quant.")):
        later = sorted(m for m in graph[name] if m.startswith(("edadm.recon", "edadm.deploy")))
        assert not later, f"{name} imports {later}"
    for name in (n for n in graph if n.startswith("edadm.recon.")):
        assert not any(m.startswith("edadm.deploy") for m in graph[name]), name


def test_no_module_is_over_about_400_lines():
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split by concept: {long}"


def test_the_code_cites_the_method_page_of_this_repository():
    assert (ROOT / "docs" / "method.md").exists()
    for folder in ("edadm", "stages"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "METHOD.md" not in path.read_text(), f"{path} cites METHOD.md: cite docs/method.md"
