"""GIS readers: products written in every mode open right in GDAL, rioxarray and plain xarray.

GDAL reads Zarr v3 from 3.12 on (rasterio 1.5, the Python 3.12 venv): those tests are
skipped with an older GDAL. The product: two tags plus a 3-band tag over a raster whose last
tile row and column are smaller, one tile failing on purpose (a partially finished run).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

import zarr_orch as ocht
from zarr_orch import CarsDataset, Orchestrator, TaskFailedError, fill_dataset
from zarr_orch.cluster.base import AbstractCluster
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.storage.format.product import FORMAT_VERSION

GDAL_VERSION = tuple(int(v) for v in rasterio.__gdal_version__.split(".")[:2])
needs_gdal_zarr_v3 = pytest.mark.skipif(
    GDAL_VERSION < (3, 12), reason=f"GDAL {rasterio.__gdal_version__} reads no Zarr v3"
)

HEIGHT, WIDTH, TILE_H, TILE_W = 70, 90, 32, 40  # 3 x 3 tiles, the last row/col smaller
FAILING = (1, 2)
TRANSFORM = Affine(2.0, 0.0, 431000.0, 0.0, -2.0, 4830000.0)
CRS_EPSG = 32631
PROFILE = {"height": HEIGHT, "width": WIDTH, "crs": f"EPSG:{CRS_EPSG}", "transform": TRANSFORM}
TAGS = {"hgt": ("float32", -9999.0, 1), "msk": ("uint8", 255, 1), "rgb": ("int16", -1, 3)}
MODES = ["sequential", "multiprocessing", "local_dask"]


def values_for(tag: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """What every tile holds for `tag` (nodata at pixels where (row + col) % 11 == 0)."""
    base = np.add.outer(rows * 100, cols)
    hole = np.add.outer(rows, cols) % 11 == 0
    if tag == "hgt":
        return np.where(hole, np.nan, base / 10).astype("float32")
    if tag == "msk":
        return np.where(hole, 255, base % 7).astype("uint8")
    cube = np.stack([base % 1000 + 1000 * band for band in range(3)]).astype("int16")
    return np.where(hole, -1, cube)


def gis_task(window: dict, overlaps: dict, saving_info: dict, fail: bool) -> xr.Dataset:
    """One tile of the three tags; raises for the failing tile."""
    if fail:
        raise RuntimeError("this tile fails on purpose")
    rows = np.arange(window["row_min"], window["row_max"])
    cols = np.arange(window["col_min"], window["col_max"])
    tile = xr.Dataset(
        {
            "hgt": (("row", "col"), values_for("hgt", rows, cols)),
            "msk": (("row", "col"), values_for("msk", rows, cols)),
            "rgb": (("band_im", "row", "col"), values_for("rgb", rows, cols)),
        }
    )
    return fill_dataset(
        tile, saving_info=saving_info, window=window, overlaps=overlaps, profile=PROFILE
    )


def run_product(out_dir: Path, mode: str, failing=FAILING, replace: bool = False, **conf) -> str:
    """Write the three-tag product with `mode` (also replaced: CARS's save + replace, which
    stores tile descriptions for lazy tiles); returns the product path."""
    if mode not in AbstractCluster.modes():
        pytest.skip(f"mode {mode!r} is not available")
    conf = {"mode": mode, "max_retries": 0, "progress": False, **conf}
    if mode != "sequential":
        conf["nb_workers"] = 2
    orchestrator = None
    try:
        with Orchestrator(conf, out_dir=str(out_dir)) as orchestrator:
            dsm = CarsDataset("arrays", name="dsm")
            dsm.create_grid(WIDTH, HEIGHT, TILE_H, TILE_W, 0, 0)
            for tag, (dtype, nodata, _) in TAGS.items():
                orchestrator.add_to_save_lists("dsm.tif", tag, dsm, dtype=dtype, nodata=nodata)
            if replace:
                orchestrator.add_to_replace_lists(dsm, cars_ds_name="dsm")
            [saving_info] = orchestrator.get_saving_infos([dsm])
            task = orchestrator.cluster.create_task(gis_task)
            for row in range(dsm.shape[0]):
                for col in range(dsm.shape[1]):
                    dsm[row, col] = task(
                        window_array_to_dict(dsm.tiling_grid[row, col]),
                        overlap_array_to_dict(dsm.overlaps[row, col]),
                        ocht.update_saving_infos(saving_info, row=row, col=col),
                        (row, col) == failing,
                    )
    except TaskFailedError as exc:
        if (exc.row, exc.col) != failing:
            raise
    return orchestrator.products["dsm.tif"]


def expected(tag: str, failing=FAILING) -> np.ndarray:
    """The whole raster of `tag` (bands first) with nodata where GDAL must see nodata."""
    _, nodata, bands = TAGS[tag]
    values = values_for(tag, np.arange(HEIGHT), np.arange(WIDTH)).reshape(bands, HEIGHT, WIDTH)
    values = np.where(np.isnan(values), nodata, values).astype(TAGS[tag][0])
    if failing is not None:
        r0, c0 = failing[0] * TILE_H, failing[1] * TILE_W
        values[:, r0 : r0 + TILE_H, c0 : c0 + TILE_W] = nodata  # never written: the fill
    return values


@pytest.fixture(scope="module", params=MODES)
def product(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The partially finished three-tag product, written in each mode."""
    return run_product(tmp_path_factory.mktemp(f"gis-{request.param}"), request.param)


