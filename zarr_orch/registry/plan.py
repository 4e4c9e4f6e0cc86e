"""Turn saver registrations into product plans (main process, once per breakpoint).

This is where grids are checked against the chunk layout — a misaligned grid is refused
before any task starts — and where CARS file names (``dsm.tif``) become Zarr products.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import re
from typing import Any

import numpy as np

from zarr_orch import __version__
from zarr_orch import constants as cst
from zarr_orch.data.tiling import grid_extent, regular_chunk_shape
from zarr_orch.errors import ConfigurationError, MisalignedGridError
from zarr_orch.registry.registries import SaveEntry, TrackedDataset
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format.product import (
    ALL_VARIABLES,
    FORMAT_NAME,
    FORMAT_VERSION,
    ProductPlan,
    TagSpec,
    now_iso,
)
from zarr_orch.storage.writers.window_writer import WINDOW_CHUNK

logger = logging.getLogger(__name__)

#: extensions of CARS's file formats that are replaced by ``.zarr``
REPLACED_SUFFIXES = (
    ".tif",
    ".tiff",
    ".jp2",
    ".vrt",
    ".img",
    ".png",
    ".csv",
    ".laz",
    ".las",
    ".nc",
    ".h5",
)


def product_location(file_name: str, out_dir: Location) -> Location:
    """Where `file_name` is stored: under `out_dir` when relative, always ending in ``.zarr``."""
    location = Location.parse(file_name, base=out_dir)
    name = location.name
    lowered = name.lower()
    if lowered.endswith(".zarr"):
        return location
    stem = name
    for suffix in REPLACED_SUFFIXES:
        if lowered.endswith(suffix):
            stem = name[: -len(suffix)]
            break
    if not stem:
        raise ConfigurationError(f"file name {file_name!r} has no name before its extension")
    if location.is_local:
        import os

        return Location(
            os.path.join(os.path.dirname(location.url), stem + ".zarr"), {}, location.settings
        )
    return Location(
        posixpath.join(posixpath.dirname(location.url), stem + ".zarr"),
        location.storage_options,
        location.settings,
    )


def build_plans(
    tracked: TrackedDataset,
    entries: list[SaveEntry],
    out_dir: Location,
    codec: str = "zstd",
    describe_tiles: bool = False,
) -> list[ProductPlan]:
    """One ProductPlan per product the dataset saves into (entries grouped by file name)."""
    cars_ds = tracked.cars_ds
    grid = np.asarray(cars_ds.tiling_grid)
    windowed = is_windowed(cars_ds)
    if windowed:
        # tiles carry their own windows (CARS's rasterization, dsm_merging): merged by the
        # main process into arrays with their own chunk grid (window_writer); the grid is
        # a placeholder, the tiles' profile gives the raster size
        chunks, extent = (WINDOW_CHUNK, WINDOW_CHUNK), _windowed_extent(grid)
    elif cars_ds.dataset_type == cst.CARS_DS_TYPE_ARRAY:
        chunks = regular_chunk_shape(grid)
        extent = grid_extent(grid)
    else:
        chunks, extent = (1, 1), (int(grid.shape[0]), int(grid.shape[1]))
    by_file: dict[str, list[SaveEntry]] = {}
    for entry in entries:
        by_file.setdefault(entry.file_name, []).append(entry)
    plans = []
    for file_name, group in by_file.items():
        tags = tuple(TagSpec(e.tag, e.dtype, e.nodata, e.optional) for e in group)
        plans.append(
            ProductPlan(
                location=product_location(file_name, out_dir),
                kind=cars_ds.dataset_type,
                dataset_name=tracked.name,
                tags=tags,
                chunks=(int(chunks[0]), int(chunks[1])),
                extent=(int(extent[0]), int(extent[1])),
                grid_shape=(int(grid.shape[0]), int(grid.shape[1])),
                save_by_pair=any(e.by_pair for e in group),
                codec=codec,
                describe_tiles=describe_tiles
                and cars_ds.dataset_type == cst.CARS_DS_TYPE_ARRAY
                and not windowed,
                windowed=windowed,
            )
        )
    return plans


def is_windowed(cars_ds: Any) -> bool:
    """Whether an arrays dataset takes the windowed single-writer path: it has a
    ``final_function`` (merges each tile with what is on disk, as CARS's rasterization does),
    or its tiling grid is no chunk grid (terrain metres, irregular tiles: dsm_merging).

    Other arrays datasets take the grid-aligned path: each tile is one chunk, written by the
    worker that computed it; a tile found there with a window of its own makes its dataset
    windowed at run time (`zarr_orch.breakpoint.layouts`).
    """
    if cars_ds.dataset_type != cst.CARS_DS_TYPE_ARRAY:
        return False
    if cars_ds.final_function is not None:
        return True
    try:
        regular_chunk_shape(np.asarray(cars_ds.tiling_grid))
    except MisalignedGridError as exc:
        name = getattr(cars_ds, "name", None) or "a dataset"
        logger.info("%s: %s; its tiles are merged by the main process", name, exc)
        return True
    return False


def as_windowed(plan: ProductPlan) -> ProductPlan:
    """The windowed version of a grid product's plan (same location, tags and records)."""
    return dataclasses.replace(plan, windowed=True, describe_tiles=False)


def _windowed_extent(grid: np.ndarray) -> tuple[int, int]:
    """Raster size when tiles carry no profile height/width: the grid's maxima (CARS)."""
    if grid.size == 0:
        return 0, 0
    return int(grid[..., 1].max()), int(grid[..., 3].max())


def intermediate_plan(
    tracked: TrackedDataset, out_dir: Location, codec: str = "zstd"
) -> ProductPlan | None:
    """The plan of `out_dir/intermediate/<name>.zarr` for a replaced-only arrays dataset."""
    cars_ds = tracked.cars_ds
    if cars_ds.dataset_type != cst.CARS_DS_TYPE_ARRAY:
        return None
    if is_windowed(cars_ds):
        logger.info(
            "%s merges tiles in the main process (final_function, or no chunk grid): no "
            "intermediate product",
            tracked.name,
        )
        return None
    grid = np.asarray(cars_ds.tiling_grid)
    chunks = regular_chunk_shape(grid)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tracked.name).strip("._") or f"dataset_{tracked.key}"
    extent = grid_extent(grid)
    return ProductPlan(
        location=out_dir.join("intermediate", f"{safe}.zarr"),
        kind=cars_ds.dataset_type,
        dataset_name=tracked.name,
        tags=(ALL_VARIABLES,),
        chunks=(int(chunks[0]), int(chunks[1])),
        extent=(int(extent[0]), int(extent[1])),
        grid_shape=(int(grid.shape[0]), int(grid.shape[1])),
        codec=codec,
        describe_tiles=True,
    )


