"""A two-stage pipeline run as a subprocess by the kill/resume tests (and the resume benchmark).

Usage: python tests/kill_pipeline.py OUT [--mode M] [--counter DIR] [--size N] [--tile N]
       [--sleep S] [--fail-tile R,C] [--storage-options JSON] [--workers N]
Stage 1 (field with 1-px overlaps) is saved and replaced; a breakpoint; stage 2 (3x3 mean
of stage 1) is saved. Every task execution drops a file into --counter, so tests can count
what a rerun executed. Prints STAGE1_DONE between the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import numpy as np
import xarray as xr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zarr_orch as ocht
from zarr_orch import CarsDataset, fill_dataset
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict


def _count(counter: str | None, stage: str, row: int, col: int) -> None:
    if counter:
        path = os.path.join(counter, f"{stage}_{row}_{col}_{uuid.uuid4().hex[:8]}")
        with open(path, "w"):
            pass


def field(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Deterministic field with hash noise (float32)."""
    r = rows[:, None].astype("float64")
    c = cols[None, :].astype("float64")
    return (np.sin(r / 23.0) * np.cos(c / 31.0) * 50 + ((r * 7919 + c * 104729) % 97)).astype(
        "float32"
    )


def stage1(window, overlaps, saving_info, counter, sleep, fail):
    """Stage 1 task (optionally failing on one tile while the FAIL marker file exists)."""
    row, col = saving_info["cars_ds_row"], saving_info["cars_ds_col"]
    _count(counter, "s1", row, col)
    if fail and (row, col) == tuple(fail[0]) and os.path.exists(fail[1]):
        raise RuntimeError(f"input of tile ({row}, {col}) is broken")
    time.sleep(sleep)
    rows = np.arange(window["row_min"] - overlaps["up"], window["row_max"] + overlaps["down"])
    cols = np.arange(window["col_min"] - overlaps["left"], window["col_max"] + overlaps["right"])
    ds = xr.Dataset({"v": (("row", "col"), field(rows, cols))})
    return fill_dataset(ds, saving_info=saving_info, window=window, overlaps=overlaps)


def stage2(tile1, saving_info, counter, sleep):
    """Stage 2 task: 3x3 mean (edge-replicated) of the stage-1 tile."""
    _count(counter, "s2", saving_info["cars_ds_row"], saving_info["cars_ds_col"])
    time.sleep(sleep)
    ov, window = tile1.attrs["overlaps"], tile1.attrs["window"]
    data = tile1["v"].values
    pad = (
        (int(ov["up"] == 0), int(ov["down"] == 0)),
        (int(ov["left"] == 0), int(ov["right"] == 0)),
    )
    data = np.pad(data, pad, mode="edge")
    h = window["row_max"] - window["row_min"]
    w = window["col_max"] - window["col_min"]
    acc = np.zeros((h, w), dtype="float64")
    for dr in range(3):
        for dc in range(3):
            acc += data[dr : dr + h, dc : dc + w]
    ds = xr.Dataset(
        {
            "mean": (("row", "col"), (acc / 9).astype("float32")),
            "pos": (("row", "col"), (acc > 0).astype("uint8")),
        }
    )
    return fill_dataset(
        ds,
        saving_info=saving_info,
        window=window,
        overlaps={"up": 0, "down": 0, "left": 0, "right": 0},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", default="multiprocessing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--counter", default=None)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail-tile", default=None, help="R,C,MARKER: fail while MARKER exists")
    parser.add_argument("--storage-options", default=None)
    args = parser.parse_args(argv)
    conf: dict = {"mode": args.mode, "progress": False}
    if args.mode != "sequential":
        conf["nb_workers"] = args.workers
    if args.storage_options:
        conf["storage_options"] = json.loads(args.storage_options)
    fail = None
    if args.fail_tile:
        r, c, marker = args.fail_tile.split(",", 2)
        fail = ((int(r), int(c)), marker)
    with ocht.Orchestrator(conf, out_dir=args.out) as orch:
        s1 = CarsDataset("arrays", name="stage1")
        s1.create_grid(args.size, args.size, args.tile, args.tile, 1, 1)
        orch.add_to_save_lists("stage1.tif", "v", s1, dtype="float32", nodata=-9999)
        orch.add_to_replace_lists(s1)
        [info1] = orch.get_saving_infos([s1])
        task1 = orch.cluster.create_task(stage1)
        for r in range(s1.shape[0]):
            for c in range(s1.shape[1]):
                s1[r, c] = task1(
                    window_array_to_dict(s1.tiling_grid[r, c]),
                    overlap_array_to_dict(s1.overlaps[r, c]),
                    ocht.update_saving_infos(info1, row=r, col=c),
                    args.counter,
                    args.sleep,
                    fail,
                )
        orch.breakpoint()
        print("STAGE1_DONE", flush=True)
        s2 = CarsDataset("arrays", name="stage2")
        s2.create_empty_copy(s1)
        orch.add_to_save_lists("stage2.tif", "mean", s2, dtype="float32", nodata=-9999)
        orch.add_to_save_lists("stage2.tif", "pos", s2, dtype="uint8", nodata=255)
        [info2] = orch.get_saving_infos([s2])
        task2 = orch.cluster.create_task(stage2)
        for r in range(s2.shape[0]):
            for c in range(s2.shape[1]):
                s2[r, c] = task2(
                    s1[r, c],
                    ocht.update_saving_infos(info2, row=r, col=c),
                    args.counter,
                    args.sleep,
                )
        orch.breakpoint()
    print("ALL_DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
