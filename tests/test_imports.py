"""The package's import structure: no cycles (imports inside functions count), and the modules
that must stay light do not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cabb_ray

PACKAGE = Path(cabb_ray.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each cabb_ray module and the cabb_ray modules it imports, anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == 0 and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (found := visit(node)):
            return found
    return None


def first_level(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_modules():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None


def test_no_import_cycle_among_first_level_packages():
    graph: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        here = first_level(name)
        graph.setdefault(here, set())
        graph[here] |= {first_level(t) for t in targets if first_level(t) != here}
    for targets in graph.values():
        targets.discard("cabb_ray")  # the package's own __init__
    graph.pop("cabb_ray", None)
    assert find_cycle(graph) is None


def test_report_and_leaderboard_import_without_torch():
    code = (
        "import sys\n"
        "import cabb_ray.report.cli, cabb_ray.report.source, cabb_ray.report.ablation\n"
        "import cabb_ray.report.fidelity, cabb_ray.tune.leaderboard\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