@needs_gdal_zarr_v3
@pytest.mark.parametrize("tag", list(TAGS))
def test_gdal_reads_every_tag_with_its_georeferencing(product: str, tag: str) -> None:
    dtype, nodata, bands = TAGS[tag]
    with rasterio.open(f'ZARR:"{product}":/{tag}') as dataset:
        assert dataset.count == bands and dataset.shape == (HEIGHT, WIDTH)
        assert dataset.dtypes == (dtype,) * bands
        assert dataset.nodatavals == (nodata,) * bands
        assert dataset.crs == CRS.from_epsg(CRS_EPSG)
        assert dataset.transform.almost_equals(TRANSFORM)
        np.testing.assert_array_equal(dataset.read(), expected(tag))


@needs_gdal_zarr_v3
def test_gdal_lists_only_the_tags(product: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(product) as root:
            names = sorted(name.rsplit(":/", 1)[1] for name in root.subdatasets)
    assert names == sorted(TAGS)  # no completion records, coordinates or bookkeeping


@needs_gdal_zarr_v3
def test_gdal_sees_no_bookkeeping_of_replaced_products(tmp_path: Path) -> None:
    """The tile descriptions stored for lazy tiles stay invisible to GDAL."""
    url = run_product(tmp_path, "sequential", replace=True)
    assert any((Path(url) / "_zarr_orch").glob("*_tiles"))  # descriptions were stored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(url) as root:
            names = sorted(name.rsplit(":/", 1)[1] for name in root.subdatasets)
    assert names == sorted(TAGS)
    with rasterio.open(f'ZARR:"{url}":/hgt') as dataset:
        np.testing.assert_array_equal(dataset.read(), expected("hgt"))


def test_xarray_opens_without_any_warning(product: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(product)
        opened = ocht.open_product(product)
    assert set(ds.data_vars) == set(TAGS)
    assert ds["hgt"].dims == ("y", "x") and ds["rgb"].dims == ("band", "y", "x")
    assert ds["row"].dims == ("y",) and ds["col"].dims == ("x",)  # pixel indices kept
    np.testing.assert_array_equal(ds["row"].values, np.arange(HEIGHT))
    np.testing.assert_allclose(ds["x"].values, TRANSFORM.c + TRANSFORM.a * (np.arange(WIDTH) + 0.5))
    assert ds["hgt"].attrs["grid_mapping"] == "spatial_ref"
    assert CRS.from_wkt(ds["spatial_ref"].attrs["crs_wkt"]) == CRS.from_epsg(CRS_EPSG)
    assert opened["hgt"].dims == ("row", "col")  # open_product's default: pixel dims


def test_rioxarray_bounds_and_to_raster_round_trip(product: str, tmp_path: Path) -> None:
    pytest.importorskip("rioxarray")
    ds = xr.open_zarr(product, mask_and_scale=False)
    west, north = TRANSFORM.c, TRANSFORM.f
    bounds = (west, north + TRANSFORM.e * HEIGHT, west + TRANSFORM.a * WIDTH, north)
    for tag in TAGS:
        assert ds[tag].rio.bounds() == pytest.approx(bounds)
        assert ds[tag].rio.crs == CRS.from_epsg(CRS_EPSG)
        out = tmp_path / f"{tag}.tif"
        ds[tag].rio.to_raster(out)
        with rasterio.open(out) as dataset:
            assert dataset.transform.almost_equals(TRANSFORM)
            assert dataset.crs == CRS.from_epsg(CRS_EPSG)
            assert dataset.nodata == TAGS[tag][1]
            np.testing.assert_array_equal(dataset.read(), expected(tag))


def test_on_s3_xarray_opens_without_warning_and_rioxarray_round_trips(
    moto_server, s3_bucket, s3_options, tmp_path: Path
) -> None:
    pytest.importorskip("rioxarray")
    url = run_product(f"s3://{s3_bucket}/gis", "sequential", storage_options=s3_options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(url, storage_options=s3_options, mask_and_scale=False)
        opened = ocht.open_product(url, storage_options=s3_options)
    assert set(ds.data_vars) == set(TAGS) and opened.attrs["tiles_done"] == 8
    west, north = TRANSFORM.c, TRANSFORM.f
    bounds = (west, north + TRANSFORM.e * HEIGHT, west + TRANSFORM.a * WIDTH, north)
    assert ds["rgb"].rio.bounds() == pytest.approx(bounds)
    ds["rgb"].rio.to_raster(tmp_path / "rgb.tif")
    with rasterio.open(tmp_path / "rgb.tif") as dataset:
        assert dataset.transform.almost_equals(TRANSFORM) and dataset.count == 3
        np.testing.assert_array_equal(dataset.read(), expected("rgb"))


def test_consolidated_metadata_follows_breakpoints(tmp_path: Path) -> None:
    """A rerun adding a tag refreshes the consolidated metadata readers use."""
    url = run_product(tmp_path, "sequential", failing=None)
    with Orchestrator({"mode": "sequential", "progress": False}, out_dir=str(tmp_path)) as orch:
        other = CarsDataset("arrays", name="dsm")
        other.create_grid(WIDTH, HEIGHT, TILE_H, TILE_W, 0, 0)
        orch.add_to_save_lists("extra.tif", "hgt", other, dtype="float32", nodata=-9999)
        [info] = orch.get_saving_infos([other])
        task = orch.cluster.create_task(gis_task)
        for row in range(other.shape[0]):
            for col in range(other.shape[1]):
                other[row, col] = task(
                    window_array_to_dict(other.tiling_grid[row, col]),
                    overlap_array_to_dict(other.overlaps[row, col]),
                    ocht.update_saving_infos(info, row=row, col=col),
                    False,
                )
    consolidated = json.loads((Path(url) / "zarr.json").read_text())["consolidated_metadata"]
    assert {"hgt", "msk", "rgb", "spatial_ref"} <= set(consolidated["metadata"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extra = xr.open_zarr(tmp_path / "extra.zarr")
    assert list(extra.data_vars) == ["hgt"]


def test_crs_inputs_are_stored_as_full_wkt(tmp_path: Path) -> None:
    import pyproj

    from zarr_orch.storage.format.encoding import crs_to_wkt

    for given in (
        CRS_EPSG,
        f"EPSG:{CRS_EPSG}",
        CRS.from_epsg(CRS_EPSG),
        pyproj.CRS.from_epsg(CRS_EPSG),
    ):
        wkt, short = crs_to_wkt(given)
        assert CRS.from_wkt(wkt) == CRS.from_epsg(CRS_EPSG) and short == f"EPSG:{CRS_EPSG}"
    wkt, _ = crs_to_wkt(CRS.from_epsg(CRS_EPSG).to_wkt())
    assert CRS.from_wkt(wkt) == CRS.from_epsg(CRS_EPSG)


def test_unparseable_crs_is_an_error_naming_the_tile(tmp_path: Path) -> None:
    global PROFILE
    saved = PROFILE
    PROFILE = {**saved, "crs": "EPSG:not-a-code"}
    try:
        with pytest.raises(TaskFailedError) as caught:
            run_product(tmp_path, "sequential", failing=(9, 9))
    finally:
        PROFILE = saved
    message = str(caught.value)
    assert "tile (row=0, col=0)" in message and "not a valid CRS" in message
    assert "EPSG:not-a-code" in message


def test_products_without_transform_keep_row_col(tmp_path: Path) -> None:
    global PROFILE
    saved = PROFILE
    PROFILE = {"height": HEIGHT, "width": WIDTH}
    try:
        url = run_product(tmp_path, "sequential", failing=None)
    finally:
        PROFILE = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(url)
    assert ds["hgt"].dims == ("row", "col") and "spatial_ref" not in ds.coords


# -- products of the previous format -------------------------------------------------------------

OLD_PRODUCT = Path(__file__).parent / "data" / "format_v1" / "dsm.zarr"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """An out_dir holding a copy of the format-1 product (tests/data/format_v1)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(OLD_PRODUCT, out / "dsm.zarr")
    return out


def test_old_products_are_still_read(old_run: Path) -> None:
    from zarr_orch.status import open_run
    from zarr_orch.storage.readers.verify import verify_product

    ds = ocht.open_product(old_run / "dsm.zarr")
    assert ds.attrs["zarr_orch"]["format_version"] == 1
    assert ds.attrs["tiles_done"] == 7 and ds["hgt"].dims == ("row", "col")
    assert np.isnan(ds["hgt"].values[30:, 20:40]).all()  # tile (1, 1) failed
    np.testing.assert_array_equal(ds["hgt"].values[:30, :20], np.add.outer(range(30), range(20)))
    assert verify_product(old_run / "dsm.zarr").ok
    [summary] = open_run(old_run).products
    assert (summary.tiles_done, summary.tiles_total) == (7, 8)
    report = ocht.write_geotiff(old_run / "dsm.zarr", "hgt", old_run / "hgt.tif", cog=False)
    assert report.missing_tiles == 1
    with rasterio.open(old_run / "hgt.tif") as dataset:
        assert dataset.crs == CRS.from_epsg(32631) and dataset.nodata == -9999.0
        assert dataset.transform.almost_equals(Affine(0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0))
        assert (dataset.read(1)[30:, 20:40] == -9999.0).all()


def test_rerun_over_an_old_product_is_refused_then_rebuilt(old_run: Path) -> None:
    before = sorted(p.relative_to(old_run) for p in old_run.rglob("*") if p.is_file())
    with pytest.raises(ocht.ProductError) as caught:
        rerun_old(old_run)
    message = str(caught.value)
    assert "product format version 1" in message and "resume: false" in message
    assert "overwrite: true" in message
    after = sorted(p.relative_to(old_run) for p in old_run.rglob("*") if p.is_file())
    assert [p for p in after if p.parts[0] == "dsm.zarr"] == [
        p for p in before if p.parts[0] == "dsm.zarr"
    ]  # nothing of the old product was touched
    # doing what the message says works: resume: false rebuilds it in the current format
    rerun_old(old_run, resume=False)
    ds = ocht.open_product(old_run / "dsm.zarr")
    assert ds.attrs["zarr_orch"]["format_version"] == FORMAT_VERSION
    assert ds.attrs["tiles_done"] == 8


def rerun_old(out_dir: Path, **conf) -> None:
    """test_reading's pipeline (the one that wrote the old product), every tile succeeding."""
    import test_reading as old

    with Orchestrator({"mode": "sequential", "progress": False, **conf}, out_dir=out_dir) as orch:
        dsm = CarsDataset("arrays", name="dsm")
        dsm.create_grid(old.WIDTH, old.HEIGHT, old.TILE_H, old.TILE_W, 0, 0)
        orch.add_to_save_lists("dsm.tif", "hgt", dsm, dtype="float32", nodata=-9999)
        orch.add_to_save_lists("dsm.tif", "cls", dsm, dtype="int16", nodata=None)
        orch.add_to_save_lists("dsm.tif", "msk", dsm, dtype="uint8", nodata=255)
        [saving_info] = orch.get_saving_infos([dsm])
        task = orch.cluster.create_task(old.partial_task)
        for row in range(dsm.shape[0]):
            for col in range(dsm.shape[1]):
                dsm[row, col] = task(
                    window_array_to_dict(dsm.tiling_grid[row, col]),
                    overlap_array_to_dict(dsm.overlaps[row, col]),
                    ocht.update_saving_infos(saving_info, row=row, col=col),
                    old.PROFILE,
                    False,
                )
