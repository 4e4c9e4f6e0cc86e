"""Every public method of Orchestrator, the module helpers, and CARS behaviours to keep or fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from app_tasks import (
    accumulate_final,
    add_one,
    array_tile,
    arrays_dataset,
    constant_tile,
    failing_tile,
    full_field,
    marker_tile,
    profile_for,
    schedule,
    two_outputs,
    values_tile,
)

import zarr_orch as zo
from zarr_orch import Orchestrator, flatten_object, update_saving_infos
from zarr_orch.cluster.graph import Delayed
from zarr_orch.conf import CARS_KEYS, COMMON_OPTIONS
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict

H, W, TILE = 60, 90, (32, 48)  # 2x2 tiles, edge tiles smaller


def read(out: Path, product: str, tag: str) -> np.ndarray:
    """A product's tag as stored (no decoding)."""
    return zarr.open_group(str(out / product), mode="r")[tag][...]


def saved_dataset(orch, name="ds", file_name="ds.tif", nodata=-9999, overlap=0, **kwargs):
    """An arrays dataset of `array_tile`s, registered for saving its ``hgt`` tag."""
    cds = arrays_dataset(H, W, TILE, overlap, name=name)
    orch.add_to_save_lists(file_name, "hgt", cds, dtype="float32", nodata=nodata, cars_ds_name=name)
    schedule(orch, cds, array_tile, profile_for(H, W), **kwargs)
    return cds


# -- configuration -----------------------------------------------------------------------------


def test_get_conf_is_fully_defaulted(seq_conf, out_dir):
    with Orchestrator({"mode": "sequential"}, out_dir=out_dir) as orch:
        conf = orch.get_conf()
        cars_keys = {key for key, spec in CARS_KEYS.items() if "sequential" in spec.modes}
        assert set(conf) == set(COMMON_OPTIONS) | set(type(orch.cluster).CONF_OPTIONS) | cars_keys
        assert conf["mode"] == "sequential"
        assert conf["task_timeout"] == 600.0
        assert conf["max_retries"] == 2
        assert conf["storage_options"] == {}
        # a copy: changing it does not change the orchestrator
        conf["max_retries"] = 99
        assert orch.get_conf()["max_retries"] == 2


def test_get_conf_masks_secrets(out_dir):
    conf = {"mode": "sequential", "storage_options": {"secret": "s3cr3t", "anon": False}}
    with Orchestrator(conf, out_dir=out_dir) as orch:
        got = orch.get_conf()
        assert got["storage_options"] == {"secret": "***", "anon": False}
        assert "s3cr3t" not in repr(orch) and "s3cr3t" not in json.dumps(got)


# -- cleanup, temp dirs, metadata paths --------------------------------------------------------


def test_add_to_clean_removes_directories_at_exit(seq_conf, out_dir, tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "deep").mkdir(parents=True)
    (scratch / "deep" / "file.bin").write_bytes(b"x")
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        orch.add_to_clean(str(scratch))
        assert scratch.exists()
    assert not scratch.exists()
    assert out_dir.exists()  # out_dir itself is kept


def test_out_dir_none_uses_a_temp_dir_removed_at_exit(seq_conf):
    with Orchestrator(seq_conf) as orch:
        tmp = Path(orch.out_dir)
        assert tmp.is_dir()
        saved_dataset(orch)
        orch.breakpoint()
        assert (tmp / "ds.zarr").is_dir()
    assert not tmp.exists()


def test_out_json_path_default_and_explicit(seq_conf, out_dir, tmp_path):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        assert orch.out_json_path == str(out_dir / "metadata.json")
        saved_dataset(orch)
    assert json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]["products"]
    explicit = tmp_path / "elsewhere" / "run.json"
    with Orchestrator(seq_conf, out_dir=tmp_path / "out2", out_json_path=explicit) as orch:
        orch.update_out_info({"user": 1})
    assert json.loads(explicit.read_text())["user"] == 1
    assert not (tmp_path / "out2" / "metadata.json").exists()


