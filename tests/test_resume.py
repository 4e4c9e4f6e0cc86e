"""Resumable reruns on local disk and on the S3 test endpoint.

Fingerprint mismatches are refused with what differs and how to proceed; `overwrite` and
`resume: false` recompute; the out_dir lease refuses a concurrent run and is taken over
after a crash; intermediate products resume; `tile_status` reflects the records.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from app_tasks import array_tile, arrays_dataset, full_field, profile_for, schedule

from zarr_orch import Orchestrator, ProductError, open_product
from zarr_orch.storage.core.lease import LeaseError
from zarr_orch.storage.core.location import Location

H, W, TILE = 96, 128, (32, 64)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(out_dir, storage_options) on local disk or in a fresh bucket of the moto server."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    server = request.getfixturevalue("moto_server")
    bucket = server.make_bucket()
    return f"s3://{bucket}/run", server.options()


def _conf(options: dict, **extra) -> dict:
    return {
        "mode": "sequential",
        "progress": False,
        "max_retries": 0,
        "storage_options": options,
        **extra,
    }


def _run(
    out: str,
    options: dict,
    calls: list | None = None,
    tile=TILE,
    dtype="float32",
    nodata=-9999,
    **conf,
):
    """One saved dataset; returns the number of tasks the breakpoint executed."""
    with Orchestrator(_conf(options, **conf), out_dir=out) as orch:
        cds = arrays_dataset(H, W, tile, overlap=1, name="dem")
        orch.add_to_save_lists("dem.tif", "hgt", cds, dtype=dtype, nodata=nodata)
        schedule(orch, cds, array_tile, profile_for(H, W))
        orch.breakpoint()
        return orch._stats["tiles"], orch._stats["resumed"]


def _read(out: str, options: dict) -> np.ndarray:
    return open_product(f"{out}/dem.zarr", storage_options=options)["hgt"].values


def test_rerun_of_a_finished_product_computes_nothing(where):
    out, options = where
    assert _run(out, options) == (6, 0)
    assert _run(out, options) == (0, 6)
    np.testing.assert_array_equal(_read(out, options), full_field(H, W))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tile": (48, 64)}, "tile_size: was [32, 64], now [48, 64]"),
        ({"dtype": "float64"}, "float64"),
        ({"nodata": -1}, "-1"),
        ({"run_key": "v2"}, "run_key: was None, now 'v2'"),
    ],
)
def test_fingerprint_mismatch_is_refused_and_nothing_changes(where, change, expected):
    out, options = where
    _run(out, options)
    before = _read(out, options)
    with pytest.raises(ProductError) as info:
        _run(out, options, **change)
    message = str(info.value)
    assert expected in message
    assert "resume: false" in message and "overwrite: true" in message
    np.testing.assert_array_equal(_read(out, options), before)


def test_overwrite_recomputes_everything(where):
    out, options = where
    _run(out, options)
    assert _run(out, options, tile=(48, 64), overwrite=True) == (4, 0)
    ds = open_product(f"{out}/dem.zarr", storage_options=options)
    assert ds["hgt"].encoding["chunks"] == (48, 64)
    np.testing.assert_array_equal(ds["hgt"].values, full_field(H, W))


def test_resume_false_rebuilds_this_product_and_keeps_the_others(where):
    out, options = where
    with Orchestrator(_conf(options), out_dir=out) as orch:
        other = arrays_dataset(H, W, TILE, name="other")
        orch.add_to_save_lists("other.tif", "hgt", other, nodata=-9999)
        schedule(orch, other, array_tile, profile_for(H, W), offset=5)
    _run(out, options)
    # same fingerprint: every tile is recomputed in place
    assert _run(out, options, resume=False) == (6, 0)
    # another fingerprint: this product is rebuilt, the other one is untouched
    assert _run(out, options, resume=False, run_key="v2") == (6, 0)
    other_values = open_product(f"{out}/other.zarr", storage_options=options)["hgt"].values
    np.testing.assert_array_equal(other_values, full_field(H, W, offset=5))


def test_second_concurrent_run_is_refused_naming_the_holder(where):
    out, options = where
    first = Orchestrator(_conf(options), out_dir=out)
    package_logger = logging.getLogger("zarr_orch")
    handlers = list(package_logger.handlers)
    try:
        with pytest.raises(LeaseError) as info:
            Orchestrator(_conf(options), out_dir=out)
        message = str(info.value)
        assert first.run_id in message and f"pid {os.getpid()}" in message
        # the refused run detached its run log: later runs do not log every line twice
        assert package_logger.handlers == handlers
    finally:
        first.cleanup()
    Orchestrator(_conf(options), out_dir=out).cleanup()  # free again once closed


def test_lease_of_a_crashed_run_is_taken_over(where, tmp_path):
    out, options = where
    script = (
        "import os, sys; from zarr_orch import Orchestrator\n"
        f"Orchestrator({_conf(options)!r}, out_dir={out!r})\n"
        "os._exit(0)  # dies without releasing its lease\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    location = Location.parse(out, options).join(".zarr_orch.lease.json")
    assert json.loads(location.read_text())["pid"] != os.getpid()
    assert _run(out, options) == (6, 0)  # taken over at once: the holder's pid is gone


def test_stale_lease_of_another_host_is_taken_over(where):
    out, options = where
    location = Location.parse(out, options)
    location.makedirs()
    holder = {
        "run_id": "elsewhere",
        "host": "another-host",
        "pid": 1,
        "started": time.time(),
        "heartbeat": time.time(),
    }
    location.join(".zarr_orch.lease.json").write_text(json.dumps(holder))
    with pytest.raises(LeaseError, match="another-host"):
        Orchestrator(_conf(options), out_dir=out)
    holder["heartbeat"] = time.time() - 3600
    location.join(".zarr_orch.lease.json").write_text(json.dumps(holder))
    assert _run(out, options) == (6, 0)


def test_intermediate_products_resume_and_open(where):
    out, options = where
    calls = []

    def run():
        with Orchestrator(_conf(options, save_intermediate=True), out_dir=out) as orch:
            cds = arrays_dataset(H, W, TILE, overlap=2, name="matching step")
            orch.add_to_replace_lists(cds, cars_ds_name="matching step")
            schedule(orch, cds, array_tile, profile_for(H, W))
            orch.breakpoint()
            calls.append(orch._stats["tiles"])
            return cds

    first = run()
    second = run()
    assert calls == [6, 0]
    for row in range(first.shape[0]):
        for col in range(first.shape[1]):
            a, b = first[row, col], second[row, col]
            np.testing.assert_array_equal(a["hgt"].values, b["hgt"].values)
            assert a.attrs["window"] == b.attrs["window"]
            assert a.attrs["overlaps"] == b.attrs["overlaps"]
    ds = open_product(f"{out}/intermediate/matching_step.zarr", storage_options=options)
    np.testing.assert_array_equal(ds["hgt"].values, full_field(H, W))


def test_tile_status_follows_the_records(where):
    from zarr_orch import tile_status

    out, options = where
    _run(out, options)
    group = zarr.open_group(Location.parse(f"{out}/dem.zarr", options).zarr_store(), mode="r")
    name = group.attrs["zarr_orch"]["records"][0]
    from zarr_orch.storage.format.records import forget_tiles, open_records

    store = Location.parse(f"{out}/dem.zarr", options).zarr_store()
    forget_tiles(open_records(store, name, mode="r+"), [(1, 1)])
    status = tile_status(f"{out}/dem.zarr", storage_options=options)
    assert status.sel(tile_row=1, tile_col=1).item() == "missing"
    assert (status == "done").sum().item() == 5
    assert _run(out, options) == (1, 5)
