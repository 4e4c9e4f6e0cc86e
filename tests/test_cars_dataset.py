"""Tests of zarr_orch.data.cars_dataset: CarsDataset, CarsDict, tile attrs helpers."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import zarr_orch.data as zdata
from zarr_orch import constants as cst
from zarr_orch.data import (
    CarsDataset,
    CarsDict,
    create_none,
    fill_dataframe,
    fill_dataset,
    fill_dict,
    generate_tiling_grid,
    get_attributes,
    get_attributes_dataframe,
    get_overlaps_dataset,
    get_profile_rasterio,
    get_saving_info,
    get_window_dataset,
    is_concrete_tile,
)
from zarr_orch.errors import (
    ConfigurationError,
    ProductError,
    TaskFailedError,
    TileError,
    TilingError,
    ZarrOrchError,
)


def _tile(value=1.0, shape=(2, 3)):
    return xr.Dataset({"im": ((cst.ROW, cst.COL), np.full(shape, value, dtype=np.float32))})


class _FakeDelayed:
    """Stands for a dask/MP delayed object."""


# --- constants & errors ------------------------------------------------------------


def test_constants_values():
    assert cst.DATASET_TYPES == ("arrays", "points", "dict")
    assert (cst.SAVING_INFO, cst.WINDOW, cst.OVERLAPS, cst.PROFILE, cst.ATTRIBUTES) == (
        "saving_info",
        "window",
        "overlaps",
        "profile",
        "attributes",
    )
    assert (cst.CARS_DS_KEY, cst.CARS_DS_ROW, cst.CARS_DS_COL) == (
        "cars_ds_key",
        "cars_ds_row",
        "cars_ds_col",
    )
    assert (cst.ROW_MIN, cst.ROW_MAX, cst.COL_MIN, cst.COL_MAX) == (
        "row_min",
        "row_max",
        "col_min",
        "col_max",
    )
    assert (cst.UP, cst.DOWN, cst.LEFT, cst.RIGHT) == ("up", "down", "left", "right")
    assert (cst.ROW, cst.COL, cst.BAND) == ("row", "col", "band")


def test_task_failed_error_attributes_and_pickle():
    err = TaskFailedError(
        "task failed", dataset_name="dsm", row=2, col=3, original_traceback="Traceback..."
    )
    assert isinstance(err, RuntimeError) and isinstance(err, ZarrOrchError)
    assert str(err) == "task failed"
    back = pickle.loads(pickle.dumps(err))
    assert (back.dataset_name, back.row, back.col, back.original_traceback) == (
        "dsm",
        2,
        3,
        "Traceback...",
    )
    with pytest.raises(TypeError):
        TaskFailedError("x", "dsm")  # keyword-only


def test_error_hierarchy():
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(TileError, ValueError)
    assert issubclass(ProductError, ZarrOrchError)
    assert not issubclass(ProductError, ValueError)


# --- CarsDict ----------------------------------------------------------------------


def test_cars_dict():
    cdict = CarsDict({"a": 1})
    assert cdict.data == {"a": 1}
    assert cdict.attrs == {}
    other = CarsDict({"b": 2}, attributes={"k": "v"})
    assert other.attrs == {"k": "v"}
    assert repr(cdict) == "CarsDict(data keys=['a'], attrs keys=[])"
    # each instance has its own attrs dict
    CarsDict({}).attrs["x"] = 1
    assert CarsDict({}).attrs == {}


# --- construction -------------------------------------------------------------------


def test_init_defaults():
    cds = CarsDataset("arrays")
    assert cds.dataset_type == "arrays"
    assert cds.tiles is None
    assert cds.tiling_grid is None
    assert cds.overlaps is None
    assert cds.tiles_info == {}
    assert cds.attributes == {}
    assert cds.name == "unknown"
    assert cds.final_function is None


def test_init_wrong_type_names_allowed_values():
    with pytest.raises(ValueError, match="'arrays', 'points', 'dict'") as err:
        CarsDataset("raster")
    assert "'raster'" in str(err.value)
    assert isinstance(err.value, ConfigurationError)


def test_shape_without_grid_is_clear():
    cds = CarsDataset("points", name="pc")
    with pytest.raises(TilingError, match="'pc' has no tiling grid yet"):
        _ = cds.shape
    with pytest.raises(TilingError, match="no tiling grid"):
        _ = cds[0, 0]


# --- tiling_grid / overlaps ---------------------------------------------------------


def test_tiling_grid_setter_resets_overlaps_and_tiles():
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0, 0, 10, 20, 5, 5)
    assert cds.shape == (2, 4)
    assert cds.overlaps.shape == (2, 4, 4)
    assert cds.overlaps.dtype == np.int64
    assert not cds.overlaps.any()
    assert cds.tiles == [[None] * 4, [None] * 4]
    cds[0, 0] = _tile()
    cds.overlaps = np.ones((2, 4, 4), dtype=np.int64)
    cds.tiling_grid = generate_tiling_grid(0, 0, 10, 10, 5, 5)
    assert cds.shape == (2, 2)
    assert cds.tiles == [[None, None], [None, None]]
    assert not cds.overlaps.any()


def test_tiles_rows_are_independent():
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0, 0, 10, 10, 5, 5)
    cds[0, 1] = "x"
    assert cds.tiles == [[None, "x"], [None, None]]


def test_tiling_grid_bad_shape():
    cds = CarsDataset("arrays")
    with pytest.raises(TilingError, match=r"got shape \(3, 4\)"):
        cds.tiling_grid = np.zeros((3, 4))
    with pytest.raises(TilingError, match="None"):
        cds.tiling_grid = None


def test_overlaps_shape_must_match_grid():
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0, 0, 10, 10, 5, 5)
    with pytest.raises(TilingError, match=r"overlaps shape \(1, 2, 4\) does not match"):
        cds.overlaps = np.zeros((1, 2, 4))


# --- indexing ---------------------------------------------------------------------


@pytest.fixture
def cds_2x3():
    cds = CarsDataset("arrays", name="test")
    cds.tiling_grid = generate_tiling_grid(0, 0, 20, 30, 10, 10)
    for row in range(2):
        for col in range(3):
            cds[row, col] = f"t{row}{col}"
    return cds


def test_getitem_forms(cds_2x3):
    assert cds_2x3[1, 2] == "t12"
    assert cds_2x3[(0, 1)] == "t01"
    assert cds_2x3[[1, 0]] == "t10"
    assert cds_2x3[1] == ["t10", "t11", "t12"]
    assert cds_2x3[(0,)] == ["t00", "t01", "t02"]
    assert cds_2x3[np.int64(1), np.int32(1)] == "t11"


def test_negative_indices(cds_2x3):
    assert cds_2x3[-1, -1] == "t12"
    assert cds_2x3[-2] == ["t00", "t01", "t02"]
    cds_2x3[-1, -3] = "new"
    assert cds_2x3.tiles[1][0] == "new"


def test_getitem_errors(cds_2x3):
    with pytest.raises(IndexError, match=r"row index 2 out of range .* shape \(2, 3\)"):
        _ = cds_2x3[2, 0]
    with pytest.raises(IndexError, match="col index -4 out of range"):
        _ = cds_2x3[0, -4]
    with pytest.raises(IndexError, match="expected 1 or 2 indices"):
        _ = cds_2x3[0, 0, 0]
    with pytest.raises(TypeError, match="got str"):
        _ = cds_2x3["a"]
    with pytest.raises(TypeError, match="row index must be an integer"):
        _ = cds_2x3[0.5, 1]
    with pytest.raises(TypeError):
        _ = cds_2x3[True]


def test_setitem_errors(cds_2x3):
    with pytest.raises(TypeError, match=r"needs a \(row, col\) index, got int"):
        cds_2x3[0] = "x"
    with pytest.raises(IndexError, match="exactly 2 indices"):
        cds_2x3[(0,)] = "x"
    with pytest.raises(IndexError, match="col index 3 out of range"):
        cds_2x3[0, 3] = "x"
    assert cds_2x3[0] == ["t00", "t01", "t02"]


def test_repr_never_shows_tiles(cds_2x3):
    cds_2x3[0, 0] = None
    text = repr(cds_2x3)
    assert text == "CarsDataset(type='arrays', name='test', shape=(2, 3), tiles_set=5/6)"
    assert "t01" not in text
    assert str(cds_2x3) == text
    assert repr(CarsDataset("dict")) == "CarsDataset(type='dict', name='unknown', shape=None)"


# --- get_window_as_dict -------------------------------------------------------------


def test_get_window_as_dict_pixel_relative_to_origin():
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(100, 200, 130, 250, 10, 20)
    assert cds.get_window_as_dict(0, 0) == {
        "row_min": 0,
        "row_max": 10,
        "col_min": 0,
        "col_max": 20,
    }
    window = cds.get_window_as_dict(2, 2)
    assert window == {"row_min": 20, "row_max": 30, "col_min": 40, "col_max": 50}
    assert all(type(v) is int for v in window.values())


def test_get_window_as_dict_from_terrain():
    # terrain grid: grid rows along x in [0, 20), grid cols along y in [100, 130), res 0.5
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0.0, 100.0, 20.0, 130.0, 10.0, 15.0)
    # tile (0, 1): x in [0, 10), y in [115, 130) -> top rows (north up), left columns
    assert cds.get_window_as_dict(0, 1, from_terrain=True, resolution=0.5) == {
        "row_min": 0,
        "row_max": 30,
        "col_min": 0,
        "col_max": 20,
    }
    # tile (1, 0): x in [10, 20), y in [100, 115) -> bottom rows, right columns
    assert cds.get_window_as_dict(1, 0, from_terrain=True, resolution=0.5) == {
        "row_min": 30,
        "row_max": 60,
        "col_min": 20,
        "col_max": 40,
    }


def test_get_window_as_dict_resolution_and_errors():
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0, 0, 10, 10, 5, 5)
    assert cds.get_window_as_dict(1, 1, resolution=2.5) == {
        "row_min": 2,
        "row_max": 4,
        "col_min": 2,
        "col_max": 4,
    }
    with pytest.raises(IndexError):
        cds.get_window_as_dict(2, 0)
    with pytest.raises(TilingError, match="resolution must be > 0"):
        cds.get_window_as_dict(0, 0, resolution=0)


# --- create_grid / create_empty_copy ------------------------------------------------


def test_create_grid_cars_argument_order_non_square():
    cds = CarsDataset("arrays")
    cds.create_grid(1500, 1000, 256, 384, 10, 20)  # nb_col, nb_row, row_split, col_split
    assert cds.shape == (4, 4)
    assert cds.tiling_grid[3, 3].tolist() == [768, 1000, 1152, 1500]
    assert cds.overlaps[0, 0].tolist() == [0, 10, 0, 20]
    assert cds.overlaps[3, 3].tolist() == [10, 0, 20, 0]
    assert cds.tiles == create_none(4, 4)


def test_create_grid_more_tile_columns_than_rows():
    cds = CarsDataset("arrays")
    cds.create_grid(1000, 100, 50, 100, 0, 0)
    assert cds.shape == (2, 10)


def test_create_empty_copy(cds_2x3):
    cds_2x3.tiles_info = {"nested": {"a": [1, 2]}}
    cds_2x3.attributes = {"disp_min": -3}
    cds_2x3.overlaps = np.full((2, 3, 4), 2, dtype=np.int64)
    copy_ds = CarsDataset("points")
    copy_ds.create_empty_copy(cds_2x3)
    assert copy_ds.shape == (2, 3)
    assert copy_ds.tiles == create_none(2, 3)
    assert copy_ds.tiles_info == {"nested": {"a": [1, 2]}}
    assert copy_ds.attributes == {}  # like CARS: attributes not copied
    np.testing.assert_array_equal(copy_ds.tiling_grid, cds_2x3.tiling_grid)
    np.testing.assert_array_equal(copy_ds.overlaps, cds_2x3.overlaps)
    # deep copies: changing the copy does not touch the source
    copy_ds.tiles_info["nested"]["a"].append(3)
    copy_ds.tiling_grid[0, 0, 0] = 99
    copy_ds.overlaps[0, 0, 0] = 99
    assert cds_2x3.tiles_info == {"nested": {"a": [1, 2]}}
    assert cds_2x3.tiling_grid[0, 0, 0] == 0
    assert cds_2x3.overlaps[0, 0, 0] == 2
    assert cds_2x3[0, 0] == "t00"


def test_create_empty_copy_of_gridless_dataset():
    with pytest.raises(TilingError, match="no tiling grid"):
        CarsDataset("arrays").create_empty_copy(CarsDataset("arrays", name="src"))


# --- save / load ----------------------------------------------------------------------


def test_save_and_load_arrays(tmp_path):
    cds = CarsDataset("arrays", name="dsm")
    cds.create_grid(20, 10, 5, 10, 1, 2)
    tile = fill_dataset(
        _tile(3.0),
        saving_info={cst.CARS_DS_KEY: 4, cst.CARS_DS_ROW: 1, cst.CARS_DS_COL: 0},
        window=cds.tiling_grid[1, 0],
        overlaps=cds.overlaps[1, 0],
        attributes={"disp_min": np.int64(-5)},
    )
    cds[1, 0] = tile
    cds.tiles_info = {"res": np.float32(0.5), "ids": np.arange(3), "flag": np.bool_(True)}
    cds.attributes = {"color_type": "uint16"}
    cds.save_cars_dataset(tmp_path / "cds")

    files = sorted(p.name for p in (tmp_path / "cds").iterdir())
    assert files == [
        "attributes.json",
        "grid.npy",
        "meta.json",
        "overlaps.npy",
        "tile_1_0.pkl",
        "tiles_info.json",
    ]
    meta = json.loads((tmp_path / "cds" / "meta.json").read_text())
    assert meta["dataset_type"] == "arrays"
    assert meta["name"] == "dsm"
    assert meta["tiles"] == [[1, 0]]

    loaded = CarsDataset("arrays", load_from_disk=tmp_path / "cds")
    assert loaded.name == "dsm"
    assert loaded.shape == (2, 2)
    np.testing.assert_array_equal(loaded.tiling_grid, cds.tiling_grid)
    np.testing.assert_array_equal(loaded.overlaps, cds.overlaps)
    assert loaded.tiles_info == {"res": 0.5, "ids": [0, 1, 2], "flag": True}
    assert loaded.attributes == {"color_type": "uint16"}
    assert loaded[0, 0] is None and loaded[0, 1] is None and loaded[1, 1] is None
    xr.testing.assert_identical(loaded[1, 0], tile)
    assert get_window_dataset(loaded[1, 0]) == {
        "row_min": 5,
        "row_max": 10,
        "col_min": 0,
        "col_max": 10,
    }
    assert get_overlaps_dataset(loaded[1, 0]) == {"up": 1, "down": 0, "left": 0, "right": 2}
    assert get_saving_info(loaded[1, 0])[cst.CARS_DS_ROW] == 1


def test_save_and_load_points_and_dict(tmp_path):
    points = CarsDataset("points", name="pc")
    points.tiling_grid = generate_tiling_grid(0.0, 0.0, 10.0, 10.0, 10.0, 5.0)
    frame = fill_dataframe(pd.DataFrame({"x": [1.0, 2.0], "z": [3.0, 4.0]}), attributes={"a": 1})
    points[0, 1] = frame
    points.save_cars_dataset(str(tmp_path / "pc"))
    loaded = CarsDataset("points", load_from_disk=str(tmp_path / "pc"), name="explicit")
    assert loaded.name == "explicit"  # an explicit name wins over the saved one
    assert loaded.tiling_grid.dtype == np.float64
    pd.testing.assert_frame_equal(loaded[0, 1], frame)
    assert loaded[0, 1].attrs == {"attributes": {"a": 1}}

    dicts = CarsDataset("dict")
    dicts.tiling_grid = generate_tiling_grid(0, 0, 1, 1, 1, 1)
    dicts[0, 0] = fill_dict(CarsDict({"m": np.eye(2)}), saving_info={"cars_ds_key": 1})
    dicts.save_cars_dataset(tmp_path / "d")
    back = CarsDataset("dict", load_from_disk=tmp_path / "d")
    assert isinstance(back[0, 0], CarsDict)
    np.testing.assert_array_equal(back[0, 0].data["m"], np.eye(2))
    assert back[0, 0].attrs == {"saving_info": {"cars_ds_key": 1}}


def test_save_refuses_delayed_tiles_and_writes_nothing(tmp_path, cds_2x3):
    cds_2x3.tiles = create_none(2, 3)
    cds_2x3[0, 0] = _tile()
    cds_2x3[1, 2] = _FakeDelayed()
    with pytest.raises(TileError) as err:
        cds_2x3.save_cars_dataset(tmp_path / "out")
    msg = str(err.value)
    assert "tile (row=1, col=2)" in msg
    assert "_FakeDelayed" in msg
    assert "not a concrete tile" in msg
    assert not (tmp_path / "out").exists()


def test_save_without_grid(tmp_path):
    with pytest.raises(TilingError, match="no tiling grid"):
        CarsDataset("arrays").save_cars_dataset(tmp_path / "x")


def test_resave_removes_stale_tiles(tmp_path):
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0, 0, 4, 4, 2, 2)
    cds[0, 0] = _tile(1.0)
    cds[1, 1] = _tile(2.0)
    cds.save_cars_dataset(tmp_path / "c")
    cds[0, 0] = None
    cds.save_cars_dataset(tmp_path / "c")
    assert not (tmp_path / "c" / "tile_0_0.pkl").exists()
    loaded = CarsDataset("arrays", load_from_disk=tmp_path / "c")
    assert loaded[0, 0] is None
    assert float(loaded[1, 1]["im"][0, 0]) == 2.0


def test_load_errors(tmp_path):
    with pytest.raises(ProductError, match="is not a directory"):
        CarsDataset("arrays", load_from_disk=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProductError, match=r"meta\.json is missing"):
        CarsDataset("arrays", load_from_disk=tmp_path / "empty")

    cds = CarsDataset("points")
    cds.tiling_grid = generate_tiling_grid(0, 0, 2, 2, 1, 1)
    cds[0, 0] = pd.DataFrame({"x": [1]})
    cds.save_cars_dataset(tmp_path / "pts")
    with pytest.raises(ProductError, match="holds a 'points' CarsDataset, but a 'arrays'"):
        CarsDataset("arrays", load_from_disk=tmp_path / "pts")
    (tmp_path / "pts" / "tile_0_0.pkl").unlink()
    with pytest.raises(ProductError, match=r"tile_0_0\.pkl listed in meta\.json is missing"):
        CarsDataset("points", load_from_disk=tmp_path / "pts")
    (tmp_path / "pts" / "grid.npy").unlink()
    with pytest.raises(ProductError, match=r"grid\.npy is missing"):
        CarsDataset("points", load_from_disk=tmp_path / "pts")


def test_save_unserialisable_attributes_is_clear(tmp_path):
    cds = CarsDataset("arrays")
    cds.tiling_grid = generate_tiling_grid(0, 0, 2, 2, 1, 1)
    cds.attributes = {"obj": object()}
    with pytest.raises(TypeError, match=r"attributes\.json"):
        cds.save_cars_dataset(tmp_path / "bad")


# --- tile attrs helpers -----------------------------------------------------------


def test_fill_dataset_arrays_converted_dicts_kept():
    window = {"row_min": 0, "row_max": 2, "col_min": 0, "col_max": 3}
    ds = fill_dataset(
        _tile(),
        saving_info={"cars_ds_key": 1},
        window=window,
        profile={"height": 10, "width": 10},
        attributes={"k": 1},
        overlaps=np.array([0, 1, 2, 3]),
    )
    assert ds.attrs[cst.WINDOW] == window
    assert ds.attrs[cst.OVERLAPS] == {"up": 0, "down": 1, "left": 2, "right": 3}
    assert get_profile_rasterio(ds) == {"height": 10, "width": 10}
    assert get_attributes(ds) == {"k": 1}
    assert get_saving_info(ds) == {"cars_ds_key": 1}

    ds2 = fill_dataset(_tile(), window=np.array([1, 2, 3, 4]), overlaps={"up": 9})
    assert ds2.attrs[cst.WINDOW] == {"row_min": 1, "row_max": 2, "col_min": 3, "col_max": 4}
    assert ds2.attrs[cst.OVERLAPS] == {"up": 9}
    assert get_saving_info(ds2) is None


def test_fill_dataset_only_sets_given_keys():
    ds = _tile()
    ds.attrs["other"] = 5
    fill_dataset(ds, attributes={"a": 1})
    assert ds.attrs == {"other": 5, "attributes": {"a": 1}}


def test_fill_dataframe_and_getters():
    frame = fill_dataframe(pd.DataFrame({"x": [1]}), saving_info={"k": 1}, attributes={"a": 2})
    assert get_saving_info(frame) == {"k": 1}
    assert get_attributes_dataframe(frame) == {"a": 2}
    assert get_window_dataset(frame) is None
    assert get_overlaps_dataset(frame) is None
    assert get_profile_rasterio(frame) is None


def test_fill_dict_refuses_plain_dict():
    with pytest.raises(TypeError, match=r"wrap plain dicts in CarsDict"):
        fill_dict({"a": 1}, saving_info={"cars_ds_key": 1})
    with pytest.raises(TypeError, match=r"has no \.attrs"):
        fill_dataset([1, 2], saving_info={})


def test_getters_on_objects_without_attrs():
    assert get_saving_info(None) is None
    assert get_saving_info({"saving_info": 1}) is None
    assert get_window_dataset(object()) is None


def test_is_concrete_tile():
    assert is_concrete_tile(_tile())
    assert is_concrete_tile(pd.DataFrame())
    assert is_concrete_tile(CarsDict({}))
    assert not is_concrete_tile({"a": 1})
    assert not is_concrete_tile(None)
    assert not is_concrete_tile(_FakeDelayed())


def test_package_reexports():
    for name in zdata.__all__:
        assert hasattr(zdata, name), name
    for name in ("CarsDataset", "generate_tiling_grid", "regular_chunk_shape", "fill_dataset"):
        assert name in zdata.__all__
