"""The package's imports read from its source (`ast`, nothing is imported): what the structure tests
and `benchmarks/structure.py` count. Every import counts, at module level, inside a function or under
TYPE_CHECKING alike: each is a dependency a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = "anyv2v_core"


def package_of(path: Path) -> list[str]:
    """The dotted parts of the package a file of the repository belongs to."""
    return list(path.relative_to(REPO_ROOT).parent.parts)


def imported_names(source: str, package: list[str]) -> set[str]:
    """Every module (and imported name) a file of `package` (its dotted parts) imports, relative
    imports resolved: `from ..x import y` in anyv2v_core.toy gives anyv2v_core.x and anyv2v_core.x.y."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def engine_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the engine."""
    modules = {}
    for path in sorted((REPO_ROOT / ENGINE).rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """{engine module: the engine modules it imports}."""
    modules = engine_modules()
    return {name: {target for target in imported_names(path.read_text(), package_of(path))
                   if target in modules and target != name}
            for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)
