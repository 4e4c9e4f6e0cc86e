"""The benchmark tile task shared by every case: a 3x3 mean over a synthetic field.

The field is computed from pixel coordinates with a 1-pixel halo, so every tile is exact
at its seams whoever computes it, and results can be compared across executors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from zarr_orch.data.cars_dataset import fill_dataset


def field(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Smooth field plus hash noise on rows [r0, r1) x cols [c0, c1) (float32).

    Separable smooth part (two 1-D transcendental calls and an outer product) and a cheap
    uint32 hash, so computing a tile costs about what the baseline's task did (~500 MB/s
    serial) and the write path, not the compute, is what the cases compare.
    """
    rows = np.arange(r0, r1, dtype=np.uint32)
    cols = np.arange(c0, c1, dtype=np.uint32)
    smooth = np.multiply.outer(
        np.sin(rows.astype("float32") / np.float32(37.0)) * np.float32(100.0),
        np.cos(cols.astype("float32") / np.float32(53.0)),
    )
    noise = (rows[:, None] * np.uint32(73856093)) ^ (cols[None, :] * np.uint32(19349663))
    return smooth + (noise & np.uint32(1023)).astype("float32") * np.float32(1.0 / 1024.0)


def mean_tile(r0: int, r1: int, c0: int, c1: int, height: int, width: int) -> np.ndarray:
    """3x3 mean (edge-replicated at the raster border) of the field over one core window."""
    a0, a1, b0, b1 = max(r0 - 1, 0), min(r1 + 1, height), max(c0 - 1, 0), min(c1 + 1, width)
    data = field(a0, a1, b0, b1)
    data = np.pad(
        data, ((int(r0 == 0), int(r1 == height)), (int(c0 == 0), int(c1 == width))), mode="edge"
    )
    h, w = r1 - r0, c1 - c0
    acc = np.zeros((h, w), dtype="float32")
    for dr in range(3):
        for dc in range(3):
            acc += data[dr : dr + h, dc : dc + w]
    return acc / np.float32(9.0)


def orch_tile(window: dict, saving_info: dict, shape: tuple[int, int]) -> xr.Dataset:
    """zarr_orch task: the mean tile as a CARS-style xarray tile."""
    values = mean_tile(
        window["row_min"], window["row_max"], window["col_min"], window["col_max"], *shape
    )
    ds = xr.Dataset({"mean": (("row", "col"), values)})
    return fill_dataset(
        ds,
        saving_info=saving_info,
        window=window,
        overlaps={"up": 0, "down": 0, "left": 0, "right": 0},
    )


def block_tile(block: np.ndarray, block_info: dict | None = None, shape=None) -> np.ndarray:
    """dask map_blocks task: the same mean tile for the block's location."""
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return mean_tile(r0, r1, c0, c1, *shape)


def save_mean(orch: Any, file_name: str, size: int, tile: int) -> None:
    """Register the mean raster (one saved tag, CARS style) and run the breakpoint."""
    import zarr_orch
    from zarr_orch import CarsDataset
    from zarr_orch.data.tiling import window_array_to_dict

    ds = CarsDataset("arrays", name="mean")
    ds.tiling_grid = zarr_orch.generate_tiling_grid(0, 0, size, size, tile, tile)
    orch.add_to_save_lists(file_name, "mean", ds, dtype="float32", nodata=-9999)
    [info] = orch.get_saving_infos([ds])
    task = orch.cluster.create_task(orch_tile)
    rows, cols = ds.shape
    for r in range(rows):
        for c in range(cols):
            ds[r, c] = task(
                window_array_to_dict(ds.tiling_grid[r, c]),
                zarr_orch.update_saving_infos(info, row=r, col=c),
                (size, size),
            )
    orch.breakpoint()
