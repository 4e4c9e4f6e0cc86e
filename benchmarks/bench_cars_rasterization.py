"""CARS's SimpleGaussian rasterization: CARS's orchestrator vs zarr_orch, whole processes.

The real CARS 1.3 application (`tests/cars_windowed_app.py rasterization`) rasterizes an
N x N grid of overlapping point-cloud tiles (each task computes its own terrain window;
the final_function merges it with what is on disk through get_data). Each configuration
runs as its own process, as a CARS pipeline does: the wall time includes interpreter and
import start-up, the cluster, the merges and the output rasters (GeoTIFFs for CARS; the
Zarr products and the GeoTIFFs at the registered names for zarr_orch). The DSMs of every
run are checked equal to CARS's sequential one before timings are printed.

Run: python benchmarks/bench_cars_rasterization.py [--tiles 10] [--tile-size 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "cars_windowed_app.py"
CONFIGS = [(o, m) for m in ("sequential", "multiprocessing") for o in ("cars", "zarr_orch")]


def run_once(orchestrator: str, mode: str, out: Path, tiles: int, size: int) -> float:
    """Whole-process wall time of one rasterization run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(APP), orchestrator, "rasterization", str(out), "--mode", mode]
    command += ["--tiles", str(tiles), "--tile-size", str(size)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{orchestrator} {mode} failed:\n{proc.stderr[-3000:]}")
    return seconds


def dsm_of(orchestrator: str, out: Path) -> np.ndarray:
    """The DSM a run wrote: CARS's GeoTIFF, zarr_orch's Zarr product."""
    if orchestrator == "cars":
        import rasterio

        with rasterio.open(out / "dsm" / "dsm.tif") as src:
            return src.read(1)
    import zarr

    return zarr.open_group(str(out / "dsm" / "dsm.zarr"), mode="r")["hgt"][...]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=10, help="point-cloud tiles per side")
    parser.add_argument("--tile-size", type=int, default=200, help="points per tile side")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cars_raster_"))
    times: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
    try:
        reference = None
        for _ in range(args.repeat):
            for orchestrator, mode in CONFIGS:
                out = work / f"{orchestrator}_{mode}"
                shutil.rmtree(out, ignore_errors=True)
                times[(orchestrator, mode)].append(
                    run_once(orchestrator, mode, out, args.tiles, args.tile_size)
                )
                dsm = dsm_of(orchestrator, out)
                if reference is None:
                    reference = dsm
                elif orchestrator == "zarr_orch":
                    assert np.array_equal(dsm, reference, equal_nan=True), (orchestrator, mode)
                else:  # CARS merges in arrival order: equal up to float rounding
                    assert np.allclose(dsm, reference, rtol=1e-5, equal_nan=True), mode
        shape = reference.shape if reference is not None else (0, 0)
        print(
            f"SimpleGaussian rasterization, {args.tiles}x{args.tiles} point-cloud tiles of "
            f"{args.tile_size}x{args.tile_size} points, DSM {shape[0]}x{shape[1]}, "
            f"median of {args.repeat} whole-process run(s), os.cpu_count()={os.cpu_count()}"
        )
        print(
            f"{'mode':<16} {'CARS (s)':>10} {'min-max':>13} {'zarr_orch (s)':>14} "
            f"{'min-max':>13} {'speed-up':>9}"
        )
        for mode in ("sequential", "multiprocessing"):
            cars_runs, ours_runs = times[("cars", mode)], times[("zarr_orch", mode)]
            cars, ours = statistics.median(cars_runs), statistics.median(ours_runs)
            print(
                f"{mode:<16} {cars:>10.2f} {min(cars_runs):>6.1f}-{max(cars_runs):<6.1f} "
                f"{ours:>14.2f} {min(ours_runs):>6.1f}-{max(ours_runs):<6.1f} "
                f"{cars / ours:>8.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