def product_attributes(plan: ProductPlan, cars_ds: Any, file_name: str) -> dict[str, Any]:
    """The group attributes that describe a product (JSON-safe)."""
    overlaps = np.asarray(cars_ds.overlaps) if cars_ds.overlaps is not None else None
    return {
        "zarr_orch": {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "kind": plan.kind,
            "dataset": plan.dataset_name,
            "file_name": file_name,
            "tags": {
                t.name: {
                    "dtype": str(np.dtype(t.dtype)) if t.dtype else "as computed",
                    "nodata": t.nodata,
                    "optional": t.optional,
                }
                for t in plan.tags
            },
            "records": [plan.records],
            "tile_size": list(plan.chunks),
            "windowed": plan.windowed,
            "tile_grid_shape": list(plan.grid_shape),
            "extent": list(plan.extent),
            # pixel (row, col) of tile (0, 0): tile (r, c) is chunk (r + row // tile height,
            # c + col // tile width) of each tag (zarr_orch.storage.readers.verify reads it)
            "grid_origin": _grid_origin(plan, cars_ds),
            "max_overlaps": [int(v) for v in overlaps.max(axis=(0, 1))]
            if overlaps is not None and overlaps.size
            else [0, 0, 0, 0],
            "created": now_iso(),
        }
    }


def _grid_origin(plan: ProductPlan, cars_ds: Any) -> list[int]:
    """Pixel (row_min, col_min) of tile (0, 0) of an arrays dataset ([0, 0] otherwise)."""
    if plan.kind != cst.CARS_DS_TYPE_ARRAY or plan.windowed:
        return [0, 0]
    grid = np.asarray(cars_ds.tiling_grid)
    return [int(grid[0, 0, 0]), int(grid[0, 0, 2])]
