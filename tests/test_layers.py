"""The package layers import one way, and project imports sit at the top of a module.

Floors, bottom to top: ``core`` (the contract, registry, records, file helpers); ``methods``
and ``datasets`` (each knows only ``core``); ``benchmark`` (config, data, training,
evaluation, the cell runner); ``reports``; ``app`` (command line, sweep callback, tuning).
A module may import its own package and any lower floor, never a higher floor or another
package on its own floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

FLOORS = {"core": 0, "methods": 1, "datasets": 1, "benchmark": 2, "reports": 3, "app": 4,
          "hydra_plugins.l2d_bench_sweeper": 4}
# (module, imported module) -> why the import waits until a function runs
IN_FUNCTION_ALLOWED = {
    ("app.launchers", "hydra_plugins.hydra_ray_launcher._config"):
        "the Ray launcher plugin is an optional install",
    ("app.interrupt", "core.records"):
        "Ctrl-C's handler is installed before any heavy import (core imports JAX); it reads the "
        "sweep's outcomes only once interrupted",
}


def package_of(module: str) -> str | None:
    for package in sorted(FLOORS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in FLOORS:
        folder = REPO_ROOT.joinpath(*package.split("."))
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` and `if __name__ == "__main__":` blocks are top level
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "__name__ == '__main__'"):
            top_level |= {id(child) for child in node.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) not in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.append((base, id(node) not in top_level))
    return found


def test_every_package_has_a_floor():
    top = {path.name for path in REPO_ROOT.iterdir()
           if path.is_dir() and (path / "__init__.py").is_file()}
    assert top <= {package.split(".")[0] for package in FLOORS} | {"tests"}


def test_layers_import_one_way():
    upward = []
    for module, path in project_modules().items():
        source = package_of(module)
        for imported, _ in imports_of(path, module):
            target = package_of(imported)
            if target is None or target == source:
                continue
            if FLOORS[target] >= FLOORS[source]:
                upward.append(f"{module} imports {imported} ({target} is not below {source})")
    assert not upward, "\n".join(upward)


def test_project_imports_are_at_the_top_of_modules():
    hidden = []
    for module, path in project_modules().items():
        for imported, in_function in imports_of(path, module):
            if in_function and package_of(imported) is not None or (
                    in_function and imported.startswith("hydra_plugins.")):
                if (module, imported) not in IN_FUNCTION_ALLOWED:
                    hidden.append(f"{module}: import of {imported} inside a function")
    assert not hidden, "\n".join(hidden)


def test_the_checks_see_an_upward_and_a_hidden_import(tmp_path):
    """The walk itself: a constructed module with both faults is caught."""
    path = tmp_path / "runner.py"
    path.write_text("from reports import build_report\n\ndef f():\n    from core import spec\n")
    found = imports_of(path, "benchmark.runner")
    assert ("reports", False) in found and ("core", True) in found
    assert FLOORS[package_of("reports")] > FLOORS[package_of("benchmark.runner")]
