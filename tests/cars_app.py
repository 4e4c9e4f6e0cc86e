"""A CARS-style two-stage application, written the way CARS applications are.

Only the imports differ from CARS code. Task functions live at module level so every
execution mode (including spawn/forkserver workers) can import them.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

import zarr_orch as ocht
from zarr_orch import CarsDataset, fill_dataset
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict

PROFILE = {
    "height": 1000,
    "width": 1500,
    "count": 1,
    "crs": "EPSG:32631",
    "transform": (0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0),
}


def field(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A smooth deterministic field plus hash noise, computable from pixel coordinates."""
    r = rows[:, None].astype("float64")
    c = cols[None, :].astype("float64")
    noise = ((r * 73856093 + c * 19349663) % 1000) / 1000.0
    return (np.sin(r / 37.0) * np.cos(c / 53.0) * 100 + noise).astype("float32")


def stage1_tile(window, overlaps, saving_info, profile):
    """Stage 1: the field over the tile window plus its overlaps."""
    rows = np.arange(window["row_min"] - overlaps["up"], window["row_max"] + overlaps["down"])
    cols = np.arange(window["col_min"] - overlaps["left"], window["col_max"] + overlaps["right"])
    values = field(rows, cols)
    ds = xr.Dataset({"hgt": (("row", "col"), values)})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def mean3x3(padded: np.ndarray) -> np.ndarray:
    """3x3 mean of the interior of an array padded by one pixel on each side."""
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    acc = np.zeros((h, w), dtype="float64")
    for dr in range(3):
        for dc in range(3):
            acc += padded[dr : dr + h, dc : dc + w]
    return (acc / 9.0).astype("float32")


def stage2_tile(stage1, saving_info, profile):
    """Stage 2: 3x3 mean of stage 1 (edge-replicated at the raster border) and products."""
    ov = stage1.attrs["overlaps"]
    window = stage1.attrs["window"]
    data = stage1["hgt"].values
    pad = (
        (1 if ov["up"] == 0 else 0, 1 if ov["down"] == 0 else 0),
        (1 if ov["left"] == 0 else 0, 1 if ov["right"] == 0 else 0),
    )
    data = np.pad(data, pad, mode="edge")
    # crop to core + 1 pixel margin
    up = ov["up"] - 1 + pad[0][0]
    left = ov["left"] - 1 + pad[1][0]
    h = window["row_max"] - window["row_min"]
    w = window["col_max"] - window["col_min"]
    core_margin = data[up : up + h + 2, left : left + w + 2]
    mean = mean3x3(core_margin)
    mask = (mean > 0).astype("uint8")
    bands = np.stack([mean * 2, mean * -1]).astype("float32")
    ds = xr.Dataset(
        {
            "mean": (("row", "col"), mean),
            "mask": (("row", "col"), mask),
            "bands": (("band_im", "row", "col"), bands),
        }
    )
    fill_dataset(
        ds,
        saving_info=saving_info,
        window=window,
        profile=profile,
        overlaps={"up": 0, "down": 0, "left": 0, "right": 0},
    )
    return ds


def reference(height=1000, width=1500):
    """The expected stage-2 mean computed with numpy alone."""
    full = field(np.arange(height), np.arange(width))
    return mean3x3(np.pad(full, 1, mode="edge")), full


def run_pipeline(orchestrator, tile=(256, 384), overlap=2, size=(1000, 1500)):
    """Stage 1 saved + replaced, breakpoint, stage 2 saved. Returns the two CarsDatasets."""
    height, width = size
    profile = dict(PROFILE, height=height, width=width)
    stage1 = CarsDataset("arrays", name="stage1")
    stage1.create_grid(width, height, tile[0], tile[1], overlap, overlap)
    orchestrator.add_to_save_lists(
        "stage1.tif", "hgt", stage1, dtype="float32", nodata=-9999, cars_ds_name="stage1"
    )
    orchestrator.add_to_replace_lists(stage1, cars_ds_name="stage1")
    [saving_info] = orchestrator.get_saving_infos([stage1])
    task = orchestrator.cluster.create_task(stage1_tile)
    for row in range(stage1.shape[0]):
        for col in range(stage1.shape[1]):
            window = window_array_to_dict(stage1.tiling_grid[row, col])
            overlaps = overlap_array_to_dict(stage1.overlaps[row, col])
            stage1[row, col] = task(
                window, overlaps, ocht.update_saving_infos(saving_info, row=row, col=col), profile
            )
    orchestrator.breakpoint()

    stage2 = CarsDataset("arrays", name="stage2")
    stage2.create_empty_copy(stage1)
    stage2.overlaps = np.zeros_like(stage1.overlaps)
    orchestrator.add_to_save_lists(
        "stage2.tif", "mean", stage2, dtype="float32", nodata=-9999, cars_ds_name="stage2"
    )
    orchestrator.add_to_save_lists(
        "stage2.tif", "mask", stage2, dtype="uint8", nodata=255, cars_ds_name="stage2"
    )
    orchestrator.add_to_save_lists(
        "stage2.tif", "bands", stage2, dtype="float32", nodata=-9999, cars_ds_name="stage2"
    )
    [saving_info2] = orchestrator.get_saving_infos([stage2])
    task2 = orchestrator.cluster.create_task(stage2_tile)
    for row in range(stage2.shape[0]):
        for col in range(stage2.shape[1]):
            stage2[row, col] = task2(
                stage1[row, col], ocht.update_saving_infos(saving_info2, row=row, col=col), profile
            )
    orchestrator.breakpoint()
    return stage1, stage2
