"""The package's imports follow its layers: no cycles, nothing upward, no private names.

Every module of ``zarr_orch`` is parsed with `ast` (never imported), and every import is
read, including those inside functions and ``TYPE_CHECKING`` blocks. `LAYERS` below is the
order, lowest first; a module may import its own layer and the layers below it, except
that sibling layers of one rank (the storage writers and readers) never import each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zarr_orch"

#: (rank, layer name, module prefixes), lowest rank first. A module belongs to the layer of
#: its longest matching prefix; a top-level module or package no prefix names belongs to the
#: orchestrator layer (new breakpoint steps, run helpers ...). Same rank = siblings.
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    # base: errors, constants, shell commands, secret masking and the lazy package __init__
    # (which imports nothing of its own at import time); depends on nothing of zarr_orch
    (
        0,
        "base",
        (
            "zarr_orch",
            "zarr_orch.errors",
            "zarr_orch.constants",
            "zarr_orch.commands",
            "zarr_orch.secrets",
        ),
    ),
    # data model: CarsDataset, tiling grids, documents (what CARS applications hand over)
    (1, "data", ("zarr_orch.data",)),
    # storage core: locations, retrying stores, low-level Zarr I/O, store handles, leases,
    # run directories
    (2, "storage.core", ("zarr_orch.storage.core",)),
    # product format: plans and tags, layout and arrays, completion records, encoding,
    # coordinates, tile descriptions, consolidated metadata, the merge journal
    (3, "storage.format", ("zarr_orch.storage.format",)),
    # writers (chunks, arrays, points, windows, GeoTIFF) and readers (lazy tiles, windows,
    # points, verify) side by side: neither imports the other
    (4, "storage.writers", ("zarr_orch.storage.writers",)),
    (4, "storage.readers", ("zarr_orch.storage.readers",)),
    # clusters: sequential, multiprocessing (module or package), dask; run task graphs
    (5, "cluster", ("zarr_orch.cluster",)),
    # registries: what is saved where, fingerprints, tile sinks and receipts
    (6, "registry", ("zarr_orch.registry",)),
    # orchestrator level: the CARS-facing facade and what it drives (conf, CARS 1.3
    # compatibility, breakpoint steps, GeoTIFF outputs, progress, interrupts, run log)
    (
        7,
        "orchestrator",
        (
            "zarr_orch.orchestrator",
            "zarr_orch.conf",
            "zarr_orch.cars_compat",
            "zarr_orch.geotiff_outputs",
            "zarr_orch.progress",
            "zarr_orch.interrupts",
            "zarr_orch.runlog",
        ),
    ),
    # user-facing: reading products back, status, quick looks, the command line, the demo
    (
        8,
        "user-facing",
        (
            "zarr_orch.reading",
            "zarr_orch.status",
            "zarr_orch.quicklook",
            "zarr_orch.cli",
            "zarr_orch.demo",
            "zarr_orch.__main__",
        ),
    ),
)
DEFAULT_TOP_LEVEL = "orchestrator"

#: the only name modules may import from the package itself (everything else from the
#: module that defines it, so the lazy re-exports of ``zarr_orch/__init__`` never hide an edge)
PACKAGE_NAMES = frozenset({"__version__"})


@dataclass(frozen=True)
class Edge:
    """One import of a zarr_orch module by another, where it is written."""

    source: str
    target: str
    line: int
    names: tuple[str, ...] = ()

    def where(self) -> str:
        return f"{self.source} line {self.line}"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(source: str, node: ast.ImportFrom) -> str:
    """The module an ``from ... import`` names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = source.split(".") if _is_package(source) else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _edges(source: str) -> Iterator[Edge]:
    """Imports of zarr_orch modules by `source`: ``from pkg import submodule`` is an edge to
    the submodule; importing a module does not count its parent packages' ``__init__``."""
    tree = ast.parse(MODULES[source].read_text(), str(MODULES[source]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "zarr_orch":
                    yield Edge(source, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(source, node)
            if module.split(".")[0] != "zarr_orch":
                continue
            names = []
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    yield Edge(source, f"{module}.{alias.name}", node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Edge(source, module, node.lineno, tuple(names))


EDGES = [edge for module in MODULES for edge in _edges(module)]


def layer_of(module: str) -> tuple[int, str]:
    """(rank, layer name) of `module` by its longest matching prefix in `LAYERS`."""
    best: tuple[int, int, str] | None = None
    for rank, name, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if prefix == "zarr_orch" and module != "zarr_orch":
                    continue  # the package itself, not everything under it
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank, name)
    if best is not None:
        return best[1], best[2]
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] not in ("storage", "data", "cluster", "registry"):
        rank = next(r for r, n, _ in LAYERS if n == DEFAULT_TOP_LEVEL)
        return rank, DEFAULT_TOP_LEVEL
    raise AssertionError(f"{module} is in no layer: add its prefix to LAYERS in {__file__}")


def test_every_module_has_a_layer_and_a_docstring() -> None:
    """Each module is in a layer and opens with a docstring saying its job."""
    assert len(MODULES) > 40  # the walk found the package
    missing = []
    for module, path in MODULES.items():
        layer_of(module)
        if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None:
            missing.append(module)
    assert not missing, f"modules without a docstring: {missing}"


def test_no_import_cycles() -> None:
    """No chain of imports (at any depth, function-level ones included) leads back."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for edge in EDGES:
        if edge.target in graph and edge.target != edge.source:
            graph[edge.source].add(edge.target)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_upward_or_sideways_imports() -> None:
    """A module imports only its own layer and lower ones; sibling layers never each other."""
    bad = []
    for edge in EDGES:
        if edge.target not in MODULES:
            bad.append(f"{edge.where()}: {edge.target} is not a module of the package")
            continue
        (rank, layer), (target_rank, target_layer) = layer_of(edge.source), layer_of(edge.target)
        if target_rank > rank or (target_rank == rank and target_layer != layer):
            bad.append(f"{edge.where()}: {layer} imports {edge.target} ({target_layer})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_package_reexports_are_not_imported_inside_the_package() -> None:
    """``from zarr_orch import X`` inside the package: only submodules and ``__version__``."""
    bad = [
        f"{edge.where()}: from zarr_orch import {', '.join(edge.names)}"
        for edge in EDGES
        if edge.target == "zarr_orch" and set(edge.names) - PACKAGE_NAMES
    ]
    assert not bad, "import these from their defining module:\n" + "\n".join(bad)


def _private_uses(source: str) -> Iterator[str]:
    """Private names of other modules `source` imports or reaches through a module alias."""
    tree = ast.parse(MODULES[source].read_text())
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zarr_orch") and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(source, node)
            if not module.startswith("zarr_orch"):
                continue
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{source} line {node.lineno}: from {module} import {alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{source} line {node.lineno}: {aliases[node.value.id]}.{node.attr}"


@pytest.mark.parametrize("source", sorted(MODULES))
def test_no_private_names_of_other_modules(source: str) -> None:
    """No module uses another module's ``_private`` name: it gets a public name or moves."""
    bad = list(_private_uses(source))
    assert not bad, "\n".join(bad)


def test_layer_order_is_the_documented_one() -> None:
    """The layers table of docs/architecture.md lists the layers in this order."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    positions = [text.find(f"| {name} |") for _, name, _ in LAYERS]
    missing = [name for (_, name, _), pos in zip(LAYERS, positions, strict=True) if pos < 0]
    assert not missing, f"layers missing from the table of docs/architecture.md: {missing}"
    assert positions == sorted(positions)
