"""Bad input: each gets a clear error, and a product written before stays intact on disk."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr
from app_tasks import (
    array_tile,
    arrays_dataset,
    cropped_tile,
    dataframe_tile,
    full_field,
    no_saving_info_tile,
    profile_for,
    schedule,
    shifted_window_tile,
    wrong_cell_tile,
)

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format import records as rec

H, W, TILE = 60, 90, (32, 48)


def snapshot(out_dir):
    """Values of every array of the reference product, records included (raw)."""
    group = zarr.open_group(str(out_dir / "ds.zarr"), mode="r")
    arrays = {name: group[name][...] for name in group.array_keys()}
    store = group.store  # format 2: records are plain objects beside the Zarr nodes
    arrays.update(
        {f"records/{n}": rec.open_records(store, n)[...] for n in rec.find_records(store)}
    )
    info = group.attrs["zarr_orch"]  # the layout; run bookkeeping (run_id...) may change
    layout = {k: info[k] for k in ("kind", "tags", "tile_size", "tile_grid_shape", "extent")}
    return arrays, layout


def assert_intact(out_dir, before):
    arrays, attrs = snapshot(out_dir)
    assert set(arrays) == set(before[0])
    for name, values in before[0].items():
        np.testing.assert_array_equal(arrays[name], values, err_msg=name)
    assert attrs == before[1]
    np.testing.assert_array_equal(arrays["hgt"], full_field(H, W))


@pytest.fixture
def written(conf, out_dir):
    """A reference product ds.zarr (tag hgt, float32, nodata -9999) written by a first run."""
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W))
    return snapshot(out_dir)


# -- configuration -----------------------------------------------------------------------------


def test_unknown_mode_lists_the_modes(written, out_dir):
    with pytest.raises(zo.ConfigurationError) as info:
        Orchestrator({"mode": "bogus"}, out_dir=out_dir)
    message = str(info.value)
    assert "unknown orchestrator mode 'bogus'" in message
    assert "choose one of:" in message and "sequential" in message
    assert "multiprocessing" in message
    assert_intact(out_dir, written)


def test_memory_store_with_worker_processes_is_refused_before_anything_runs():
    conf = {"mode": "multiprocessing", "nb_workers": 1, "progress": False}
    with (
        pytest.raises(zo.ConfigurationError) as info,
        Orchestrator(conf, out_dir="memory://zarr-orch-refused/run") as orch,
    ):
        cds = arrays_dataset(H, W, TILE, name="mem")
        orch.add_to_save_lists("mem.tif", "hgt", cds)
        schedule(orch, cds, array_tile, profile_for(H, W))
        orch.breakpoint()
    message = str(info.value)
    assert "memory://zarr-orch-refused/run/mem.zarr is in the memory of this process" in message
    assert "the tiles would be lost" in message and "Use mode 'sequential'" in message
    assert not Location.parse("memory://zarr-orch-refused/run/mem.zarr").exists()


def test_unknown_conf_key_suggests_and_lists_valid_keys(written, out_dir):
    with pytest.raises(zo.ConfigurationError) as info:
        Orchestrator({"mode": "sequential", "max_retry": 1, "zzz": 0}, out_dir=out_dir)
    message = str(info.value)
    assert "'max_retry' (did you mean 'max_retries'?)" in message
    assert "'zzz'" in message
    assert "valid keys are:" in message
    for key in ("max_retries", "task_timeout", "storage_options", "mode"):
        assert key in message.split("valid keys are:")[1]
    assert_intact(out_dir, written)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"task_timeout": -1}, "task_timeout must be a number of seconds > 0 or null, got -1"),
        ({"task_timeout": "10"}, "task_timeout must be a number of seconds > 0"),
        ({"max_retries": "x"}, "max_retries must be an integer >= 0, got 'x'"),
        ({"max_retries": -2}, "max_retries must be an integer >= 0, got -2"),
        ({"max_retries": True}, "max_retries must be an integer >= 0, got True"),
        ({"storage_options": 3}, "storage_options must be a mapping"),
        ({"progress": "yes"}, 'progress must be true, false or "auto"'),
        ({"mode": 3}, "mode must be a string"),
    ],
)
def test_bad_conf_values(written, out_dir, bad, message):
    with pytest.raises(zo.ConfigurationError, match=message.replace("(", r"\(")):
        Orchestrator({"mode": "sequential", **bad}, out_dir=out_dir)
    assert_intact(out_dir, written)


def test_conf_that_is_not_a_dict(out_dir):
    with pytest.raises(zo.ConfigurationError, match="must be a dict or None, got list"):
        Orchestrator(["sequential"], out_dir=out_dir)


def test_out_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(zo.ConfigurationError, match="exists and is not a directory"):
        Orchestrator({"mode": "sequential"}, out_dir=path)
    assert path.read_text() == "x"


# -- registration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "uint8", "nodata": -9999}, r"nodata -9999 does not fit dtype uint8"),
        (
            {"dtype": "int16", "nodata": float("nan")},
            "nodata nan cannot be stored in dtype int16: integer dtypes need an integer nodata",
        ),
        ({"dtype": "complex64", "nodata": 0}, "dtype complex64 cannot be saved"),
        ({"dtype": "no_such_dtype", "nodata": 0}, "is not a numpy dtype"),
        ({"tag": "a/b"}, "tag 'a/b' is not a valid name"),
        ({"tag": "_hidden"}, "tag '_hidden' is not a valid name"),
        ({"tag": "row"}, "tag 'row' is reserved for coordinates"),
        ({"file_name": ""}, "file_name is empty"),
        ({"file_name": 42}, "file_name must be a path or URL"),
    ],
)
def test_bad_save_registration(written, conf, out_dir, kwargs, message):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="ds")
        args = {"file_name": "ds.tif", "tag": "hgt", "dtype": "float32", "nodata": -9999}
        args.update(kwargs)
        with pytest.raises(zo.ConfigurationError, match=message):
            orch.add_to_save_lists(args.pop("file_name"), args.pop("tag"), cds, **args)
        assert not orch.registries
    assert_intact(out_dir, written)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"dtype": "int16", "nodata": -9999}, "cannot also be saved with dtype int16"),
        ({"dtype": "float32", "nodata": 0}, "and nodata 0.0"),
    ],
)
def test_same_tag_registered_twice_with_conflicts(written, conf, out_dir, second, message):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="twice")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)  # same: ok
        with pytest.raises(zo.ConfigurationError) as info:
            orch.add_to_save_lists("ds.tif", "hgt", cds, **second)
        assert (
            "tag 'hgt' of twice is already registered for 'ds.tif' with dtype float32 and "
            "nodata -9999" in str(info.value)
        )
        assert message in str(info.value)
        orch.reset_registries()
    assert_intact(out_dir, written)


def test_registering_something_that_is_not_a_dataset(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        with pytest.raises(zo.ConfigurationError, match="expected a CarsDataset, got dict"):
            orch.add_to_replace_lists({"tiles": []})
        with pytest.raises(zo.ConfigurationError, match="has no tiling grid yet"):
            orch.add_to_save_lists("x.tif", "hgt", CarsDataset("arrays", name="nogrid"))


@pytest.mark.parametrize("file_name", ["../x.tif", "sub/../../x.tif", "a/zarr.json"])
def test_path_traversal_in_file_name_is_refused(written, conf, out_dir, file_name):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="escape")
        with pytest.raises(zo.ConfigurationError, match="may not climb out of the output"):
            orch.add_to_save_lists(file_name, "hgt", cds)
        assert not orch.registries
    assert not (out_dir.parent / "x.zarr").exists()
    assert_intact(out_dir, written)


def test_absolute_file_name_is_an_explicit_location(conf, out_dir, tmp_path):
    target = tmp_path / "elsewhere" / "abs.tif"
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="abs")
        orch.add_to_save_lists(str(target), "hgt", cds)
        schedule(orch, cds, array_tile, profile_for(H, W))
    stored = zarr.open_group(str(tmp_path / "elsewhere" / "abs.zarr"), mode="r")["hgt"][...]
    np.testing.assert_array_equal(stored, full_field(H, W))
    assert orch.products == {str(target): str(tmp_path / "elsewhere" / "abs.zarr")}


# -- refused at the breakpoint, before anything is written -------------------------------------


def test_a_grid_that_is_no_chunk_grid_is_merged_by_the_main_process(written, conf, out_dir, caplog):
    """A skewed grid (tile row 1 starts at row 30, inside row 0's chunk) follows no chunk
    grid: its tiles are merged by the main process at their windows (docs/windowed_products.md),
    the overlap is logged (the later tile in tile order wins), other products are unchanged."""
    with Orchestrator(conf, out_dir=out_dir) as orch:
        good = arrays_dataset(H, W, TILE, name="good")
        orch.add_to_save_lists("good.tif", "hgt", good)
        schedule(orch, good, array_tile, profile_for(H, W))
        bad = CarsDataset("arrays", name="skewed")
        grid = np.array(arrays_dataset(H, W, TILE).tiling_grid)
        grid[1, :, 0] = 30  # tile row 1 starts at 30, not on a 32-row chunk boundary
        bad.tiling_grid = grid
        orch.add_to_save_lists("skewed.tif", "hgt", bad)
        schedule(orch, bad, array_tile, profile_for(H, W))
        orch.breakpoint()
    for name in ("good", "skewed"):
        stored = zarr.open_group(str(out_dir / f"{name}.zarr"), mode="r")
        np.testing.assert_array_equal(stored["hgt"][...], full_field(H, W), err_msg=name)
        assert stored.attrs["zarr_orch"]["windowed"] is (name == "skewed")
    [warning] = [r.getMessage() for r in caplog.records if "overlaps" in r.getMessage()]
    assert "tile (row=1, col=0) of skewed window rows [30, 60)" in warning
    assert_intact(out_dir, written)


@pytest.mark.parametrize(
    ("tile", "dtype", "message"),
    [
        ((30, 45), "float32", "tile_size: was [32, 48], now [30, 45]"),
        (TILE, "int16", "tags: was [['hgt', 'float32', -9999.0]], now [['hgt', 'int16', -9999]]"),
    ],
)
def test_existing_product_with_another_layout_is_refused(
    written, conf, out_dir, tile, dtype, message
):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, tile, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype=dtype, nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W))
        with pytest.raises(zo.ProductError) as info:
            orch.breakpoint()
        text = str(info.value)
        assert (
            f"{out_dir / 'ds.zarr'} already holds ds tiles made with another configuration" in text
        )
        assert message in text
        assert "set resume: false" in text and "or use another out_dir" in text
    assert_intact(out_dir, written)


def test_foreign_zarr_group_is_refused(written, conf, out_dir):
    foreign = zarr.open_group(str(out_dir / "foreign.zarr"), mode="w", zarr_format=3)
    foreign.create_array("data", shape=(3,), dtype="int32")[...] = [1, 2, 3]
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="intruder")
        orch.add_to_save_lists("foreign.tif", "hgt", cds)
        schedule(orch, cds, array_tile, profile_for(H, W))
        with pytest.raises(zo.ProductError, match="is a Zarr group that zarr_orch did not write"):
            orch.breakpoint()
    group = zarr.open_group(str(out_dir / "foreign.zarr"), mode="r")
    assert list(group.array_keys()) == ["data"]
    assert group["data"][...].tolist() == [1, 2, 3]
    assert_intact(out_dir, written)


def test_one_tag_saved_by_two_datasets_is_refused(written, conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        for name in ("first", "second"):
            cds = arrays_dataset(H, W, TILE, name=name)
            orch.add_to_save_lists("ds.tif", "hgt", cds, nodata=-9999, cars_ds_name=name)
            schedule(orch, cds, array_tile, profile_for(H, W))
        with pytest.raises(
            zo.ConfigurationError, match=r"saved by two datasets \(first and second\)"
        ):
            orch.breakpoint()
    assert_intact(out_dir, written)


# -- bad tiles: the task fails with a message naming the tile ----------------------------------


@pytest.mark.parametrize(
    ("func", "args", "message"),
    [
        (no_saving_info_tile, (), "the task returned a tile without attrs['saving_info']"),
        (wrong_cell_tile, (), "names dataset key 0, row 7"),
        (shifted_window_tile, (profile_for(H, W), 64), "is outside the 60x90 raster"),
        (cropped_tile, (profile_for(H, W),), "disagrees with its window"),
        (dataframe_tile, (), "is a DataFrame; an 'arrays' dataset needs xarray.Dataset tiles"),
    ],
)
def test_bad_tiles_fail_their_task_and_leave_the_product_intact(
    written, conf, out_dir, func, args, message
):
    # resume off: the tiles are recomputed (and fail) instead of being skipped as done
    with Orchestrator(dict(conf, resume=False), out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, func, *args)
        with pytest.raises(zo.TaskFailedError) as info:
            orch.breakpoint()
        text = str(info.value)
        assert "task for tile (row=0, col=0) of ds failed: TileError" in text
        assert message in text
        assert info.value.failures and len(info.value.failures) == 4
    assert_intact(out_dir, written)


def test_missing_non_optional_tag_only_warns(written, conf, out_dir, caplog):
    """Documented: a registered tag absent from a tile is a warning, not an error (CARS)."""
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        orch.add_to_save_lists("ds.tif", "absent", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W))
        with caplog.at_level(logging.WARNING):
            orch.breakpoint()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "tile (row=0, col=1) of ds has no tag 'absent': nothing saved for it" in warnings
    group = zarr.open_group(str(out_dir / "ds.zarr"), mode="r")
    assert "absent" not in group.array_keys()
    np.testing.assert_array_equal(group["hgt"][...], full_field(H, W))
