"""The shape of the code: `dapft/` modules import one another in one direction, top to bottom.

Function-level imports count like top-level ones: a lazy import that climbs back up is still a
circle a reader has to hold in their head, and it is how the last one crept in."""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).parents[1]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports anywhere in its text."""
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == package.name:  # from dapft import distributed
                    deps |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith(package.name + "."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_the_modules_import_each_other_without_a_circle():
    try:
        order = list(TopologicalSorter(import_graph(REPO / "dapft")).static_order())
    except CycleError as exc:
        raise AssertionError(f"an import circle among dapft modules: {' -> '.join(exc.args[1])}") from None
    assert "dap" in order and "cli" in order


def test_the_check_finds_a_circle_when_there_is_one(tmp_path):
    package = tmp_path / "dapft"
    package.mkdir()
    (package / "low.py").write_text("def f():\n    from dapft.high import g\n")  # lazy, and still a circle
    (package / "high.py").write_text("from dapft import low\n")
    try:
        list(TopologicalSorter(import_graph(package)).static_order())
    except CycleError:
        return
    raise AssertionError("the circle low -> high -> low was not found")


def test_contributing_lists_every_module_in_a_layer_above_everything_it_imports():
    """CONTRIBUTING.md's layer table is the rule a contributor reads; it may not drift from the code."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    table = text.split("<!-- layers -->")[1]
    layer_of = {}
    rows = table.strip().splitlines()
    for row in rows[2:rows.index("") if "" in rows else None]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[1]):
            layer_of[name] = int(cells[0])
    graph = import_graph(REPO / "dapft")
    assert set(layer_of) == set(graph) - {"__init__", "__main__"}, set(graph) ^ set(layer_of)
    climbing = [f"{m} (layer {layer_of[m]}) imports {d} (layer {layer_of[d]})"
                for m, deps in graph.items() if m in layer_of for d in deps if layer_of[d] >= layer_of[m]]
    assert not climbing, climbing
