"""Reading a run back: open_product's missing-tile mask and georeferencing, tile status, runs.

The half-finished run used throughout is a real sequential run whose task raises on one
tile: every other tile is written and recorded, the failing one is not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import zarr_orch as ocht
from zarr_orch import CarsDataset, Orchestrator, ProductError, TaskFailedError, fill_dataset
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.reading import done_grid, open_product, read_product_info
from zarr_orch.status import open_run, status_map, summarize_product, tile_status
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format import records as rec

HEIGHT, WIDTH, TILE_H, TILE_W = 50, 70, 30, 20  # 2 x 4 tiles, last row/col smaller
FAILING = (1, 1)
TRANSFORM = (0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0)
PROFILE = {"height": HEIGHT, "width": WIDTH, "crs": "EPSG:32631", "transform": TRANSFORM}


def expected(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The value every tile computes: row + col."""
    return np.add.outer(rows, cols)


def partial_task(
    window: dict, overlaps: dict, saving_info: dict, profile: dict, fail: bool
) -> xr.Dataset:
    """A tile with a float tag, an int16 tag without nodata and a uint8 tag; may raise."""
    if fail:
        raise RuntimeError("this tile fails on purpose")
    values = expected(
        np.arange(window["row_min"], window["row_max"]),
        np.arange(window["col_min"], window["col_max"]),
    )
    tile = xr.Dataset(
        {
            "hgt": (("row", "col"), values.astype("float32")),
            "cls": (("row", "col"), (values % 7 + 1).astype("int16")),
            "msk": (("row", "col"), (values % 3).astype("uint8")),
        }
    )
    return fill_dataset(
        tile, saving_info=saving_info, window=window, overlaps=overlaps, profile=profile
    )


def make_run(
    out_dir: Path, failing: tuple[int, int] | None = FAILING, file_name: str = "dsm.tif"
) -> str:
    """Run the 2x4-tile pipeline (sequential); `failing` tile raises. Returns the product URL."""
    conf = {"mode": "sequential", "max_retries": 0, "progress": False}
    orchestrator = None
    try:
        with Orchestrator(conf, out_dir=str(out_dir)) as orchestrator:
            dsm = CarsDataset("arrays", name="dsm")
            dsm.create_grid(WIDTH, HEIGHT, TILE_H, TILE_W, 0, 0)
            orchestrator.add_to_save_lists(file_name, "hgt", dsm, dtype="float32", nodata=-9999)
            orchestrator.add_to_save_lists(file_name, "cls", dsm, dtype="int16", nodata=None)
            orchestrator.add_to_save_lists(file_name, "msk", dsm, dtype="uint8", nodata=255)
            [saving_info] = orchestrator.get_saving_infos([dsm])
            task = orchestrator.cluster.create_task(partial_task)
            for row in range(dsm.shape[0]):
                for col in range(dsm.shape[1]):
                    dsm[row, col] = task(
                        window_array_to_dict(dsm.tiling_grid[row, col]),
                        overlap_array_to_dict(dsm.overlaps[row, col]),
                        ocht.update_saving_infos(saving_info, row=row, col=col),
                        PROFILE,
                        (row, col) == failing,
                    )
            orchestrator.update_out_info({"experiment": "partial"})
    except TaskFailedError as exc:
        assert failing is not None and (exc.row, exc.col) == failing
    else:
        assert failing is None
    return orchestrator.products[file_name]


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URL of a product whose tile FAILING raised (the others are written)."""
    return make_run(tmp_path_factory.mktemp("partial") / "out")


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URL of the same product with every tile done."""
    return make_run(tmp_path_factory.mktemp("complete") / "out", failing=None)


def tile_slice(row: int, col: int) -> tuple[slice, slice]:
    return (
        slice(row * TILE_H, min((row + 1) * TILE_H, HEIGHT)),
        slice(col * TILE_W, min((col + 1) * TILE_W, WIDTH)),
    )


# -- open_product ---------------------------------------------------------------------------------


def test_missing_tiles_read_as_nan_for_every_tag(partial_run: str) -> None:
    ds = open_product(partial_run)
    assert ds.attrs["tiles_done"] == 7 and ds.attrs["tiles_total"] == 8
    bad = tile_slice(*FAILING)
    truth = expected(np.arange(HEIGHT), np.arange(WIDTH))
    for tag, values in (("hgt", truth), ("cls", truth % 7 + 1), ("msk", truth % 3)):
        data = ds[tag]
        assert data.dims == ("row", "col")
        assert data.chunks == ((30, 20), (20, 20, 20, 10)), "chunks must stay the tiles"
        loaded = data.values
        assert np.isnan(loaded[bad]).all(), f"{tag}: the failed tile must read as NaN"
        good = np.ones((HEIGHT, WIDTH), dtype=bool)
        good[bad] = False
        np.testing.assert_array_equal(loaded[good], values[good].astype(loaded.dtype))
    # without the mask, the int16 tag saved with nodata=None shows plausible zeros
    raw = open_product(partial_run, mask_missing=False)
    assert raw["cls"].dtype == np.int16
    assert (raw["cls"].values[bad] == 0).all()


