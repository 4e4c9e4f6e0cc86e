"""A pipeline run as a fresh process with the default start method (``mp_mode: "auto"``).

    python tests/mp_auto_app.py OUT [--kill-once MARKER] [--hang SECONDS]

Writes a 4x4-tile raster with 2 workers and prints one JSON line: the start method of the
first workers, their pids, and the pids of every worker after the run. ``--kill-once``
makes tile (1, 1) SIGKILL its worker on its first attempt (the replacement is started
while the process has threads: through the forkserver). ``--hang`` makes every tile sleep
(the tests SIGKILL this process meanwhile and watch the workers exit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from zarr_orch import Orchestrator, fill_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app_tasks import arrays_dataset, field, profile_for, schedule

H = W = 128
TILE = (32, 32)


def tile(window: dict, overlaps: dict, saving_info: dict, marker: str, hang: float) -> Any:
    """`field` at the window; kills its own worker once at tile (1, 1) when `marker` is set."""
    time.sleep(hang)
    cell = (saving_info["cars_ds_row"], saving_info["cars_ds_col"])
    if marker and cell == (1, 1) and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    rows = np.arange(window["row_min"], window["row_max"])
    cols = np.arange(window["col_min"], window["col_max"])
    ds = xr.Dataset({"hgt": (("row", "col"), field(rows, cols))})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile_for(H, W))
    return ds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-once", default="")
    parser.add_argument("--hang", type=float, default=0.0)
    args = parser.parse_args()
    conf = {"mode": "multiprocessing", "nb_workers": 2, "progress": False}
    with Orchestrator(conf, args.out) as orch:
        pids = orch.cluster.worker_pids()  # waits for a background start
        first = {"first": orch.cluster.first_start_method, "later": orch.cluster.start_method}
        first["pids"] = pids
        if args.hang:
            print(json.dumps(first), flush=True)
        import mp_auto_app  # the task by its importable name (forkserver replacements)

        cds = arrays_dataset(H, W, TILE)
        orch.add_to_save_lists("ds.zarr", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, mp_auto_app.tile, args.kill_once, args.hang)
        orch.breakpoint()
        first["after"] = orch.cluster.worker_pids()
        first["mp_mode"] = orch.get_conf()["mp_mode"]
    print(json.dumps(first), flush=True)


if __name__ == "__main__":
    main()
