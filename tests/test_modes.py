"""The same CARS-style application in every execution mode gives byte-identical products.

The two-stage application of tests/cars_app.py runs in sequential, multiprocessing
(forkserver and spawn), local_dask and dask-with-address (a LocalCluster started here and
passed as an address) modes; decoded arrays and the stored chunk bytes must equal the
sequential run's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from cars_app import reference, run_pipeline

from zarr_orch import Orchestrator

SIZE, TILE = (500, 700), (128, 192)
PRODUCTS = {"stage1.zarr": ["hgt"], "stage2.zarr": ["mean", "mask", "bands"]}


def chunk_bytes(out: Path) -> dict[str, bytes]:
    """Raw bytes of every data chunk (not metadata, not the time-stamped records)."""
    result = {}
    for product, tags in PRODUCTS.items():
        for tag in tags:
            for path in sorted((out / product / tag / "c").rglob("*")):
                if path.is_file():
                    result[str(path.relative_to(out))] = path.read_bytes()
    return result


def run_mode(conf: dict, out: Path) -> None:
    with Orchestrator(conf, out_dir=out) as orch:
        run_pipeline(orch, tile=TILE, size=SIZE)


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sequential") / "out"
    run_mode({"mode": "sequential", "progress": False}, out)
    return out


@pytest.fixture(scope="module")
def scheduler_address():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


CONFS = {
    "mp-forkserver": {"mode": "multiprocessing", "nb_workers": 2, "mp_mode": "forkserver"},
    "mp-spawn": {"mode": "multiprocessing", "nb_workers": 2, "mp_mode": "spawn"},
    "local_dask": {"mode": "local_dask", "nb_workers": 2},
    "dask-address": {"mode": "dask"},
}


@pytest.mark.parametrize("name", list(CONFS))
def test_products_identical_across_modes(name, tmp_path, sequential_run, request):
    conf = {**CONFS[name], "progress": False}
    if name == "dask-address":
        conf["address"] = request.getfixturevalue("scheduler_address")
    out = tmp_path / "out"
    run_mode(conf, out)
    expected_mean, _ = reference(*SIZE)
    for product, tags in PRODUCTS.items():
        got = zarr.open_group(str(out / product), mode="r")
        want = zarr.open_group(str(sequential_run / product), mode="r")
        for tag in tags:
            np.testing.assert_array_equal(got[tag][...], want[tag][...], err_msg=tag)
    np.testing.assert_array_equal(
        zarr.open_group(str(out / "stage2.zarr"))["mean"][...], expected_mean
    )
    assert chunk_bytes(out) == chunk_bytes(sequential_run)
