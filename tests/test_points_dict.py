"""Points (pandas DataFrame tiles) and dict (CarsDict tiles) datasets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr
from app_tasks import dict_tile, points_tile, points_without_id, schedule_cells

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator, generate_tiling_grid

GRID = generate_tiling_grid(0, 0, 2, 3, 1, 1)  # 2x3 cells
NB_POINTS = 5


def points_dataset(name: str = "pc") -> CarsDataset:
    cds = CarsDataset("points", name=name)
    cds.tiling_grid = GRID
    return cds


def expected_points() -> pd.DataFrame:
    frames = []
    for row in range(2):
        for col in range(3):
            frame = points_tile(
                {"cars_ds_key": 0, "cars_ds_row": row, "cars_ds_col": col}, NB_POINTS
            )
            frame["tile_row"], frame["tile_col"] = row, col
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_points_saved_one_subgroup_per_tile_and_read_back(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = points_dataset()
        orch.add_to_save_lists("points.laz", "points", cds, cars_ds_name="pc")
        schedule_cells(orch, cds, points_tile, NB_POINTS)
        assert orch.breakpoint() is False  # CARS 1.3: True only when cropped
    group = zarr.open_group(str(out_dir / "points.zarr"), mode="r")
    assert group.attrs["zarr_orch"]["kind"] == "points"
    tiles = sorted(k for k in group.group_keys() if k.startswith("tile_"))
    assert tiles == [f"tile_{r}_{c}" for r in range(2) for c in range(3)]
    sub = group["tile_1_2"]
    assert sub.attrs["columns"] == ["x", "y", "z", "classif", "global_id"]
    assert sub.attrs["nb_points"] == NB_POINTS
    assert sub["z"].dtype == np.float32 and sub["classif"].dtype == np.uint8
    frame = zo.read_points(str(out_dir / "points.zarr"))
    assert isinstance(frame, pd.DataFrame) and len(frame) == 6 * NB_POINTS
    pd.testing.assert_frame_equal(frame, expected_points(), check_dtype=True)


def test_points_replaced_tiles_are_dataframes(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = points_dataset()
        orch.add_to_replace_lists(cds)
        schedule_cells(orch, cds, points_tile, NB_POINTS)
        orch.breakpoint()
        tile = cds[1, 0]
        assert isinstance(tile, pd.DataFrame) and len(tile) == NB_POINTS
        assert tile.attrs["saving_info"]["cars_ds_row"] == 1
        assert (tile["x"] == np.arange(NB_POINTS)).all()


def test_points_saved_by_pair_split_on_global_id(conf, out_dir):
    names = ["left_right", "left_other"]
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = points_dataset()
        orch.add_to_save_lists("pc.csv", "points", cds, save_points_cloud_by_pair=True)
        schedule_cells(orch, cds, points_tile, NB_POINTS, names)
        orch.breakpoint()
    group = zarr.open_group(str(out_dir / "pc.zarr"), mode="r")
    sub = group["tile_0_1"]
    assert sub.attrs["pairs"] == names
    assert sorted(sub.group_keys()) == sorted(names)
    assert sub["left_right"].attrs["nb_points"] == 3  # ids 0, 2, 4
    assert sub["left_other"].attrs["nb_points"] == 2  # ids 1, 3
    assert sub.attrs["attrs"]["attributes"]["source_pc_names"] == names
    frame = zo.read_points(str(out_dir / "pc.zarr"))
    assert len(frame) == 6 * NB_POINTS
    assert set(frame["pair"]) == set(names)
    by_pair = frame.groupby("pair")["global_id"].unique()
    assert list(by_pair["left_right"]) == [0] and list(by_pair["left_other"]) == [1]


def test_points_by_pair_without_global_id_fails_naming_the_tile(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = points_dataset()
        orch.add_to_save_lists("pc.csv", "points", cds, save_points_cloud_by_pair=True)
        schedule_cells(orch, cds, points_without_id)
        with pytest.raises(zo.TaskFailedError) as error:
            orch.breakpoint()
    assert "tile (row=0, col=0) of pc: save_points_cloud_by_pair needs a 'global_id' column" in str(
        error.value
    )


def test_wrong_tile_type_in_points_dataset(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = points_dataset()
        orch.add_to_save_lists("pc.csv", "points", cds)
        schedule_cells(orch, cds, dict_tile, 1.0)
        with pytest.raises(zo.TaskFailedError, match="a points dataset needs DataFrames"):
            orch.breakpoint()


def test_dict_dataset_saved_and_read(conf, out_dir):
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = CarsDataset("dict", name="stats")
        cds.tiling_grid = GRID
        orch.add_to_save_lists("stats", "stats", cds)
        orch.add_to_replace_lists(cds)
        schedule_cells(orch, cds, dict_tile, 0.5)
        orch.breakpoint()
        assert isinstance(cds[1, 1], zo.CarsDict)
        assert cds[1, 1].data["value"] == 2.0
    dicts = zo.read_dicts(str(out_dir / "stats.zarr"))
    assert sorted(dicts) == [(r, c) for r in range(2) for c in range(3)]
    assert dicts[(1, 2)] == {
        "cell": [1, 2],
        "value": 0.5 * 2 * 3,
        "vector": [0, 1, 2],
        "nested": {"name": "tile_1_2"},
    }
    json.dumps(dicts[(0, 0)])  # plain JSON types
    group = zarr.open_group(str(out_dir / "stats.zarr"), mode="r")
    assert group["tile_0_0"].attrs["attrs"]["attributes"] == {"scale": 0.5}
    assert "saving_info" not in group["tile_0_0"].attrs["attrs"]
    with pytest.raises(zo.ProductError, match="is a 'dict' product"):
        zo.open_product(str(out_dir / "stats.zarr"))
    with pytest.raises(zo.ProductError, match="not a points product"):
        zo.read_points(str(out_dir / "stats.zarr"))


def test_points_product_only_counts_done_tiles(conf, out_dir):
    """A tile that failed is absent from read_points; the others are there."""
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = points_dataset()
        orch.add_to_save_lists("pc.laz", "points", cds)
        schedule_cells(orch, cds, points_tile, NB_POINTS)
        cds[1, 1] = None  # no work for this cell
        orch.breakpoint()
    frame = zo.read_points(str(out_dir / "pc.zarr"))
    assert len(frame) == 5 * NB_POINTS
    assert (1, 1) not in set(zip(frame["tile_row"], frame["tile_col"], strict=True))