def test_mask_is_lazy_and_follows_the_records(partial_run: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(partial_run, copy)
    location = Location.parse(copy)
    info = read_product_info(location)
    records = rec.open_records(location.zarr_store(), info["records"][0], mode="r+")
    rec.forget_tiles(records, [(0, 2)])  # the data chunk stays on disk, the record goes
    ds = open_product(copy)
    assert ds["hgt"].data.__class__.__module__.startswith("dask")
    assert np.isnan(ds["hgt"].values[tile_slice(0, 2)]).all()
    assert not np.isnan(ds["hgt"].values[tile_slice(0, 1)]).any()
    assert done_grid(location, info).sum() == 6


def test_complete_product_keeps_stored_dtypes(complete_run: str) -> None:
    ds = open_product(complete_run)
    assert ds.attrs["tiles_done"] == ds.attrs["tiles_total"] == 8
    assert ds["cls"].dtype == np.int16  # nothing to mask: no promotion to float
    np.testing.assert_array_equal(
        ds["cls"].values, expected(np.arange(HEIGHT), np.arange(WIDTH)) % 7 + 1
    )


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # rioxarray's Affine `*`
def test_georeferencing_reads_with_rioxarray(partial_run: str, tmp_path: Path) -> None:
    import rioxarray  # the test extra installs it: never skipped
    from affine import Affine

    ds = open_product(partial_run)
    assert ds.rio.crs.to_epsg() == 32631
    assert ds["hgt"].rio.crs.to_epsg() == 32631
    assert ds["hgt"].rio.transform() == Affine(*TRANSFORM)
    np.testing.assert_allclose(ds["x"].values[:2], [600000.25, 600000.75])
    assert ds["hgt"].attrs.get("grid_mapping") == "spatial_ref"
    # dims="xy": the full rioxarray API (bounds, to_raster) on the real coordinates
    geo = open_product(partial_run, dims="xy")
    assert geo["hgt"].dims == ("y", "x")
    assert geo["hgt"].rio.bounds() == (600000.0, 4800000.0 - 25.0, 600000.0 + 35.0, 4800000.0)
    tif = tmp_path / "hgt.tif"
    geo["hgt"].rio.to_raster(tif)
    back = rioxarray.open_rasterio(tif)
    assert back.rio.crs.to_epsg() == 32631 and back.rio.transform() == Affine(*TRANSFORM)


def test_run_metadata_is_attached(partial_run: str) -> None:
    ds = open_product(partial_run)
    meta = ds.attrs["run_metadata"]
    assert meta["experiment"] == "partial"
    assert meta["zarr_orch"]["stats"]["failed"] == 1
    assert ds.attrs["zarr_orch"]["dataset"] == "dsm"


# -- tile status ----------------------------------------------------------------------------------


def test_tile_status_matches_completion_records(partial_run: str) -> None:
    status = tile_status(partial_run)
    assert status.dims == ("tile_row", "tile_col") and status.shape == (2, 4)
    location = Location.parse(partial_run)
    info = read_product_info(location)
    recorded = rec.done_tiles(location.zarr_store(read_only=True), info["records"][0])
    assert recorded == {(r, c) for r in range(2) for c in range(4)} - {FAILING}
    for (row, col), value in np.ndenumerate(status.values):
        assert value == ("done" if (row, col) in recorded else "failed")
    assert "this tile fails on purpose" in str(status["error"].values[FAILING])
    assert status.attrs["tiles_done"] == 7 and status.attrs["tiles_total"] == 8
    assert status.attrs["tiles_failed"] == 1 and status.attrs["tiles_missing"] == 0
    assert status["row_min"].values.tolist() == [0, 30]
    assert status["row_max"].values.tolist() == [30, 50]
    assert status["col_max"].values.tolist() == [20, 40, 60, 70]
    assert np.isnat(status["done_time"].values[FAILING])
    assert int(status["nbytes"].values[0, 0]) == 30 * 20 * (4 + 2 + 1)
    assert status_map(status) == "####\n#X##"
    assert tile_status(partial_run, tag="cls").attrs["tags"] == ["cls"]
    with pytest.raises(ProductError, match="no tag 'nope'"):
        tile_status(partial_run, tag="nope")


def test_failed_tiles_come_from_metadata_json(partial_run: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(Path(partial_run).parent, out)  # a moved run: matched by file name
    meta_path = out / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["zarr_orch"]["failed_tiles"][0]["row"] == FAILING[0]
    meta["zarr_orch"]["failed_tiles"] = []
    meta_path.write_text(json.dumps(meta))
    assert tile_status(out / "dsm.zarr").values[FAILING] == "missing"
    # per-product failures are read too; a recorded tile is done whatever metadata says
    meta["zarr_orch"]["products"]["dsm.tif"]["tiles_failed"] = [
        {"row": 1, "col": 1, "error": "RuntimeError: boom"},
        [0, 0],
    ]
    meta_path.write_text(json.dumps(meta))
    status = tile_status(out / "dsm.zarr")
    assert status.values[1, 1] == "failed" and status["error"].values[1, 1] == "RuntimeError: boom"
    assert status.values[0, 0] == "done"
    summary = summarize_product(out / "dsm.zarr")
    assert (summary.tiles_failed, summary.state) == (1, "failed")
    # a metadata.json that does not list the product pins no failure on it
    del meta["zarr_orch"]["products"]["dsm.tif"]
    meta_path.write_text(json.dumps(meta))
    assert tile_status(out / "dsm.zarr").attrs["tiles_failed"] == 0
    assert tile_status(out / "dsm.zarr", metadata=None).attrs["tiles_failed"] == 0


# -- runs -----------------------------------------------------------------------------------------


def test_open_run_lists_products_with_progress(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_run(out, failing=None, file_name="intermediate/dsm_step1.tif")
    make_run(out, file_name="dsm.tif")  # a second run into the same out_dir, one tile fails
    run = open_run(out)
    by_name = {p.name: p for p in run.products}
    assert set(by_name) == {"dsm.zarr", "intermediate/dsm_step1.zarr"}
    final, inter = by_name["dsm.zarr"], by_name["intermediate/dsm_step1.zarr"]
    assert (final.kind, final.tags, final.tiles_done, final.tiles_total) == (
        "arrays",
        ["hgt", "cls", "msk"],
        7,
        8,
    )
    assert (inter.tiles_done, inter.state) == (8, "complete")
    assert (final.tiles_failed, final.state) == (1, "failed") and final.last_update
    assert run.run["run_id"] and run.metadata["experiment"] == "partial"
    assert run.open("dsm")["hgt"].shape == (HEIGHT, WIDTH)
    table = run.table()
    assert table.loc["dsm.zarr", "done"] == 7
    payload = run.to_dict()
    assert payload["complete"] is False and json.dumps(payload)
    with pytest.raises(ProductError, match="no product 'nope'"):
        run.product("nope")


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_product_error(partial_run: str, tmp_path: Path) -> None:
    with pytest.raises(ProductError, match="does not exist"):
        open_product(tmp_path / "nothing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ProductError, match="not a Zarr v3 group"):
        open_product(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=3)
    with pytest.raises(ProductError, match="not a zarr_orch product"):
        tile_status(tmp_path / "foreign.zarr")
    newer = tmp_path / "newer.zarr"
    shutil.copytree(partial_run, newer)
    group = zarr.open_group(str(newer), mode="r+", zarr_format=3)
    group.attrs["zarr_orch"] = {**group.attrs["zarr_orch"], "format_version": 99}
    with pytest.raises(ProductError, match="newer zarr_orch"):
        open_product(newer)
    with pytest.raises(ProductError, match="not a run directory"):
        open_run(partial_run)
    with pytest.raises(ProductError, match="no zarr_orch run"):
        open_run(tmp_path / "plain")
    with pytest.raises(ProductError, match="no x/y coordinates"):
        ds_no_geo = tmp_path / "nogeo.zarr"
        shutil.copytree(partial_run, ds_no_geo)
        for name in ("x", "y"):
            shutil.rmtree(ds_no_geo / name)
        for tag in ("hgt", "cls", "msk"):
            meta = json.loads((ds_no_geo / tag / "zarr.json").read_text())
            meta["attributes"]["coordinates"] = "spatial_ref"
            (ds_no_geo / tag / "zarr.json").write_text(json.dumps(meta))
        open_product(ds_no_geo, dims="xy")


def test_quicklook_figure(partial_run: str, tmp_path: Path) -> None:
    from zarr_orch.quicklook import quicklook

    out = tmp_path / "ql.png"
    fig = quicklook(partial_run, tag="cls", out=out, figsize=(5, 4), dpi=80)
    assert tuple(fig.get_size_inches() * fig.dpi) == (400, 320)
    assert out.stat().st_size > 1000
    title = fig.axes[0].get_title()
    assert "cls" in title and "7/8 tiles done" in title
    with pytest.raises(ProductError, match="no tag"):
        quicklook(partial_run, tag="nope")
