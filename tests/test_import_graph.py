"""The package's import graph: data flows one way (STYLE.md, "Layout"), so no module imports a
later stage and no two modules import each other, directly or around a circle.

Read from the source with `ast` (every import, at module top or inside a function, and every
string that names a package module: lazy `__getattr__` maps, `importlib.import_module`), so the
test costs milliseconds and needs no import of the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dictlearn

ROOT = Path(dictlearn.__file__).resolve().parents[1]
#: stage -> layer; a module may import its own layer or lower ones. The order is the data flow:
#: harvest -> HDF5 -> dictionaries/training -> export -> evaluate -> interpret -> report, with the
#: main job (compare) composing all of them and the command line above everything.
LAYERS = {
    # recipes: YAML files and no code (compare reads recipes/short_run.yaml, the CLI every recipe)
    **dict.fromkeys(("errors", "io", "runtime", "lazy", "version", "recipes"), 0),
    **dict.fromkeys(("data", "models"), 1),
    **dict.fromkeys(("harvest", "dictionaries"), 2),
    **dict.fromkeys(("metrics", "export", "export_circuit", "downstream", "replacement"), 3),
    **dict.fromkeys(("training", "callbacks"), 4),
    "evaluate": 5,
    "interpret": 6,
    "analysis": 7,
    "compare": 8,
    **dict.fromkeys(("cli", "__init__", "__main__"), 9),
}
#: upward imports not yet removed, each with what would remove it (none left)
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """Every module of the installed package (analysis/ and recipes/ are mapped into it)."""
    found = {}
    for folder, package in ((ROOT / "dictlearn", "dictlearn"), (ROOT / "analysis", "dictlearn.analysis"),
                            (ROOT / "recipes", "dictlearn.recipes")):
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


#: a string naming a dictlearn module or one of its attributes ("dictlearn.compare.run",
#: "dictlearn.training.calibration.SparsityCalibration")
_DOTTED = re.compile(r"dictlearn(\.[A-Za-z_]\w*)+")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports (`from a import b` counts as a.b when that is a module),
    and those it names in a string: what `importlib.import_module` or a lazy `__getattr__` loads."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            targets = [node.value]  # a module named in a string: a lazy map, import_module, a class_path
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_module_belongs_to_a_stage():
    assert {_stage(m) for m in _graph()} <= set(LAYERS)


def test_no_module_imports_a_later_stage():
    upward = {(_package(a), _package(b)) for a, targets in _graph().items() for b in targets
              if LAYERS[_stage(b)] > LAYERS[_stage(a)]}
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ re-exporting its modules while they import siblings through it is not a circle
    circles = [c for c in circles if not any(m == _package(m) and c.count(m) for m in c[:-1])]
    assert not circles, [" -> ".join(c) for c in circles]
