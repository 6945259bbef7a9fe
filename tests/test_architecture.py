"""The structure docs/architecture.md describes: no import cycles, the layers import only downwards, and every
module is readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import ddcnn

PACKAGE = Path(ddcnn.__file__).parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ddcnn modules ``name`` imports when it is imported: its top-level imports, not those inside functions
    (lazy on purpose) or under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_there_is_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(GRAPH[module]):
            assert state.get(dependency) != "open", " -> ".join(stack[stack.index(dependency) :] + [dependency])
            if dependency not in state:
                visit(dependency, [*stack, dependency])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def _reaches(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dependency in GRAPH[todo.pop()] - seen:
            seen.add(dependency)
            todo.append(dependency)
    return seen


def test_the_layers_import_only_downwards():
    leaves = ("ddcnn.config", "ddcnn.errors", "ddcnn.runtime", "ddcnn.checkpoint", "ddcnn.decomposition")
    within_leaves = tuple(f"{leaf}." for leaf in leaves)  # a leaf package (config) and its own modules
    for leaf in leaves:
        assert {m for m in _reaches(leaf) if not m.startswith(within_leaves)} <= {"ddcnn", *leaves}, leaf
    above_models = ("ddcnn.train", "ddcnn.phases", "ddcnn.distributed", "ddcnn.methods")
    for module in (m for m in GRAPH if m.startswith("ddcnn.models")):
        assert not [m for m in _reaches(module) if m.startswith(above_models)], module
    for module in (m for m in GRAPH if m.startswith("ddcnn.train")):
        assert not [m for m in _reaches(module) if m.startswith(("ddcnn.phases", "ddcnn.methods"))], module
    assert not [m for m in _reaches("ddcnn.distributed") if m.startswith(("ddcnn.train", "ddcnn.phases"))]


def test_every_module_is_readable_in_one_sitting():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
