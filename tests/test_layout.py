"""The shape of the code: `dapft/`'s folders are its layers, and its modules import one another in
one direction, top to bottom, never into a layer above their own; no module, class or function
grows past the length at which this field's codebases split by job.

Function-level imports count like top-level ones: a lazy import that climbs back up is still a
circle a reader has to hold in their head, and it is how the last one crept in."""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).parents[1]
MAX_MODULE_LINES = 500
MAX_DEFINITION_LINES = 80  # a class or a function


def module_name(path: Path, package: Path) -> str:
    """dapft/utils/console.py -> 'utils.console'; dapft/cli.py -> 'cli'; dapft/utils/__init__.py -> 'utils'."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module name (dotted, below the package) -> the package's modules it imports anywhere in its
    text. `from dapft.utils import console` is the module `utils.console`; `from dapft import
    __version__` is no module's."""
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p, package) for p in paths}
    graph = {}
    for path in paths:
        name, deps = module_name(path, package), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == package.name or node.module.startswith(package.name + "."):
                    below = node.module[len(package.name) + 1:]
                    for alias in node.names:
                        inner = f"{below}.{alias.name}" if below else alias.name
                        if inner in modules:
                            deps.add(inner)  # a module imported from its package
                        elif below:
                            deps.add(below)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len(package.name) + 1:] for a in node.names if a.name.startswith(package.name + ".")}
        graph[name] = deps - {name}
    return graph


def layer_table() -> dict[str, int]:
    """CONTRIBUTING.md's table: a folder (`data/`) or a top-level module (`cli`) -> its layer."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    rows = text.split("<!-- layers -->")[1].strip().splitlines()
    layer_of = {}
    for row in rows[2:rows.index("") if "" in rows else None]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`([\w/]+)`", cells[1]):
            layer_of[name.rstrip("/")] = int(cells[0])
    return layer_of


def layer(module: str, layer_of: dict[str, int]) -> int:
    """A module's layer is its folder's (utils.console -> utils), a top-level module's its own."""
    return layer_of[module.split(".")[0]]


def test_the_modules_import_each_other_without_a_circle():
    try:
        order = list(TopologicalSorter(import_graph(REPO / "dapft")).static_order())
    except CycleError as exc:
        raise AssertionError(f"an import circle among dapft modules: {' -> '.join(exc.args[1])}") from None
    assert "objective.dap" in order and "cli" in order


def test_the_check_finds_a_circle_when_there_is_one(tmp_path):
    package = tmp_path / "dapft"
    (package / "low").mkdir(parents=True)
    (package / "low" / "base.py").write_text("def f():\n    from dapft.high import g\n")  # lazy, and still a circle
    (package / "high.py").write_text("from dapft.low import base\n")
    graph = import_graph(package)
    assert graph["low.base"] == {"high"} and graph["high"] == {"low.base"}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError:
        return
    raise AssertionError("the circle low.base -> high -> low.base was not found")


def test_every_module_imports_only_its_own_layer_or_the_layers_below():
    """CONTRIBUTING.md's layer table is the rule a contributor reads; it may not drift from the code.
    Within a folder, modules may import one another (the circle check holds them to one direction)."""
    layer_of = layer_table()
    graph = import_graph(REPO / "dapft")
    tops = {m.split(".")[0] for m in graph} - {"__init__", "__main__"}
    assert tops == set(layer_of), f"in the code, not the table: {tops - set(layer_of)}; " \
                                  f"in the table, not the code: {set(layer_of) - tops}"
    climbing = [f"{m} (layer {layer(m, layer_of)}) imports {d} (layer {layer(d, layer_of)})"
                for m, deps in graph.items() if m not in ("__init__", "__main__")
                for d in deps if layer(d, layer_of) > layer(m, layer_of)]
    assert not climbing, climbing
    # Every folder is a layer of its own: the table gives no two folders one number.
    folders = [name for name in layer_of if (REPO / "dapft" / name).is_dir()]
    assert len({layer_of[f] for f in folders}) == len(folders), layer_of


def test_the_layer_check_refuses_an_import_from_a_layer_above(tmp_path):
    package = tmp_path / "dapft"
    (package / "utils").mkdir(parents=True)
    (package / "utils" / "files.py").write_text("from dapft.training import trainer\n")
    (package / "training").mkdir()
    (package / "training" / "trainer.py").write_text("")
    graph = import_graph(package)
    layer_of = {"utils": 0, "training": 5}
    assert [d for d in graph["utils.files"] if layer(d, layer_of) > layer("utils.files", layer_of)] == ["training.trainer"]


def test_no_module_class_or_function_is_longer_than_the_codebases_we_learn_from_split_at():
    too_long = []
    for path in sorted((REPO / "dapft").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_DEFINITION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def test_contributings_tree_names_every_module():
    """The tree a newcomer reads in CONTRIBUTING.md has a line for every module, in its folder."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    tree = text[text.index("```\ndapft/\n"):]
    tree = tree[:tree.index("\n```")]
    folder, seen = None, set()
    for line in tree.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("    ") and line.split()[0].endswith("/"):
            folder = line.split()[0].rstrip("/")
        seen |= {f"{folder}/{name}" if line.startswith("    ") else name
                 for name in re.findall(r"\b(\w+\.py)\b", line)}
    modules = {str(p.relative_to(REPO / "dapft")) for p in (REPO / "dapft").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert modules <= seen, sorted(modules - seen)
