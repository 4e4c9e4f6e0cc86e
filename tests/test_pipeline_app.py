"""The CARS-style application test: a two-stage pipeline on a non-square grid.

Stage 1 (1000x1500 raster, 256x384 tiles, 2-pixel overlaps) is saved and replaced; after
`breakpoint()` stage 2 consumes the replaced tiles and is saved. Products must equal a
numpy reference computed without zarr_orch, and read back with the documented layout.
"""

from __future__ import annotations

import json

import numpy as np
import pyproj
import pytest
import xarray as xr
import zarr
from cars_app import PROFILE, reference, run_pipeline

import zarr_orch as zo

HEIGHT, WIDTH = 1000, 1500
TILE = (256, 384)
ROW_CHUNKS = (256, 256, 256, 232)
COL_CHUNKS = (384, 384, 384, 348)


@pytest.fixture(scope="module")
def pipeline(mode, tmp_path_factory):
    """Run the application once per mode; return (out_dir, stage1, stage2, orchestrator)."""
    out = tmp_path_factory.mktemp(f"pipeline_{mode}") / "out"
    with zo.Orchestrator({"mode": mode, "progress": False}, out_dir=str(out)) as orch:
        stage1, stage2 = run_pipeline(orch, tile=TILE, overlap=2, size=(HEIGHT, WIDTH))
    return out, stage1, stage2, orch


@pytest.fixture(scope="module")
def expected():
    """(stage-2 3x3 mean, stage-1 field), both computed with numpy only."""
    return reference(HEIGHT, WIDTH)


def test_outputs_equal_numpy_reference(pipeline, expected):
    out, *_ = pipeline
    ref_mean, ref_field = expected
    stage1 = xr.open_zarr(out / "stage1.zarr", consolidated=False)
    stage2 = xr.open_zarr(out / "stage2.zarr", consolidated=False, mask_and_scale=False)
    np.testing.assert_array_equal(stage1["hgt"].values, ref_field)
    np.testing.assert_array_equal(stage2["mean"].values, ref_mean)
    np.testing.assert_array_equal(stage2["mask"].values, (ref_mean > 0).astype("uint8"))
    np.testing.assert_array_equal(stage2["bands"].values, np.stack([ref_mean * 2, -ref_mean]))


def test_stage1_tiles_were_replaced_by_concrete_tiles(pipeline, expected):
    _, stage1, _, _ = pipeline
    _, ref_field = expected
    assert stage1.shape == (4, 4)
    for row in range(4):
        for col in range(4):
            tile = stage1[row, col]
            assert isinstance(tile, xr.Dataset)
            window = tile.attrs["window"]
            ov = tile.attrs["overlaps"]
            assert window["row_min"] == row * TILE[0] and window["col_min"] == col * TILE[1]
            expected_tile = ref_field[
                window["row_min"] - ov["up"] : window["row_max"] + ov["down"],
                window["col_min"] - ov["left"] : window["col_max"] + ov["right"],
            ]
            np.testing.assert_array_equal(tile["hgt"].values, expected_tile)
    # overlaps of 2 px, clipped at the raster border
    assert stage1[0, 0].attrs["overlaps"] == {"up": 0, "down": 2, "left": 0, "right": 2}
    assert stage1[1, 1].attrs["overlaps"] == {"up": 2, "down": 2, "left": 2, "right": 2}
    assert stage1[3, 3].attrs["overlaps"] == {"up": 2, "down": 0, "left": 2, "right": 0}


