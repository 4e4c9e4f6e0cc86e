"""Object storage: the CARS-style app on S3 (moto_server on 127.0.0.1), outages, secrets, bad input.

Every test passes explicit credentials and the loopback endpoint; the `moto_server`
fixture (tests/s3_server.py) sets ``AWS_EC2_METADATA_DISABLED=true`` while it runs.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import pickle
import threading
import time
from typing import Any

import cars_app
import numpy as np
import pytest
import zarr
from s3_server import TEST_KEY, TEST_SECRET, MotoServer, free_port

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator
from zarr_orch.cluster.base import AbstractCluster
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.demo import run_demo
from zarr_orch.errors import ConfigurationError, StorageError, TaskFailedError, ZarrOrchError
from zarr_orch.reading import open_product
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.retry import (
    RetryingStore,
    StorageSettings,
    call_with_retry,
    is_transient,
)
from zarr_orch.storage.format.records import META_GROUP

pytest.importorskip("s3fs")

SIZE, TILE = (200, 300), (128, 160)  # 2 x 2 tiles, ragged last row/column
S3_MODES = ["sequential", "multiprocessing", "local_dask"]
FAST = 10.0  # seconds: every bad-input error must come before this


def conf_for(mode: str, options: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A quiet conf for `mode` on the test server; skips modes not registered (yet)."""
    if mode not in AbstractCluster.modes():
        pytest.skip(f"mode {mode!r} is not available")
    conf: dict[str, Any] = {
        "mode": mode,
        "max_retries": 0,
        "progress": False,
        "storage_options": options,
        **extra,
    }
    if mode in ("multiprocessing", "local_dask"):
        conf["nb_workers"] = 2
    return conf


def product_arrays(location: Location) -> dict[str, np.ndarray]:
    """Every array of a product, decoded; records without their time stamps."""
    group = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3)
    arrays = {}
    for path, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            values = node[...]
            if path.startswith(f"{META_GROUP}/"):
                values = values.copy()
                values[..., 1] = 0  # time_ms differs between runs
            arrays[path] = values
    return arrays


def assert_same_products(left: Location, right: Location) -> None:
    a, b = product_arrays(left), product_arrays(right)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Location:
    """The reference: the same app on local disk, sequential."""
    out = tmp_path_factory.mktemp("local") / "run"
    with Orchestrator({"mode": "sequential", "progress": False}, out_dir=out) as orch:
        cars_app.run_pipeline(orch, tile=TILE, size=SIZE)
    return Location.parse(out)


# -- the app on S3 -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", S3_MODES)
def test_cars_app_on_s3_matches_local(mode, moto_server, s3_bucket, s3_options, local_run):
    url = f"s3://{s3_bucket}/run1"
    with Orchestrator(conf_for(mode, s3_options), out_dir=url) as orch:
        stage1, _ = cars_app.run_pipeline(orch, tile=TILE, size=SIZE)
        data, nodata = orch.get_data("hgt", stage1[1, 1])
        window = stage1[1, 1].attrs["window"]
        _, full = cars_app.reference(*SIZE)
        np.testing.assert_array_equal(
            data, full[window["row_min"] : window["row_max"], window["col_min"] : window["col_max"]]
        )
        assert nodata == -9999
        assert orch.products == {
            "stage1.tif": f"{url}/stage1.zarr",
            "stage2.tif": f"{url}/stage2.zarr",
        }
    remote = Location.parse(url, s3_options)
    for name in ("stage1.zarr", "stage2.zarr"):
        assert_same_products(local_run.join(name), remote.join(name))
    mean, _ = cars_app.reference(*SIZE)
    ds = open_product(f"{url}/stage2.zarr", storage_options=s3_options)
    np.testing.assert_array_equal(ds["mean"].values, mean)
    meta = json.loads(remote.join("metadata.json").read_text())
    info = meta["zarr_orch"]
    assert info["out_dir"] == url
    assert info["products"]["stage2.tif"]["path"] == "stage2.zarr"
    assert "url" not in info["products"]["stage2.tif"]  # relative: the run can be moved
    assert info["products"]["stage2.tif"]["tiles_done"] == 4
    assert info["conf"]["storage_options"]["secret"] == "***"


