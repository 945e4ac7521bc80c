"""The package's import graph has no cycle, and no library module imports the command line.

Every import in a module counts, wherever it stands: ``import`` / ``from ... import`` at module
level, under ``if TYPE_CHECKING:`` (a cycle hidden from the interpreter is still one for the
reader), inside ``try`` blocks, and inside functions and methods (they run later, but the module
still depends on the one it imports: a check that skipped them let ``cli`` <-> ``commands``
through), plus ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
relative imports are resolved against the importing module's package. Importing ``a.b.c`` is
an edge to ``a.b.c`` only (not to the packages ``a`` and ``a.b`` that Python runs first).

The command line (``lightning_metric.cli`` and everything under it) builds on the library; a
library module that imported it, at any level, would tie the library to LightningCLI and
argparse and invite cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_metric"
CLI = "lightning_metric.cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.Module, package: str) -> list[tuple[str, list[str]]]:
    """``(base module, [imported names])`` of every import anywhere in ``tree``; names are
    empty for ``import x`` and for ``import_module("x")``."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((first.value, []))
    return found


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def module_imports(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (its ``source``) imports."""
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for base, names in _imported_names(ast.parse(source), package):
        if not names:
            targets.add(base)
        for alias in names:
            targets.add(f"{base}.{alias}" if f"{base}.{alias}" in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {
        name: module_imports(path.read_text(), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def _is_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


def cli_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"library module -> cli module"`` for every import of the command line from outside it."""
    return [
        f"{name} -> {target}"
        for name in sorted(graph)
        if not _is_cli(name)
        for target in sorted(graph[name])
        if _is_cli(target)
    ]


def test_the_module_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "lightning_metric.heads.base" in graph["lightning_metric.heads"]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_inside_functions_are_edges() -> None:
    graph = import_graph()
    # Imported only inside `run` (kept out of the console script's start-up).
    assert "lightning_metric.cli.benchmark.run" in graph["lightning_metric.cli.benchmark.command"]
    source = "def f():\n    if True:\n        from .knn import knn\n"
    modules = {"lightning_metric.retrieval.ranking", "lightning_metric.retrieval.knn"}
    found = module_imports(source, "lightning_metric.retrieval.ranking", False, modules)
    assert found == {"lightning_metric.retrieval.knn"}


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = import_graph()
    graph["lightning_metric.heads.streaming"].add("lightning_metric.heads.base")
    assert find_cycle(graph) is not None


def test_a_cycle_through_a_function_level_import_is_found() -> None:
    modules = {"lightning_metric.cli.lightning_cli", "lightning_metric.cli.commands"}
    graph = {
        "lightning_metric.cli.commands": module_imports(
            "from lightning_metric.cli.lightning_cli import main\n",
            "lightning_metric.cli.commands", False, modules,
        ),
        "lightning_metric.cli.lightning_cli": module_imports(
            "def main():\n    from lightning_metric.cli.commands import run_command\n",
            "lightning_metric.cli.lightning_cli", False, modules,
        ),
    }  # fmt: skip
    assert find_cycle(graph) is not None


def test_no_library_module_imports_the_command_line() -> None:
    graph = import_graph()
    assert any(_is_cli(name) for name in graph)  # the cli package is in the graph
    assert cli_imports(graph) == []


def test_the_cli_check_catches_planted_imports() -> None:
    graph = import_graph()
    modules = set(graph)
    planted = {
        # at module level, absolute
        "lightning_metric.retrieval.knn": "from lightning_metric.cli import main\n",
        # inside a method, relative, of a name that is a module
        "lightning_metric.callbacks.recall": (
            "class C:\n    def f(self):\n        from ..cli import console\n"
        ),
        # a literal name given to import_module inside a function
        "lightning_metric.module": (
            "import importlib\n"
            "def f():\n    return importlib.import_module('lightning_metric.cli.search')\n"
        ),
    }
    for name, source in planted.items():
        graph[name] = module_imports(source, name, False, modules)
    assert cli_imports(graph) == [
        "lightning_metric.callbacks.recall -> lightning_metric.cli.console",
        "lightning_metric.module -> lightning_metric.cli.search",
        "lightning_metric.retrieval.knn -> lightning_metric.cli",
    ]
