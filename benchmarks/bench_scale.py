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


def records_startup(base: str, n: int, tile: int) -> tuple[float, float]:
    """(listing, writing) seconds for the n x n completion records of one product."""
    from zarr_orch.registry.plan import build_plans, product_attributes
    from zarr_orch.registry.registries import SaveEntry, TrackedDataset
    from zarr_orch.storage.core.location import Location
    from zarr_orch.storage.format.records import RecordWriter, record_bytes
    from zarr_orch.storage.readers.windows import done_tiles
    from zarr_orch.storage.writers.prepare import prepare_product

    ds = CarsDataset("arrays", name="records")
    ds.tiling_grid = zarr_orch.generate_tiling_grid(0, 0, n * tile, n * tile, tile, tile)
    entry = SaveEntry("records.zarr", "v", "<f4", -9999.0, False, False)
    [plan] = build_plans(TrackedDataset(ds, 0, "records"), [entry], Location.parse(base))
    prepare_product(plan, product_attributes(plan, ds, "records.zarr"))
    payload = (plan.records, record_bytes(1, [0]))
    start = time.perf_counter()
    writer = RecordWriter()
    for r in range(n):
        for c in range(n):
            writer.submit(plan.location, r, c, payload)
    writer.close()
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    found = done_tiles(plan.location, plan.records)
    read_s = time.perf_counter() - start
    assert len(found) == n * n
    return read_s, write_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=316, help="tiles per side")
    parser.add_argument("--tile", type=int, default=32, help="tile size in pixels")
    parser.add_argument("--modes", nargs="+", default=["sequential", "multiprocessing"])
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument(
        "--saved-tiles",
        type=int,
        default=None,
        help="tiles per side of the saved runs (default: --tiles; they write every chunk)",
    )
    args = parser.parse_args()
    n, tile = args.tiles, args.tile
    ntiles = n * n
    ns = args.saved_tiles or n
    nsaved = ns * ns
    base = tempfile.mkdtemp(prefix="zo_scale_", dir=os.environ.get("BENCH_DIR"))
    print(
        f"# {ntiles} tiles of {tile}x{tile} px ({n * tile} px raster), "
        f"zarr_orch {zarr_orch.__version__}, {os.cpu_count()} cores"
    )
    rows: list[tuple[str, ...]] = []

    def add(step: str, seconds: float, tiles: int, rss: str = "-") -> None:
        rows.append((step, f"{seconds:.2f}", f"{seconds / tiles * 1e3:.3f}", rss))

    try:
        read_s, write_s = records_startup(base, n, tile)
        add(f"start-up of a resumed run: listing {ntiles} completion records", read_s, ntiles)
        add(f"main process writing {ntiles} completion records", write_s, ntiles)
        if not args.skip_loop:
            add(f"plain zarr loop, {nsaved} tiles (write only)", zarr_loop(base, ns, tile), nsaved)
        for mode in args.modes:
            # orchestration only: compute-only dataset of tiny tiles, nothing written
            with Orchestrator(conf_for(mode), out_dir=os.path.join(base, f"o-{mode}")) as orch:
                reg_s, _ = build(orch, n, tile, tiny_tile, save=False)
                with PeakRSS() as peak:
                    start = time.perf_counter()
                    orch.breakpoint()
                    bp_s = time.perf_counter() - start
            add(f"{mode}: creating + registering {ntiles} tasks", reg_s, ntiles)
            add(
                f"{mode}: scheduling + booking {ntiles} tiles (compute-only)",
                bp_s,
                ntiles,
                f"{peak.delta_mib:.0f}",
            )
            # a saved run (every chunk written) and its resumed rerun
            out = os.path.join(base, f"s-{mode}")
            with Orchestrator(conf_for(mode), out_dir=out) as orch, PeakRSS() as peak:
                start = time.perf_counter()
                build(orch, ns, tile, ramp_tile, save=True)
                orch.breakpoint()
                run_s = time.perf_counter() - start
            add(f"{mode}: saved run, {nsaved} tiles", run_s, nsaved, f"{peak.delta_mib:.0f}")
            start = time.perf_counter()
            with Orchestrator(conf_for(mode), out_dir=out) as orch:
                build(orch, ns, tile, ramp_tile, save=True)
                orch.breakpoint()
            add(f"{mode}: rerun of it (nothing left)", time.perf_counter() - start, nsaved)
            shutil.rmtree(out, ignore_errors=True)
        print("| step | seconds | ms/tile | main peak dRSS MiB |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