def test_demo_on_s3_matches_local(moto_server, s3_bucket, s3_options, tmp_path):
    url = f"s3://{s3_bucket}/demo"
    result = run_demo(url, conf_for("sequential", s3_options), size=64, tile=32)
    local = run_demo(
        str(tmp_path / "demo"), {"mode": "sequential", "progress": False}, size=64, tile=32
    )
    assert result.out_dir == url and result.tiles == local.tiles == 4
    remote = Location.parse(url, s3_options)
    for name in ("terrain.zarr", "products.zarr"):
        assert_same_products(Location.parse(tmp_path / "demo" / name), remote.join(name))
    assert json.loads(remote.join("metadata.json").read_text())["demo"] == {"size": 64, "tile": 32}


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_workers_open_their_own_filesystem_after_fork(moto_server, s3_bucket, s3_options):
    """A forked child must not reuse the parent's s3fs session (bound to another loop)."""
    location = Location.parse(f"s3://{s3_bucket}/fork.zarr", s3_options)
    array = zarr.create_array(location.zarr_store(), shape=(4, 4), chunks=(2, 2), dtype="f4")
    array[:2, :2] = 1.0
    child = multiprocessing.get_context("fork").Process(
        target=_write_in_child, args=(pickle.dumps(location),)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    got = zarr.open_array(location.zarr_store(read_only=True), mode="r")[...]
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])


def _write_in_child(payload: bytes) -> None:
    location = pickle.loads(payload)
    zarr.open_array(location.zarr_store(), mode="r+")[2:, 2:] = 2.0


def test_storage_conf_reaches_products_and_zarr(moto_server, s3_bucket, s3_options):
    before = zarr.config.get("async.concurrency")
    conf = conf_for(
        "sequential", s3_options, storage_retries=2, storage_retry_delay=0.1, storage_concurrency=7
    )
    try:
        with Orchestrator(conf, out_dir=f"s3://{s3_bucket}/tuned") as orch:
            dataset = _single_stage(orch, cars_app.stage1_tile, (64, 64), (32, 32))
            assert orch.get_conf()["storage_concurrency"] == 7
        expected = StorageSettings(retries=2, retry_delay=0.1, concurrency=7)
        assert orch.out_location.settings == expected
        plan_location = Location.parse("field.zarr", base=orch.out_location)
        assert plan_location.settings == expected
        assert zarr.config.get("async.concurrency") == 7
        assert dataset.shape == (2, 2)
    finally:
        zarr.config.set({"async.concurrency": before})
    with pytest.raises(ConfigurationError, match="storage_retries"):
        Orchestrator({"mode": "sequential", "storage_retries": -1}, out_dir=None)
    with pytest.raises(ConfigurationError, match="storage_concurrency"):
        Orchestrator({"mode": "sequential", "storage_concurrency": 0}, out_dir=None)


# -- transient errors and outages ----------------------------------------------------------------


def _single_stage(orch: Orchestrator, func: Any, size: tuple[int, int], tile: tuple[int, int]):
    """One saved stage of `func` (stage1_tile's signature) and a breakpoint."""
    height, width = size
    profile = dict(cars_app.PROFILE, height=height, width=width)
    dataset = CarsDataset("arrays", name="field")
    dataset.create_grid(width, height, tile[0], tile[1], 1, 1)
    orch.add_to_save_lists(
        "field.tif", "hgt", dataset, dtype="float32", nodata=-9999, cars_ds_name="field"
    )
    [info] = orch.get_saving_infos([dataset])
    task = orch.cluster.create_task(func)
    for row in range(dataset.shape[0]):
        for col in range(dataset.shape[1]):
            dataset[row, col] = task(
                window_array_to_dict(dataset.tiling_grid[row, col]),
                overlap_array_to_dict(dataset.overlaps[row, col]),
                zo.update_saving_infos(info, row=row, col=col),
                profile,
            )
    orch.breakpoint()
    return dataset


