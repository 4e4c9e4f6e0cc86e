"""The cluster layer's modules import each other one way and never import a private name.

Parses the source (imports inside functions and TYPE_CHECKING blocks included), so a cycle
or a reach into another module's `_name` fails here before a reader has to find it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zarr_orch.cluster

CLUSTER_DIR = Path(zarr_orch.cluster.__file__).parent
PACKAGE = "zarr_orch.cluster.multiprocessing"
#: inside the multiprocessing package, a module may import only modules of a lower rank
MP_RANKS = {"scatter": 0, "worker": 1, "planner": 1, "pool": 2, "cluster": 3, "__init__": 4}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CLUSTER_DIR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every absolute import in `path`, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
    return found


def test_the_multiprocessing_package_imports_downward_only():
    """cluster -> pool -> worker -> scatter, the planner beside the worker: no cycle."""
    modules = sorted((CLUSTER_DIR / "multiprocessing").glob("*.py"))
    assert {path.stem for path in modules} == set(MP_RANKS)
    wrong = []
    for path in modules:
        for line, module, names in _imports(path):
            targets = [module] + [f"{module}.{name}" for name in names]
            for target in targets:
                prefix = PACKAGE + "."
                if not target.startswith(prefix) or target.count(".") != PACKAGE.count(".") + 1:
                    continue
                stem = target.removeprefix(prefix)
                if stem in MP_RANKS and MP_RANKS[stem] >= MP_RANKS[path.stem]:
                    wrong.append(f"{path.name}:{line} imports {stem}")
    assert wrong == []


def test_no_cluster_module_imports_a_private_name():
    """Helpers shared between modules have public names; `_name`s stay in their module."""
    wrong = []
    for path in sorted(CLUSTER_DIR.rglob("*.py")):
        for line, module, names in _imports(path):
            if not module.startswith("zarr_orch"):
                continue
            private = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if private or any(part.startswith("_") for part in module.split(".")[1:]):
                wrong.append(f"{_module_name(path)}:{line} from {module} import {names}")
    assert wrong == []
