"""The package's areas import each other in one direction: no circle, even through lazy imports in functions."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import dinokit

SRC = Path(dinokit.__file__).parent


def _area(module: str) -> str:
    """`dinokit.ssl.trainer` -> `ssl`; a name exported by the `dinokit` facade -> the area defining it."""
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in dinokit._EXPORTS:
        return _area(dinokit._EXPORTS[parts[1]])
    return parts[1] if len(parts) > 1 else "dinokit"


def _imported(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dinokit"):
            if node.module == "dinokit":
                yield from (f"dinokit.{alias.name}" for alias in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("dinokit."))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dinokit":
            yield f"dinokit.{node.attr}"  # `import dinokit; dinokit.load_model(...)`


def area_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts in (("__init__",), ("__main__",)):
            continue
        source = _area("dinokit." + ".".join(parts))
        for target in _imported(ast.parse(path.read_text())):
            if (area := _area(target)) not in (source, "dinokit", "__version__"):
                graph.setdefault(source, set()).add(area)
    return graph


def test_areas_import_each_other_without_a_cycle():
    graph = area_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle between areas: {' -> '.join(exc.args[1])}") from None
    assert {"checkpoints", "models", "hf", "auto", "loading", "eval", "ssl"} <= set(order)


def test_loading_stack_goes_layouts_then_models_then_auto_then_load_model():
    graph = area_graph()
    below = {"checkpoints": {"models", "hf", "auto", "loading"}, "models": {"auto", "loading"},
             "hf": {"auto", "loading"}, "auto": {"loading"}}
    for area, forbidden in below.items():
        assert not graph.get(area, set()) & forbidden, f"{area} imports {graph[area] & forbidden}"


def test_evaluation_does_not_import_training():
    assert "ssl" not in area_graph().get("eval", set())
