"""The demo pipeline: a small CARS-like job on generated data, end to end.

Stage 1 builds a synthetic terrain per tile (with a 1-pixel overlap), is saved and kept
in memory; after a breakpoint, stage 2 derives slope, hillshade and a land-cover class per
tile from stage 1's tiles. Everything is written to Zarr products under `out_dir`. Task
functions are module-level so every execution mode can import them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.data.cars_dataset import CarsDataset, fill_dataset
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.orchestrator import Orchestrator, update_saving_infos

logger = logging.getLogger(__name__)

PIXEL_SIZE = 10.0
ORIGIN = (600000.0, 4800000.0)


@dataclass
class DemoResult:
    """Where the demo wrote its products and how big they are."""

    out_dir: str
    products: dict[str, str]
    size: int
    tile: int
    tiles: int
    #: tiles this run computed, and tiles it found done by an earlier run (both stages)
    computed: int = 0
    resumed: int = 0


def terrain(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Synthetic elevation (m) at integer pixel coordinates: ridges, valleys and fine noise."""
    r = rows[:, None].astype("float64")
    c = cols[None, :].astype("float64")
    relief = (
        400 * np.sin(r / 310.0) * np.cos(c / 270.0)
        + 120 * np.sin((r + c) / 97.0)
        + 35 * np.cos((r - 2 * c) / 41.0)
    )
    noise = ((r * 73856093 + c * 19349663) % 997) / 997.0 * 4.0
    return (relief + noise + 800).astype("float32")


def terrain_tile(window: dict, overlaps: dict, saving_info: dict, profile: dict) -> xr.Dataset:
    """Stage 1 task: elevation over the tile window plus its overlaps."""
    rows = np.arange(
        window[cst.ROW_MIN] - overlaps[cst.UP], window[cst.ROW_MAX] + overlaps[cst.DOWN]
    )
    cols = np.arange(
        window[cst.COL_MIN] - overlaps[cst.LEFT], window[cst.COL_MAX] + overlaps[cst.RIGHT]
    )
    dem = terrain(rows, cols)
    tile = xr.Dataset({"dem": ((cst.ROW, cst.COL), dem)})
    return fill_dataset(
        tile, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps
    )


def derived_tile(dem_tile: xr.Dataset, saving_info: dict, profile: dict) -> xr.Dataset:
    """Stage 2 task: slope (deg), hillshade (0-254) and classes from one stage-1 tile."""
    ov = dem_tile.attrs[cst.OVERLAPS]
    window = dem_tile.attrs[cst.WINDOW]
    pad = (
        (int(ov[cst.UP] == 0), int(ov[cst.DOWN] == 0)),
        (int(ov[cst.LEFT] == 0), int(ov[cst.RIGHT] == 0)),
    )
    dem = np.pad(dem_tile["dem"].values.astype("float64"), pad, mode="edge")
    up = ov[cst.UP] - 1 + pad[0][0]
    left = ov[cst.LEFT] - 1 + pad[1][0]
    height = window[cst.ROW_MAX] - window[cst.ROW_MIN]
    width = window[cst.COL_MAX] - window[cst.COL_MIN]
    z = dem[up : up + height + 2, left : left + width + 2]
    dz_dx = (z[1:-1, 2:] - z[1:-1, :-2]) / (2 * PIXEL_SIZE)
    dz_dy = (z[2:, 1:-1] - z[:-2, 1:-1]) / (2 * PIXEL_SIZE)
    slope = np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))
    azimuth, altitude = np.radians(315.0), np.radians(45.0)
    aspect = np.arctan2(dz_dy, -dz_dx)
    shade = np.sin(altitude) * np.cos(np.radians(slope)) + np.cos(altitude) * np.sin(
        np.radians(slope)
    ) * np.cos(azimuth - aspect)
    hillshade = np.clip(shade * 254, 0, 254)
    core = z[1:-1, 1:-1]
    classes = np.select([core < 500, slope > 25, core > 1100], [1, 3, 4], default=2)
    tile = xr.Dataset(
        {
            "slope": ((cst.ROW, cst.COL), slope.astype("float32")),
            "hillshade": ((cst.ROW, cst.COL), hillshade),
            "classes": ((cst.ROW, cst.COL), classes.astype("uint8")),
        }
    )
    no_overlaps = {cst.UP: 0, cst.DOWN: 0, cst.LEFT: 0, cst.RIGHT: 0}
    return fill_dataset(
        tile, saving_info=saving_info, window=window, profile=profile, overlaps=no_overlaps
    )