#: callables run (once each) by the next `outage_tile` call: sequential mode, same process
_OUTAGE_HOOKS: list[Any] = []


def outage_tile(window, overlaps, saving_info, profile):
    """stage1_tile, after running a pending outage hook (stops the S3 server mid-run)."""
    while _OUTAGE_HOOKS:
        _OUTAGE_HOOKS.pop()()
    return cars_app.stage1_tile(window, overlaps, saving_info, profile)


def test_server_restart_mid_run(moto_server, s3_bucket, s3_options, caplog):
    """The server dies during the first task and comes back (empty) ~1.5 s later.

    moto loses everything on restart (the restart recreates the bucket), so the product's
    group written before the outage is gone: the run may complete or fail, but a failure
    must name the URL, nothing may hang, and a rerun on the restarted server is correct.
    """
    url = f"s3://{s3_bucket}/outage"
    size, tile = (256, 256), (128, 128)
    restarts: list[threading.Thread] = []

    def outage() -> None:
        moto_server.stop()
        thread = threading.Thread(
            target=moto_server.restart, kwargs={"delay": 1.5, "buckets": (s3_bucket,)}
        )
        thread.start()
        restarts.append(thread)

    _OUTAGE_HOOKS.append(outage)
    caplog.set_level(logging.INFO, logger="zarr_orch")
    start = time.perf_counter()
    try:
        with Orchestrator(conf_for("sequential", s3_options), out_dir=url) as orch:
            _single_stage(orch, outage_tile, size, tile)
    except ZarrOrchError as exc:
        assert url in str(exc), str(exc)
    finally:
        _OUTAGE_HOOKS.clear()
        for thread in restarts:
            thread.join(30)
    assert restarts, "the outage hook did not run"
    assert time.perf_counter() - start < 60
    assert "transient error" in caplog.text  # the outage was retried, not ignored
    with Orchestrator(conf_for("sequential", s3_options), out_dir=url) as orch:
        _single_stage(orch, cars_app.stage1_tile, size, tile)
    _, full = cars_app.reference(*size)
    ds = open_product(f"{url}/field.zarr", storage_options=s3_options)
    np.testing.assert_array_equal(ds["hgt"].values, full)


