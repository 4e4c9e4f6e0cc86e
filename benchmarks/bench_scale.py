"""Scale: a 100,000-tile run (316 x 316 tiles of 32 px on a 10,112 px raster).

Measures, in one process run, for sequential and multiprocessing modes:
- registration: creating the tasks and registering them (per tile),
- orchestration overhead per tile: a compute-only dataset whose task returns a tiny tile
  and whose sink writes nothing, so the breakpoint's wall time is scheduling + bookkeeping,
- a saved run: wall, ms/tile, and the main process's peak RSS above its start (bookkeeping
  memory), next to a plain per-tile zarr loop writing the same chunks,
- a resumed rerun of the finished run: start-up (reading the completion records) and total.
Prints a table; the figures go in benchmarks/README.md. Use --tiles to shrink the grid.

Run: python benchmarks/bench_scale.py [--tiles 316] [--tile 32] [--modes sequential multiprocessing]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import xarray as xr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_parallel import PeakRSS

import zarr_orch
from zarr_orch import CarsDataset, Orchestrator, fill_dataset
from zarr_orch.data.tiling import window_array_to_dict


def tiny_tile(window: dict, saving_info: dict) -> xr.Dataset:
    """A 1x1 tile: orchestration cost only (compute-only datasets write nothing)."""
    ds = xr.Dataset({"v": (("row", "col"), np.zeros((1, 1), dtype="float32"))})
    return fill_dataset(ds, saving_info=saving_info, window=window)


def ramp_tile(window: dict, saving_info: dict) -> xr.Dataset:
    """A full tile of cheap values (row + col), so the run is dominated by I/O."""
    rows = np.arange(window["row_min"], window["row_max"], dtype="float32")[:, None]
    cols = np.arange(window["col_min"], window["col_max"], dtype="float32")[None, :]
    ds = xr.Dataset({"v": (("row", "col"), rows + cols)})
    return fill_dataset(
        ds,
        saving_info=saving_info,
        window=window,
        overlaps={"up": 0, "down": 0, "left": 0, "right": 0},
    )


def build(orch: Orchestrator, n: int, tile: int, func: Any, save: bool) -> tuple[float, Any]:
    """Create and register the n x n tasks; returns (seconds, dataset)."""
    start = time.perf_counter()
    ds = CarsDataset("arrays", name="scale")
    ds.tiling_grid = zarr_orch.generate_tiling_grid(0, 0, n * tile, n * tile, tile, tile)
    if save:
        orch.add_to_save_lists("scale.zarr", "v", ds, dtype="float32", nodata=-9999)
    else:
        orch.add_to_compute_lists(ds)
    [info] = orch.get_saving_infos([ds])
    task = orch.cluster.create_task(func)
    grid = ds.tiling_grid
    for r in range(n):
        for c in range(n):
            ds[r, c] = task(
                window_array_to_dict(grid[r, c]), zarr_orch.update_saving_infos(info, row=r, col=c)
            )
    return time.perf_counter() - start, ds


def conf_for(mode: str) -> dict[str, Any]:
    conf: dict[str, Any] = {"mode": mode, "progress": False}
    if mode != "sequential":
        conf["nb_workers"] = 2
    return conf


def zarr_loop(out: str, n: int, tile: int) -> float:
    """The same chunks written by a plain zarr loop (no orchestration, no records)."""
    import zarr

    arr = zarr.create_array(
        os.path.join(out, "loop.zarr"),
        shape=(n * tile, n * tile),
        chunks=(tile, tile),
        dtype="float32",
        fill_value=-9999,
    )
    start = time.perf_counter()
    for r in range(n):
        for c in range(n):
            w = {
                "row_min": r * tile,
                "row_max": (r + 1) * tile,
                "col_min": c * tile,
                "col_max": (c + 1) * tile,
            }
            arr[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = ramp_tile(w, {})["v"].values
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=316, help="tiles per side")
    parser.add_argument("--tile", type=int, default=32, help="tile size in pixels")
    parser.add_argument("--modes", nargs="+", default=["sequential", "multiprocessing"])
    parser.add_argument("--skip-loop", action="store_true")
    args = parser.parse_args()
    n, tile = args.tiles, args.tile
    ntiles = n * n
    base = tempfile.mkdtemp(prefix="zo_scale_", dir=os.environ.get("BENCH_DIR"))
    print(
        f"# {ntiles} tiles of {tile}x{tile} px ({n * tile} px raster), "
        f"zarr_orch {zarr_orch.__version__}, {os.cpu_count()} cores"
    )
    rows = []
    try:
        if not args.skip_loop:
            loop_s = zarr_loop(base, n, tile)
            rows.append(
                (
                    "plain zarr loop (write only)",
                    "-",
                    f"{loop_s:.1f}",
                    f"{loop_s / ntiles * 1e3:.3f}",
                    "-",
                )
            )
        for mode in args.modes:
            # orchestration only
            with Orchestrator(conf_for(mode), out_dir=os.path.join(base, f"o-{mode}")) as orch:
                reg_s, _ = build(orch, n, tile, tiny_tile, save=False)
                with PeakRSS() as peak:
                    start = time.perf_counter()
                    orch.breakpoint()
                    bp_s = time.perf_counter() - start
            rows.append(
                (f"{mode}: register", "-", f"{reg_s:.1f}", f"{reg_s / ntiles * 1e3:.3f}", "-")
            )
            rows.append(
                (
                    f"{mode}: compute-only breakpoint",
                    "-",
                    f"{bp_s:.1f}",
                    f"{bp_s / ntiles * 1e3:.3f}",
                    f"{peak.delta_mib:.0f}",
                )
            )
            # saved run and its resumed rerun
            out = os.path.join(base, f"s-{mode}")
            with Orchestrator(conf_for(mode), out_dir=out) as orch, PeakRSS() as peak:
                start = time.perf_counter()
                _, ds = build(orch, n, tile, ramp_tile, save=True)
                orch.breakpoint()
                run_s = time.perf_counter() - start
            rows.append(
                (
                    f"{mode}: saved run (register+breakpoint)",
                    "-",
                    f"{run_s:.1f}",
                    f"{run_s / ntiles * 1e3:.3f}",
                    f"{peak.delta_mib:.0f}",
                )
            )
            del ds
            start = time.perf_counter()
            with Orchestrator(conf_for(mode), out_dir=out) as orch:
                build(orch, n, tile, ramp_tile, save=True)
                t0 = time.perf_counter()
                orch._prepare_products(orch.registries.ordered())  # start-up: read records
                records_s = time.perf_counter() - t0
                orch.breakpoint()
            rerun_s = time.perf_counter() - start
            rows.append(
                (
                    f"{mode}: resumed rerun (nothing left)",
                    "-",
                    f"{rerun_s:.1f}",
                    f"{rerun_s / ntiles * 1e3:.3f}",
                    "-",
                )
            )
            rows.append(
                (
                    f"{mode}: reading {ntiles} completion records",
                    "-",
                    f"{records_s:.2f}",
                    f"{records_s / ntiles * 1e3:.4f}",
                    "-",
                )
            )
            shutil.rmtree(out, ignore_errors=True)
        print("| step | - | seconds | ms/tile | main peak dRSS MiB |")
        print("|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
