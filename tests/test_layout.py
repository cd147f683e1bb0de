"""The package layout is a layered architecture: no import cycles, and ``framework`` never imports ``plugins``.

The import graph is read from the source (every ``import``/``from`` naming a project module, at module level or
inside a function, since a deferred import still ties the two modules together); then every module is imported in a
fresh interpreter, dependencies first, so a module that only imports because something else was imported before it
fails here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("framework", "plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    # A package's __init__ is imported before any of its modules: the edge parent -> child is implicit, not a cycle.
    return {name: {m for m in imported_modules(path, known) if not name.startswith(m + ".") and m != name}
            for name, path in modules.items()}


def test_there_is_no_import_cycle():
    try:
        list(TopologicalSorter(import_graph()).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_framework_never_imports_plugins():
    offenders = {name: sorted(m for m in deps if m.startswith("plugins"))
                 for name, deps in import_graph().items() if name.startswith("framework")}
    assert not {k: v for k, v in offenders.items() if v}, "framework must reach plugins only through the registry"


def test_every_module_imports_on_its_own_in_dependency_order():
    order = [m for m in TopologicalSorter(import_graph()).static_order()]
    # One interpreter per module would take minutes; a fresh interpreter imports them in dependency order and
    # reports the first module that fails, so a hidden ordering dependence shows up as an ImportError here.
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *order], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