@pytest.mark.parametrize("opener", ["open_zarr", "open_product"])
def test_product_layout(pipeline, opener):
    out, *_ = pipeline
    path = out / "stage2.zarr"
    if opener == "open_zarr":
        ds = xr.open_zarr(path, consolidated=False)
    else:
        ds = zo.open_product(str(path))
    assert set(ds.data_vars) == {"mean", "mask", "bands"}
    # georeferenced products are stored with y/x dims (format 2); open_product gives row/col
    ydim, xdim = ("y", "x") if opener == "open_zarr" else ("row", "col")
    assert ds["mean"].dims == (ydim, xdim)
    assert ds["mask"].dims == (ydim, xdim)
    assert ds["bands"].dims == ("band", ydim, xdim)
    assert dict(ds.sizes) == {ydim: HEIGHT, xdim: WIDTH, "band": 2}
    # dtypes as registered (xarray decodes masked integers to float; encoding keeps uint8)
    assert ds["mean"].dtype == np.float32
    assert ds["bands"].dtype == np.float32
    assert ds["mask"].encoding["dtype"] == np.uint8
    # _FillValue == nodata
    assert ds["mean"].encoding["_FillValue"] == -9999
    assert ds["mask"].encoding["_FillValue"] == 255
    assert ds["bands"].encoding["_FillValue"] == -9999
    # chunks == tile size, edge chunks smaller
    assert ds["mean"].encoding["chunks"] == TILE
    assert ds["mean"].chunks == (ROW_CHUNKS, COL_CHUNKS)
    assert ds["bands"].chunks == ((2,), ROW_CHUNKS, COL_CHUNKS)
    assert ds["bands"].encoding["chunks"] == (2, *TILE)
    # coordinates: pixel numbers, x/y pixel centres from the profile transform
    np.testing.assert_array_equal(ds["row"].values, np.arange(HEIGHT))
    np.testing.assert_array_equal(ds["col"].values, np.arange(WIDTH))
    np.testing.assert_array_equal(ds["band"].values, [1, 2])
    a, _, c, _, e, f = PROFILE["transform"]
    np.testing.assert_allclose(ds["x"].values, c + a * (np.arange(WIDTH) + 0.5))
    np.testing.assert_allclose(ds["y"].values, f + e * (np.arange(HEIGHT) + 0.5))
    assert ds["x"].dims == (xdim,) and ds["y"].dims == (ydim,)
    assert ds["col"].dims == (xdim,) and ds["row"].dims == (ydim,)
    # spatial_ref (CF grid mapping, as rioxarray writes it)
    ref = ds["spatial_ref"]
    assert pyproj.CRS.from_wkt(ref.attrs["crs_wkt"]).to_epsg() == 32631
    assert [float(v) for v in ref.attrs["GeoTransform"].split()] == [c, a, 0.0, f, 0.0, e]
    assert ds["mean"].encoding.get("grid_mapping", ds["mean"].attrs.get("grid_mapping")) == (
        "spatial_ref"
    )


def test_zarr_arrays_fill_value_equals_nodata(pipeline):
    out, *_ = pipeline
    stage1 = zarr.open_group(str(out / "stage1.zarr"), mode="r")
    stage2 = zarr.open_group(str(out / "stage2.zarr"), mode="r")
    assert stage1["hgt"].fill_value == -9999
    assert stage1["hgt"].dtype == np.float32
    assert stage1["hgt"].chunks == TILE
    assert stage2["mean"].fill_value == -9999
    assert stage2["mask"].fill_value == 255
    assert stage2["mask"].dtype == np.uint8
    assert stage2["bands"].fill_value == -9999
    assert stage2["mean"].metadata.dimension_names == ("y", "x")  # georeferenced: format 2
    assert stage2["bands"].metadata.dimension_names == ("band", "y", "x")


def test_product_attributes_and_metadata_json(pipeline):
    out, _, _, orch = pipeline
    info = zo.open_product(str(out / "stage1.zarr")).attrs["zarr_orch"]
    assert info["kind"] == "arrays"
    assert info["tile_size"] == list(TILE)
    assert info["tile_grid_shape"] == [4, 4]
    assert info["extent"] == [HEIGHT, WIDTH]
    assert info["max_overlaps"] == [2, 2, 2, 2]
    assert info["tags"]["hgt"] == {"dtype": "float32", "nodata": -9999, "optional": False}
    meta = json.loads((out / "metadata.json").read_text())
    products = meta["zarr_orch"]["products"]
    assert products["stage1.tif"]["tiles_done"] == 16
    assert products["stage2.tif"]["tiles_done"] == 16
    assert products["stage2.tif"]["tags"] == ["mean", "mask", "bands"]
    assert meta["zarr_orch"]["stats"]["breakpoints"] == 2
    assert meta["zarr_orch"]["stats"]["failed"] == 0
    assert orch.products == {
        "stage1.tif": str(out / "stage1.zarr"),
        "stage2.tif": str(out / "stage2.zarr"),
    }
