"""Real CARS 1.3 applications whose tiles do not follow a chunk grid, on synthetic inputs.

Run as a script (one whole process per run, as a CARS pipeline is) by the tests and the
rasterization benchmark:

    python tests/cars_windowed_app.py {cars,zarr_orch} {rasterization,disparity_global} OUT
        [--mode sequential|multiprocessing] [--tiles N] [--tile-size N]

``rasterization`` runs SimpleGaussian on an N x N grid of point-cloud tiles whose terrain
footprints overlap by 8 pixels (their final_function merges them through get_data);
``disparity_global`` runs dense matching's global disparity grids (one tile, window None,
a tiling grid in grid units). The orchestrator is built as CARS pipelines build it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import xarray as xr

# at module level, as a CARS pipeline imports its applications before it builds the
# orchestrator: CARS's cluster and zarr_orch's then start their workers with them imported
from cars.applications.application import Application
from cars.data_structures import cars_dataset

X0, Y0, RES = 600000.0, 4800000.0, 0.5
OVERLAP = 8  # pixels shared by neighbouring point-cloud tiles


def point_cloud_tile(row: int, col: int, size: int) -> xr.Dataset:
    """A depth-map tile (x, y, z per epipolar pixel) of a smooth terrain with noise."""
    rng = np.random.default_rng(1000 + row * 97 + col)
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    step = size - OVERLAP
    x = X0 + (col * step + cols) * RES + rng.normal(0, 0.1, rows.shape)
    y = Y0 - (row * step + rows) * RES + rng.normal(0, 0.1, rows.shape)
    z = 100 + np.sin(x / 7.0) * 5 + np.cos(y / 5.0) * 3 + rng.normal(0, 0.05, rows.shape)
    ds = xr.Dataset(
        {"x": (("row", "col"), x), "y": (("row", "col"), y), "z": (("row", "col"), z)},
        coords={"row": np.arange(size), "col": np.arange(size)},
    )
    ds.attrs["epsg"] = 32631
    cars_dataset.fill_dataset(ds, attributes={"cloud_id": 0, "number_of_pc": 1})
    return ds


def rasterization(orchestrator: Any, out: str, tiles: int, size: int) -> None:
    """SimpleGaussian rasterization of tiles x tiles overlapping point-cloud tiles."""
    from pyproj import CRS

    clouds = cars_dataset.CarsDataset("arrays", name="point_clouds")
    clouds.tiling_grid = np.array(
        [
            [[r * size, (r + 1) * size, c * size, (c + 1) * size] for c in range(tiles)]
            for r in range(tiles)
        ]
    )
    for row in range(tiles):
        for col in range(tiles):
            clouds[row, col] = point_cloud_tile(row, col, size)
    extent = (tiles * (size - OVERLAP) + OVERLAP) * RES
    bounds = [X0 - 1, Y0 - extent - 1, X0 + extent + 1, Y0 + 1]
    app = Application(
        "point_cloud_rasterization",
        cfg={"method": "simple_gaussian", "save_intermediate_data": True},
    )
    app.run(
        ([clouds], bounds),
        32631,
        CRS.from_epsg(32631),
        [RES, RES],
        orchestrator=orchestrator,
        dsm_file_name=os.path.join(out, "dsm", "dsm.tif"),
        weights_file_name=os.path.join(out, "dsm", "weights.tif"),
        dump_dir=os.path.join(out, "dump_dir", "rasterization"),
    )
    orchestrator.breakpoint()


def disparity_global(orchestrator: Any, out: str, tiles: int, size: int) -> None:
    """Dense matching's disparity grids from a global range: one tile, window None."""
    app = Application("dense_matching", cfg={"save_intermediate_data": True})
    grid_right = {
        "epipolar_size_y": tiles * size,
        "epipolar_size_x": tiles * size + 37,
        "disp_to_alt_ratio": 0.7,
    }
    grids = app.generate_disparity_grids(
        None,
        grid_right,
        None,
        dmin=-12.5,
        dmax=21.0,
        pair_folder=os.path.join(out, "dense_matching"),
        orchestrator=orchestrator,
    )
    assert (grids["global_min"], grids["global_max"]) == (-13.0, 21.0), grids


APPS = {"rasterization": rasterization, "disparity_global": disparity_global}


def main(argv: list[str] | None = None) -> None:
    """Build the orchestrator as CARS pipelines do, run one application, exit."""
    parser = argparse.ArgumentParser()
    parser.add_argument("orchestrator", choices=["cars", "zarr_orch"])
    parser.add_argument("app", choices=sorted(APPS))
    parser.add_argument("out")
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--tiles", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=40)
    args = parser.parse_args(argv)
    if args.orchestrator == "cars":
        from cars.orchestrator.orchestrator import Orchestrator
    else:
        from zarr_orch import Orchestrator
    conf: dict[str, Any] = {"mode": args.mode}
    if args.mode == "multiprocessing":
        conf["nb_workers"] = 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with Orchestrator(conf, out, log_dir=os.path.join(out, "logs")) as orchestrator:
        APPS[args.app](orchestrator, out, args.tiles, args.tile_size)
    print("ALL_DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