def demo_profile(size: int) -> dict[str, Any]:
    """A rasterio-style profile for the demo raster (UTM 31N, 10 m pixels)."""
    return {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 1,
        "crs": "EPSG:32631",
        "transform": (PIXEL_SIZE, 0.0, ORIGIN[0], 0.0, -PIXEL_SIZE, ORIGIN[1]),
    }


def build_stage1(orchestrator: Orchestrator, size: int, tile: int) -> CarsDataset:
    """Register stage 1 (saved to terrain.zarr and replaced) and create its tasks."""
    dem = CarsDataset("arrays", name="terrain")
    dem.create_grid(size, size, tile, tile, 1, 1)
    orchestrator.add_to_save_lists(
        "terrain.tif", "dem", dem, dtype="float32", nodata=-9999, cars_ds_name="terrain"
    )
    orchestrator.add_to_replace_lists(dem, cars_ds_name="terrain")
    [saving_info] = orchestrator.get_saving_infos([dem])
    profile = demo_profile(size)
    task = orchestrator.cluster.create_task(terrain_tile)
    rows, cols = dem.shape
    for row in range(rows):
        for col in range(cols):
            dem[row, col] = task(
                window_array_to_dict(dem.tiling_grid[row, col]),
                overlap_array_to_dict(dem.overlaps[row, col]),
                update_saving_infos(saving_info, row=row, col=col),
                profile,
            )
    return dem


def build_stage2(orchestrator: Orchestrator, dem: CarsDataset, size: int) -> CarsDataset:
    """Register stage 2 (three tags into products.zarr), consuming stage 1's tiles.

    A GeoTIFF holds one tag, so the three-tag product is registered by its Zarr name; stage
    1's ``terrain.tif`` is also written as a GeoTIFF, as CARS pipelines expect.
    """
    derived = CarsDataset("arrays", name="derived")
    derived.create_empty_copy(dem)
    derived.overlaps = np.zeros_like(dem.overlaps)
    for tag, dtype, nodata in (
        ("slope", "float32", -9999),
        ("hillshade", "uint8", 255),
        ("classes", "uint8", 0),
    ):
        orchestrator.add_to_save_lists(
            "products.zarr", tag, derived, dtype=dtype, nodata=nodata, cars_ds_name="derived"
        )
    [saving_info] = orchestrator.get_saving_infos([derived])
    profile = demo_profile(size)
    task = orchestrator.cluster.create_task(derived_tile)
    rows, cols = derived.shape
    for row in range(rows):
        for col in range(cols):
            derived[row, col] = task(
                dem[row, col], update_saving_infos(saving_info, row=row, col=col), profile
            )
    return derived


def run_demo(
    out_dir: str = "zarr_orch_demo_out",
    conf: dict[str, Any] | None = None,
    size: int = 2048,
    tile: int = 512,
) -> DemoResult:
    """Run the two-stage demo into `out_dir` (a path or fsspec URL) and say where it wrote."""
    if size < 8 or tile < 4:
        raise ValueError("size must be >= 8 and tile >= 4")
    with Orchestrator(conf, out_dir=out_dir) as orchestrator:
        dem = build_stage1(orchestrator, size, tile)
        orchestrator.breakpoint()
        build_stage2(orchestrator, dem, size)
        orchestrator.breakpoint()
        orchestrator.update_out_info({"demo": {"size": size, "tile": tile}})
        products = dict(orchestrator.products)
        location = orchestrator.out_dir
    stats = orchestrator.stats
    return DemoResult(
        location,
        products,
        size,
        tile,
        dem.shape[0] * dem.shape[1],
        computed=stats["tiles"],
        resumed=stats["resumed"],
    )