def test_save_out_json_and_update_out_info_deep_merge(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        orch.update_out_info({"app": {"a": 1, "nested": {"x": 1, "y": 2}}, "keep": "me"})
        orch.update_out_info({"app": {"b": np.float32(2.5), "nested": {"y": 3}}})
        orch.update_out_info(
            {"arrays": {"vec": np.arange(3), "int": np.int64(7), "flag": np.bool_(True)}}
        )
        orch.save_out_json()
        content = json.loads((out_dir / "metadata.json").read_text())
        assert content["app"] == {"a": 1, "b": 2.5, "nested": {"x": 1, "y": 3}}
        assert content["keep"] == "me"
        assert content["arrays"] == {"vec": [0, 1, 2], "int": 7, "flag": True}
        run = content["zarr_orch"]
        assert run["conf"]["mode"] == "sequential"
        assert run["run_id"] == orch.run_id
        with pytest.raises(zo.ConfigurationError, match="needs a dict"):
            orch.update_out_info(["not", "a", "dict"])


def test_update_out_info_copies_its_input(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        user = {"app": {"values": [1, 2]}}
        orch.update_out_info(user)
        user["app"]["values"].append(3)
        orch.save_out_json()
    assert json.loads((out_dir / "metadata.json").read_text())["app"]["values"] == [1, 2]


# -- ids and saving infos ----------------------------------------------------------------------


def test_ids_are_stable_and_distinct(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        first = arrays_dataset(H, W, TILE, name="first")
        second = arrays_dataset(H, W, TILE, name="second")
        [before] = orch.get_saving_infos([first])
        orch.add_to_save_lists("a.tif", "hgt", first)
        orch.add_to_replace_lists(first)
        orch.add_to_compute_lists(first)
        [after] = orch.get_saving_infos([first])
        assert before == after == {"cars_ds_key": before["cars_ds_key"]}
        infos = orch.get_saving_infos([first, second, first])
        assert infos[0] == infos[2] == before
        assert infos[1]["cars_ds_key"] != before["cars_ds_key"]
        # one dataset in several registries is tracked once, under one id
        assert list(orch.registries.datasets) == [before["cars_ds_key"]]
        orch.reset_registries()
        # ids stay stable for the orchestrator's lifetime
        assert orch.get_saving_infos([first, second]) == infos[:2]


def test_update_saving_infos_returns_a_copy():
    info = {"cars_ds_key": 3}
    full = update_saving_infos(info, row=1, col=2)
    assert full == {"cars_ds_key": 3, "cars_ds_row": 1, "cars_ds_col": 2}
    assert info == {"cars_ds_key": 3}
    again = update_saving_infos(full, row=np.int64(4))
    assert again == {"cars_ds_key": 3, "cars_ds_row": 4, "cars_ds_col": 2}
    assert type(again["cars_ds_row"]) is int
    assert full["cars_ds_row"] == 1
    assert update_saving_infos(info) == info and update_saving_infos(info) is not info


def test_flatten_object_dedupes_keeps_order_and_filters_by_type(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        first = arrays_dataset(H, W, TILE, name="first")
        second = arrays_dataset(H, W, TILE, name="second")
        schedule(orch, first, array_tile)
        second[0, 1] = "not delayed"
        second[1, 0] = orch.cluster.create_task(array_tile)({"row_min": 0}, {}, {"cars_ds_key": 1})
        flat = flatten_object([first, None, second, first], Delayed)
        expected = [first[0, 0], first[0, 1], first[1, 0], first[1, 1], second[1, 0]]
        assert len(flat) == 5
        assert all(a is b for a, b in zip(flat, expected, strict=True))
        assert flatten_object([second], str) == ["not delayed"]
        assert flatten_object([], Delayed) == []


# -- registration and breakpoints --------------------------------------------------------------


def test_add_to_save_lists_and_breakpoint_write_products(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = saved_dataset(orch, overlap=3)
        assert orch.breakpoint() is False  # CARS 1.3: True only when cropped
        # saved but not replaced: the dataset's cells are not brought back as tiles
        assert not any(isinstance(t, xr.Dataset) for line in cds.tiles for t in line)
    np.testing.assert_array_equal(read(out_dir, "ds.zarr", "hgt"), full_field(H, W))


def test_add_to_replace_lists_brings_tiles_back(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2)
        orch.add_to_replace_lists(cds, cars_ds_name="replaced")
        schedule(orch, cds, array_tile, None)
        orch.breakpoint()
        ref = full_field(H, W)
        for row in range(2):
            for col in range(2):
                tile = cds[row, col]
                assert isinstance(tile, xr.Dataset)
                window = tile.attrs["window"]
                ov = tile.attrs["overlaps"]
                np.testing.assert_array_equal(
                    tile["hgt"].values,
                    ref[
                        window["row_min"] - ov["up"] : window["row_max"] + ov["down"],
                        window["col_min"] - ov["left"] : window["col_max"] + ov["right"],
                    ],
                )
    assert not (out_dir / "replaced.zarr").exists()
    assert orch.products == {}


def test_add_to_compute_lists_runs_side_effects_and_saves_nothing(conf, out_dir, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE)
        orch.add_to_compute_lists(cds, cars_ds_name="computed")
        schedule(orch, cds, marker_tile, str(markers))
        assert orch.breakpoint() is False  # CARS 1.3: True only when cropped
        # results are not kept in the main process
        assert not any(isinstance(t, xr.Dataset) for line in cds.tiles for t in line)
    assert sorted(p.name for p in markers.iterdir()) == [
        "marker_0_0",
        "marker_0_1",
        "marker_1_0",
        "marker_1_1",
    ]
    # nothing saved: only the run's metadata and its log
    assert sorted(p.name for p in out_dir.iterdir()) == ["logs", "metadata.json"]


def test_multiple_breakpoints_and_empty_breakpoint(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        saved_dataset(orch, name="one", file_name="one.tif")
        assert orch.breakpoint() is False  # CARS 1.3: True only when cropped
        stats = dict(orch._stats)
        # nothing new registered: nothing happens
        assert orch.breakpoint() is False
        assert orch._stats == stats
        saved_dataset(orch, name="two", file_name="two.tif", offset=5.0)
        assert orch.breakpoint() is False  # CARS 1.3: True only when cropped
        assert orch._stats["breakpoints"] == 2
        assert orch._stats["tiles"] == 8
    np.testing.assert_array_equal(read(out_dir, "one.zarr", "hgt"), full_field(H, W))
    np.testing.assert_array_equal(read(out_dir, "two.zarr", "hgt"), full_field(H, W, 5.0))


def test_compute_futures_directly_and_only_remaining(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        cds = saved_dataset(orch, nodata=-1)
        # only two of the four tasks
        assert orch.compute_futures(only_remaining_delayed=[cds[0, 0], cds[1, 1]]) is False
        stored = read(out_dir, "ds.zarr", "hgt")
        ref = full_field(H, W)
        np.testing.assert_array_equal(stored[:32, :48], ref[:32, :48])
        np.testing.assert_array_equal(stored[32:, 48:], ref[32:, 48:])
        assert (stored[:32, 48:] == -1).all() and (stored[32:, :48] == -1).all()
        # compute_futures does not reset the registries (breakpoint does)
        assert orch.registries
        assert orch.compute_futures() is False
        np.testing.assert_array_equal(read(out_dir, "ds.zarr", "hgt"), ref)
        orch.reset_registries()
        assert not orch.registries
        assert orch.compute_futures() is False


def test_launch_worker_false_computes_nothing(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir, launch_worker=False) as orch:
        saved_dataset(orch)
        assert orch.breakpoint() is False
    assert not (out_dir / "ds.zarr").exists()


def test_reset_registries_forgets_registrations(seq_conf, out_dir):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        saved_dataset(orch)
        orch.reset_registries()
        assert orch.breakpoint() is False
    assert not (out_dir / "ds.zarr").exists()


def test_reset_cluster_gives_a_working_fresh_cluster(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        old = orch.cluster
        orch.reset_cluster()
        assert orch.cluster is not old
        assert type(orch.cluster) is type(old)
        assert orch.cluster.get_conf() == old.get_conf()
        saved_dataset(orch)
        assert orch.breakpoint() is False  # CARS 1.3: True only when cropped
    np.testing.assert_array_equal(read(out_dir, "ds.zarr", "hgt"), full_field(H, W))


def test_enter_returns_self_and_exit_runs_pending_work(conf, out_dir):
    orch = Orchestrator(conf, out_dir=out_dir)
    with orch as entered:
        assert entered is orch
        saved_dataset(orch)  # no explicit breakpoint: __exit__ computes it
    np.testing.assert_array_equal(read(out_dir, "ds.zarr", "hgt"), full_field(H, W))
    assert json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]["stats"]["tiles"] == 4


def test_with_body_raising_starts_nothing_cleans_up_and_propagates(conf, out_dir, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    orch = Orchestrator(conf, out_dir=out_dir)
    with pytest.raises(KeyError, match="application bug"), orch:
        orch.add_to_clean(str(scratch))
        cds = arrays_dataset(H, W, TILE)
        orch.add_to_save_lists("ds.tif", "hgt", cds)
        schedule(orch, cds, marker_tile, str(markers))
        raise KeyError("application bug")
    assert list(markers.iterdir()) == []  # pending tasks were not started
    assert not (out_dir / "ds.zarr").exists()
    assert not scratch.exists()  # cleanup ran
    assert orch._closed


# -- get_data ----------------------------------------------------------------------------------


def test_get_data_before_and_after_writing(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, nodata=-9999)
        orch.add_to_replace_lists(cds)
        schedule(orch, cds, array_tile, profile_for(H, W))
        probe = array_tile(
            window_array_to_dict(cds.tiling_grid[1, 1]),
            overlap_array_to_dict(cds.overlaps[1, 1]),
            update_saving_infos(orch.get_saving_infos([cds])[0], row=1, col=1),
        )
        assert orch.get_data("hgt", probe) == (None, None)  # nothing written yet
        orch.breakpoint()
        data, nodata = orch.get_data("hgt", cds[1, 1])
        np.testing.assert_array_equal(data, full_field(H, W)[32:, 48:])
        assert nodata == -9999
        assert orch.get_data("not_a_tag", cds[1, 1]) == (None, None)
        assert orch.get_data("hgt", xr.Dataset()) == (None, None)


def test_get_data_in_final_function_read_modify_write(conf, out_dir):
    """CARS's accumulation: a final_function merges what is on disk into the new tile."""
    with Orchestrator(conf, out_dir=out_dir) as orch:
        results = []
        for value in (1.0, 2.0, 4.0):
            cds = arrays_dataset(H, W, TILE, overlap=1, name=f"acc_{value}")
            cds.final_function = accumulate_final
            orch.add_to_save_lists("acc.tif", "count", cds, dtype="float32", nodata=-1)
            orch.add_to_replace_lists(cds)
            schedule(orch, cds, constant_tile, profile_for(H, W), value=value, tag="count")
            orch.breakpoint()
            results.append(
                [cds[r, c].attrs["attributes"]["had_old"] for r in range(2) for c in range(2)]
            )
    # as CARS's saver: get_data reads the window from disk once any tile of the product
    # was merged (unwritten pixels read as nodata), so only the very first tile gets None
    assert results == [[False, True, True, True], [True] * 4, [True] * 4]
    np.testing.assert_array_equal(read(out_dir, "acc.zarr", "count"), np.full((H, W), 7.0))


def test_all_nodata_tiles_are_done_and_read_as_nodata(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="empty")
        orch.add_to_save_lists("empty.tif", "hgt", cds, dtype="float32", nodata=-9999)
        orch.add_to_replace_lists(cds)
        schedule(orch, cds, constant_tile, profile_for(H, W), value=np.nan)
        orch.breakpoint()
        data, nodata = orch.get_data("hgt", cds[0, 1])
        assert nodata == -9999 and data.shape == (32, 42) and (data == -9999).all()
    array = zarr.open_group(str(out_dir / "empty.zarr"), mode="r")["hgt"]
    assert array.nchunks_initialized == 0  # zarr stores no all-fill chunk ...
    assert (array[...] == -9999).all()
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert meta["zarr_orch"]["products"]["empty.tif"]["tiles_done"] == 4  # ... still done
    from zarr_orch.storage.core.location import Location
    from zarr_orch.storage.readers.windows import done_tiles

    info = zo.open_product(str(out_dir / "empty.zarr")).attrs["zarr_orch"]
    assert done_tiles(Location.parse(out_dir / "empty.zarr"), info["records"][0]) == {
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    }


# -- graphs: nout, chains ----------------------------------------------------------------------


def test_nout_2_task_feeds_two_datasets(conf, out_dir, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    with Orchestrator(conf, out_dir=out_dir) as orch:
        left = arrays_dataset(H, W, TILE, name="left")
        right = arrays_dataset(H, W, TILE, name="right")
        orch.add_to_save_lists("left.tif", "hgt", left)
        orch.add_to_save_lists("right.tif", "hgt", right)
        info_l, info_r = orch.get_saving_infos([left, right])
        task = orch.cluster.create_task(two_outputs, nout=2)
        for row in range(2):
            for col in range(2):
                outputs = task(
                    window_array_to_dict(left.tiling_grid[row, col]),
                    overlap_array_to_dict(left.overlaps[row, col]),
                    update_saving_infos(info_l, row=row, col=col),
                    update_saving_infos(info_r, row=row, col=col),
                    profile_for(H, W),
                    str(markers),
                )
                assert isinstance(outputs, tuple) and len(outputs) == 2
                left[row, col], right[row, col] = outputs
        orch.breakpoint()
    np.testing.assert_array_equal(read(out_dir, "left.zarr", "hgt"), full_field(H, W))
    np.testing.assert_array_equal(read(out_dir, "right.zarr", "hgt"), full_field(H, W, 1000.0))
    assert len(list(markers.iterdir())) == 4  # each two-output task ran once per cell


def test_chained_tasks_without_breakpoint(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        first = arrays_dataset(H, W, TILE, overlap=2, name="first")  # never registered
        schedule(orch, first, array_tile, profile_for(H, W))
        second = arrays_dataset(H, W, TILE, overlap=2, name="second")
        orch.add_to_save_lists("second.tif", "hgt", second)
        [info] = orch.get_saving_infos([second])
        task = orch.cluster.create_task(add_one)
        for row in range(2):
            for col in range(2):
                second[row, col] = task(
                    first[row, col], update_saving_infos(info, row=row, col=col)
                )
        orch.breakpoint()
    np.testing.assert_array_equal(read(out_dir, "second.zarr", "hgt"), full_field(H, W) + 1)
    assert not (out_dir / "first.zarr").exists()


# -- failures ----------------------------------------------------------------------------------


def test_task_exception_names_dataset_and_tile_and_keeps_other_tiles(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="fragile")
        orch.add_to_save_lists("fragile.tif", "hgt", cds, nodata=-9999, cars_ds_name="fragile")
        schedule(orch, cds, failing_tile, profile_for(H, W), (1, 0))
        with pytest.raises(zo.TaskFailedError) as info:
            orch.breakpoint()
        error = info.value
        assert (error.dataset_name, error.row, error.col) == ("fragile", 1, 0)
        assert "tile (row=1, col=0) of fragile" in str(error)
        assert "deliberate failure in cell (1, 0)" in str(error)
        assert "failing_tile" in error.original_traceback
        assert "ValueError" in error.original_traceback
        assert "Traceback (most recent call last)" in str(error)
        assert isinstance(error, RuntimeError)
        assert not orch.registries  # registries are reset even on failure
    stored = read(out_dir, "fragile.zarr", "hgt")
    ref = full_field(H, W)
    np.testing.assert_array_equal(stored[:32], ref[:32])
    np.testing.assert_array_equal(stored[32:, 48:], ref[32:, 48:])
    assert (stored[32:, :48] == -9999).all()
    meta = json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]
    assert meta["products"]["fragile.tif"]["tiles_done"] == 3
    assert meta["stats"]["failed"] == 1


def test_retries_are_used_before_failing(out_dir, mode):
    with Orchestrator({"mode": mode, "max_retries": 1, "progress": False}, out_dir=out_dir) as o:
        cds = arrays_dataset(H, W, TILE, name="fragile")
        o.add_to_save_lists("fragile.tif", "hgt", cds)
        schedule(o, cds, failing_tile, profile_for(H, W), (0, 0))
        with pytest.raises(zo.TaskFailedError, match=r"row=0, col=0"):
            o.breakpoint()


# -- optional data, dtypes, 3-D tags -----------------------------------------------------------


def test_optional_tag_missing_is_quiet(conf, out_dir, caplog):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="opt")
        orch.add_to_save_lists("opt.tif", "hgt", cds)
        orch.add_to_save_lists("opt.tif", "color", cds, optional_data=True)
        schedule(orch, cds, array_tile, profile_for(H, W))
        with caplog.at_level(logging.WARNING):
            orch.breakpoint()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    group = zarr.open_group(str(out_dir / "opt.zarr"), mode="r")
    assert "color" not in group.array_keys()
    np.testing.assert_array_equal(group["hgt"][...], full_field(H, W))


def test_non_optional_tag_missing_warns_naming_tile_and_tag(conf, out_dir, caplog):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="strict")
        orch.add_to_save_lists("strict.tif", "hgt", cds)
        orch.add_to_save_lists("strict.tif", "color", cds, optional_data=False)
        schedule(orch, cds, array_tile, profile_for(H, W))
        with caplog.at_level(logging.WARNING):
            orch.breakpoint()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in messages if "'color'" in m]) == 4
    assert any("tile (row=1, col=0) of strict" in m and "'color'" in m for m in messages)
    np.testing.assert_array_equal(read(out_dir, "strict.zarr", "hgt"), full_field(H, W))


def test_three_dimensional_tags(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="cube")
        orch.add_to_save_lists("cube.tif", "bands", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W), bands=3)
        orch.breakpoint()
    ds = zo.open_product(str(out_dir / "cube.zarr"))
    assert ds["bands"].dims == ("band", "row", "col")
    assert ds["bands"].chunks == ((3,), (32, 28), (48, 42))
    ref = full_field(H, W)
    np.testing.assert_array_equal(ds["bands"].values, np.stack([ref, ref * 2, ref * 3]))


def test_integer_dtype_nan_becomes_nodata_and_floats_round(conf, out_dir):
    values = np.full((H, W), 2.5, dtype="float64")
    values[:, 0] = 2.4
    values[:, 1] = -3.6
    values[0, :] = np.nan
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, (H, W), name="ints")
        orch.add_to_save_lists("ints.tif", "hgt", cds, dtype="int16", nodata=-32768)
        schedule(orch, cds, values_tile, profile_for(H, W), values)
        orch.breakpoint()
    stored = read(out_dir, "ints.zarr", "hgt")
    assert stored.dtype == np.int16
    expected = np.rint(np.nan_to_num(values, nan=-32768)).astype("int16")
    np.testing.assert_array_equal(stored, expected)
    assert stored[1, 0] == 2 and stored[1, 1] == -4 and stored[1, 2] == 2  # round half to even
    assert (stored[0] == -32768).all()
