"""Tasks of windowed datasets (tiles carrying their own overlapping windows) and a pipeline.

The pattern is CARS's rasterization: a 1xN placeholder tiling grid, each task computes its
own window, neighbouring windows overlap, and the dataset's final_function merges each tile
with what is already on disk (a weighted mean, a sum, a boolean or). Run as a script it is
the subprocess the windowed kill tests SIGKILL (its tags split over three products):

    python tests/windowed_tasks.py OUT [--mode M] [--tiles N] [--sleep S] [--commit-seconds S]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import xarray as xr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zarr_orch as ocht
from zarr_orch import CarsDataset, fill_dataset
from zarr_orch.data.tiling import generate_tiling_grid

HEIGHT, WIDTH = 96, 128
TILE_H, TILE_W = 40, 50
TAGS = {"val": ("float32", -9999.0), "weight": ("float32", 0.0), "count": ("uint16", 0)}
TAGS["seen"] = ("uint8", 255)
#: the products of the split layout (other tags stay in merged.tif)
SPLIT_FILES = {"weight": "weights.tif", "seen": "seen.tif"}


def profile(height: int = HEIGHT, width: int = WIDTH, block: int = 32) -> dict[str, Any]:
    """A rasterio-like profile with a block size (the windowed product's chunk grid)."""
    return {
        "crs": "EPSG:32631",
        "transform": (0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0),
        "height": height,
        "width": width,
        "count": 1,
        "tiled": True,
        "blockysize": block,
        "blockxsize": block,
    }


def window_of(index: int, height: int = HEIGHT, width: int = WIDTH) -> dict[str, int]:
    """Tile `index`'s own window: overlapping its neighbours', inside the raster."""
    r0 = (index * 13) % (height - TILE_H + 1)
    c0 = (index * 29) % (width - TILE_W + 1)
    return {"row_min": r0, "row_max": r0 + TILE_H, "col_min": c0, "col_max": c0 + TILE_W}


def windowed_tile(
    index: int, saving_info: dict, prof: dict, sleep: float = 0.0, window: Any = "own"
) -> xr.Dataset:
    """A tile of values, weights, counts and flags over its own window (float noise)."""
    time.sleep(sleep)
    win = window_of(index, prof["height"], prof["width"]) if window == "own" else window
    if win is None:
        rows, cols = np.arange(prof["height"]), np.arange(prof["width"])
    else:
        rows = np.arange(win["row_min"], win["row_max"])
        cols = np.arange(win["col_min"], win["col_max"])
    r, c = rows[:, None].astype("float64"), cols[None, :].astype("float64")
    noise = np.sin(r * 0.37 + index) * np.cos(c * 0.23 - index)
    val = (noise * 100 + index / 3.0).astype("float32")
    val[(rows[:, None] + cols[None, :] + index) % 17 == 0] = np.nan  # holes
    weight = (1.0 + np.abs(noise) + index / 7.0).astype("float32")
    ds = xr.Dataset(
        {
            "val": (("row", "col"), val),
            "weight": (("row", "col"), weight),
            "count": (("row", "col"), np.ones(val.shape, dtype="uint16")),
            "seen": (("row", "col"), (noise > 0).astype("uint8")),
        }
    )
    return fill_dataset(ds, saving_info=saving_info, window=win, profile=prof)


def merge_final(orchestrator: Any, tile: xr.Dataset) -> xr.Dataset:
    """Merge the tile with what is on disk: weighted mean, sums, boolean or (CARS-style)."""
    old_weight, _ = orchestrator.get_data("weight", tile)
    if old_weight is None:
        return tile
    old_val, val_nodata = orchestrator.get_data("val", tile)
    old_count, _ = orchestrator.get_data("count", tile)
    old_seen, seen_nodata = orchestrator.get_data("seen", tile)
    weight = tile["weight"].values.astype("float64")
    val = tile["val"].values.astype("float64")
    old_ok = (old_weight != 0) & (old_val != val_nodata) & ~np.isnan(old_val)
    new_ok = ~np.isnan(val)
    total = np.where(old_ok, old_weight, 0) + np.where(new_ok, weight, 0)
    mean = np.where(old_ok, old_val * old_weight, 0) + np.where(new_ok, val * weight, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.where(total > 0, mean / total, np.nan)
    tile["val"].values = merged.astype("float32")
    tile["weight"].values = (old_weight.astype("float64") + weight).astype("float32")
    tile["count"].values = old_count + tile["count"].values
    seen = np.where(old_seen == seen_nodata, 0, old_seen)
    tile["seen"].values = np.logical_or(seen, tile["seen"].values).astype("uint8")
    return tile


def failing_final(orchestrator: Any, tile: xr.Dataset) -> xr.Dataset:
    """A final_function that raises on tile col 3 (bad-input tests)."""
    if tile.attrs["saving_info"]["cars_ds_col"] == 3:
        raise ValueError("merge of this tile is broken")
    return merge_final(orchestrator, tile)


def windowed_dataset(
    orchestrator: Any,
    tiles: int,
    final: Any = merge_final,
    prof: dict | None = None,
    sleep: float = 0.0,
    file_name: str = "merged.tif",
    window: Any = "own",
    split: bool = False,
) -> CarsDataset:
    """Register and schedule a rasterization-like dataset of `tiles` overlapping tiles.

    With `split`, tags go to several products as in CARS (``weight`` to weights.tif,
    ``seen`` to seen.tif): the merge of ``val`` reads the weights of another product.
    """
    prof = prof or profile()
    cds = CarsDataset("arrays", name="merged")
    cds.tiling_grid = generate_tiling_grid(0, 0, 1, tiles, 1, 1)
    cds.final_function = final
    for tag, (dtype, nodata) in TAGS.items():
        name = SPLIT_FILES.get(tag, file_name) if split else file_name
        orchestrator.add_to_save_lists(name, tag, cds, dtype=dtype, nodata=nodata)
    [info] = orchestrator.get_saving_infos([cds])
    for index in range(tiles):
        cds[0, index] = orchestrator.cluster.create_task(windowed_tile)(
            index, ocht.update_saving_infos(info, row=0, col=index), prof, sleep, window
        )
    return cds


def main(argv: list[str] | None = None) -> None:
    """Run the merge stage to completion (the kill tests SIGKILL it somewhere inside)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", default="multiprocessing")
    parser.add_argument("--tiles", type=int, default=60)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--commit-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    conf = {"mode": args.mode, "progress": False, "max_retries": 0}
    if args.commit_seconds is not None:
        conf["merge_commit_seconds"] = args.commit_seconds
    if args.mode == "multiprocessing":
        conf["nb_workers"] = 2
    with ocht.Orchestrator(conf, out_dir=args.out) as orch:
        windowed_dataset(orch, args.tiles, sleep=args.sleep, split=True)
        print("STARTED", flush=True)
        orch.breakpoint()
    print("ALL_DONE", flush=True)


if __name__ == "__main__":
    main()