class FlakyStore(zarr.storage.MemoryStore):
    """A MemoryStore whose first `failures` writes fail with a throttling error."""

    def __init__(self, failures: int, error: Exception) -> None:
        super().__init__()
        self.failures, self.error, self.calls = failures, error, 0

    async def set(self, key, value, byte_range=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        await super().set(key, value)


def test_retrying_store_retries_transient_and_not_permanent_errors():
    quick = StorageSettings(retries=3, retry_delay=0.01, retry_max_delay=0.02)
    slow_down = OSError(errno.EBUSY, "Please reduce your request rate (SlowDown)")
    flaky = FlakyStore(2, slow_down)
    array = zarr.create_array(
        RetryingStore(flaky, "memory://flaky", quick), shape=(2,), chunks=(2,), dtype="i4"
    )  # metadata write: 2 failures + 1
    array[:] = [1, 2]
    assert flaky.calls == 4 and list(array[:]) == [1, 2]
    denied = FlakyStore(10, PermissionError(f"denied for key {TEST_SECRET}"))
    store = RetryingStore(denied, "s3://bucket/p.zarr", quick, (TEST_SECRET,))
    with pytest.raises(StorageError) as info:
        zarr.create_array(store, shape=(2,), chunks=(2,), dtype="i4")
    assert denied.calls == 1  # permanent: not retried
    assert "s3://bucket/p.zarr/zarr.json" in str(info.value)
    assert TEST_SECRET not in str(info.value) and "***" in str(info.value)
    exhausted = FlakyStore(10, ConnectionResetError("reset by peer"))
    with pytest.raises(StorageError, match="after 4 attempts"):
        zarr.create_array(
            RetryingStore(exhausted, "s3://b/x", quick), shape=(2,), chunks=(2,), dtype="i4"
        )
    assert is_transient(TimeoutError()) and not is_transient(FileNotFoundError("k"))
    calls = []

    def fails_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("read timed out")
        return "ok"

    assert call_with_retry(fails_once, "reading", "s3://b/k", quick) == "ok"


# -- secrets ---------------------------------------------------------------------------------------


def failing_tile(window, overlaps, saving_info, profile):
    """A task that fails on one tile."""
    if window["row_min"] == 0 and window["col_min"] == 0:
        raise ValueError("this tile fails on purpose")
    return cars_app.stage1_tile(window, overlaps, saving_info, profile)


def test_secrets_never_leak(moto_server, s3_bucket, s3_options, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"s3://{s3_bucket}/secret"
    texts = []
    with Orchestrator(conf_for("sequential", s3_options), out_dir=url) as orch:
        cars_app.run_pipeline(orch, tile=(128, 128), size=(128, 128))
        texts += [repr(orch), json.dumps(orch.get_conf()), repr(orch.out_location)]
        with pytest.raises(TaskFailedError) as failed:
            _single_stage(orch, failing_tile, (128, 128), (64, 64))
        texts.append(str(failed.value))
    remote = Location.parse(url, s3_options)
    texts.append(remote.join("metadata.json").read_text())
    for name in ("stage1.zarr", "stage2.zarr", "field.zarr"):
        group = zarr.open_group(remote.join(name).zarr_store(read_only=True), mode="r")
        texts.append(json.dumps(group.attrs.asdict(), default=str))
        for _, node in group.members(max_depth=None):
            texts.append(json.dumps(node.attrs.asdict(), default=str))
    for bad in (f"s3://no-such-bucket-{s3_bucket}/x",):
        with pytest.raises(StorageError) as info:
            Orchestrator(conf_for("sequential", s3_options), out_dir=bad)
        texts += [str(info.value), repr(info.value)]
    assert len(texts) > 8
    for text in texts:
        assert TEST_SECRET not in text and TEST_KEY not in text
    assert TEST_SECRET not in caplog.text


# -- bad input -------------------------------------------------------------------------------------


def _fails_fast(exc_type: type[Exception], conf: dict[str, Any], out_dir: str) -> str:
    start = time.perf_counter()
    with pytest.raises(exc_type) as info:
        Orchestrator(conf, out_dir=out_dir)
    assert time.perf_counter() - start < FAST
    message = str(info.value)
    assert TEST_SECRET not in message
    return message


def test_missing_bucket_fails_fast(moto_server, s3_options):
    url = "s3://zarr-orch-no-such-bucket/run"
    message = _fails_fast(StorageError, conf_for("sequential", s3_options), url)
    assert url in message and "does not exist" in message


def test_unreachable_endpoint_fails_fast(moto_server):
    options = moto_server.options()
    options["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    message = _fails_fast(StorageError, conf_for("sequential", options), "s3://bucket/run")
    assert "s3://bucket/run" in message and "attempts" in message


def test_wrong_credentials_fail_fast(moto_server):
    """A second server that checks credentials (moto's IAM auth: no initial free requests)."""
    strict = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    strict.start()
    try:
        options = strict.options(key="AKIAWRONGKEY0000", secret=TEST_SECRET)
        message = _fails_fast(StorageError, conf_for("sequential", options), "s3://bucket/run")
        assert "s3://bucket/run" in message and "access denied" in message
        assert "AKIAWRONGKEY0000" not in message
    finally:
        strict.stop()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://", "names no bucket"),
        ("s3:///x", "empty bucket"),
        ("nosuchproto://x/y", "unsupported URL protocol"),
        ("ftp://user:hunter2pw@127.0.0.1/x", "contains a password"),
    ],
)
def test_malformed_urls_fail_fast(url, match):
    message = _fails_fast(ConfigurationError, {"mode": "sequential"}, url)
    assert match in message and "hunter2pw" not in message


def test_known_but_missing_backend_says_what_to_install():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        message = _fails_fast(ConfigurationError, {"mode": "sequential"}, "gcs://bucket/x")
        assert "not installed" in message and "gcsfs" in message
    else:
        pytest.skip("gcsfs is installed")
