"""GeoTIFF export (`zarr_orch.write_geotiff`, ``zarr-orch export``): COG layout, pixels, memory.

Products are written by real runs; GeoTIFFs are read back with rasterio (GDAL), and the
Cloud-Optimized layout is checked as rio-cogeo does: GDAL's LAYOUT=COG, the ghost header,
tiles, overviews, and overview data stored before the full-resolution data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from affine import Affine
from rasterio.crs import CRS

import zarr_orch as ocht
from zarr_orch import CarsDataset, Orchestrator, TaskFailedError, fill_dataset
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.writers.geotiff import GeoTiffError, GeoTiffReport, write_geotiff

ROOT = Path(__file__).resolve().parent.parent
TRANSFORM = Affine(0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0)


def field(tag: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values of `tag` at (rows, cols): a smooth float field, a uint8 class, a 2-band cube."""
    base = np.add.outer(np.sin(rows / 37.0) * 100, np.cos(cols / 23.0) * 100)
    if tag == "hgt":
        return base.astype("float32")
    if tag == "cls":
        return (np.add.outer(rows // 50, cols // 50) % 5).astype("uint8")
    return np.stack([base, -base]).astype("float32")


def export_task(window: dict, overlaps: dict, saving_info: dict, profile: dict, fail: bool):
    """One tile of every tag; raises for the failing tile."""
    if fail:
        raise RuntimeError("this tile fails on purpose")
    rows = np.arange(window["row_min"], window["row_max"])
    cols = np.arange(window["col_min"], window["col_max"])
    tile = xr.Dataset(
        {
            "hgt": (("row", "col"), field("hgt", rows, cols)),
            "cls": (("row", "col"), field("cls", rows, cols)),
            "cube": (("b", "row", "col"), field("cube", rows, cols)),
        }
    )
    return fill_dataset(
        tile, saving_info=saving_info, window=window, overlaps=overlaps, profile=profile
    )


def make_product(
    out_dir: str | Path,
    height: int,
    width: int,
    tile: int,
    failing: tuple[int, int] | None = None,
    tags: tuple[str, ...] = ("hgt", "cls", "cube"),
    **conf,
) -> str:
    """Run the export pipeline (sequential) and return the product URL."""
    profile = {"height": height, "width": width, "crs": "EPSG:32631", "transform": TRANSFORM}
    nodata = {"hgt": -9999.0, "cls": 255, "cube": -9999.0}
    dtypes = {"hgt": "float32", "cls": "uint8", "cube": "float32"}
    orchestrator = None
    try:
        with Orchestrator(
            {"mode": "sequential", "max_retries": 0, "progress": False, **conf},
            out_dir=str(out_dir),
        ) as orchestrator:
            cds = CarsDataset("arrays", name="ds")
            cds.create_grid(width, height, tile, tile, 0, 0)
            for tag in tags:
                orchestrator.add_to_save_lists(
                    "ds.tif", tag, cds, dtype=dtypes[tag], nodata=nodata[tag]
                )
            [saving_info] = orchestrator.get_saving_infos([cds])
            task = orchestrator.cluster.create_task(export_task)
            for row in range(cds.shape[0]):
                for col in range(cds.shape[1]):
                    cds[row, col] = task(
                        window_array_to_dict(cds.tiling_grid[row, col]),
                        overlap_array_to_dict(cds.overlaps[row, col]),
                        ocht.update_saving_infos(saving_info, row=row, col=col),
                        profile,
                        (row, col) == failing,
                    )
    except TaskFailedError as exc:
        if (exc.row, exc.col) != failing:
            raise
    return orchestrator.products["ds.tif"]


def assert_cog(path: Path, blocksize: int) -> None:
    """The checks rio-cogeo's validator makes, through GDAL's own view of the file."""
    with rasterio.open(path) as dataset:
        assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert dataset.profile["tiled"] and dataset.block_shapes[0] == (blocksize, blocksize)
        assert dataset.compression is not None
        factors = dataset.overviews(1)
        assert factors, "a COG of this size needs overviews"
        full = int(dataset.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        for level in range(len(factors)):
            offset = int(dataset.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=level))
            assert offset < full, "overview data must precede the full-resolution data"
    head = path.read_bytes()[:1024]
    assert b"GDAL_STRUCTURAL_METADATA" in head and b"LAYOUT=IFDS_BEFORE_DATA" in head


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 700x900 product in 256-pixel tiles whose tile (1, 2) failed."""
    return make_product(tmp_path_factory.mktemp("export"), 700, 900, 256, failing=(1, 2))


def test_cog_of_a_partial_product_is_valid_and_equal(partial: str, tmp_path: Path) -> None:
    out = tmp_path / "hgt.tif"
    report = write_geotiff(partial, "hgt", out, blocksize=256)
    assert isinstance(report, GeoTiffReport)
    assert report.shape == (1, 700, 900) and report.missing_tiles == 1
    assert report.dest == str(out) and report.seconds > 0
    assert_cog(out, 256)
    want = field("hgt", np.arange(700), np.arange(900))
    want[256:512, 512:768] = -9999.0  # the failed tile: nodata
    with rasterio.open(out) as dataset:
        assert dataset.crs == CRS.from_epsg(32631)
        assert dataset.transform.almost_equals(TRANSFORM)
        assert dataset.nodata == -9999.0 and dataset.dtypes == ("float32",)
        np.testing.assert_array_equal(dataset.read(1), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hgt.tif"]  # no temp file left


def test_every_dtype_and_band_count(partial: str, tmp_path: Path) -> None:
    group = zarr.open_group(partial, mode="r")
    for tag in ("cls", "cube"):
        out = tmp_path / f"{tag}.tif"
        report = write_geotiff(partial, tag, out, cog=False, overviews="none")
        stored = group[tag][...]
        with rasterio.open(out) as dataset:
            assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG"
            assert dataset.count == report.shape[0] == (2 if tag == "cube" else 1)
            assert dataset.dtypes[0] == str(stored.dtype) and not dataset.overviews(1)
            np.testing.assert_array_equal(dataset.read(), stored.reshape(dataset.count, 700, 900))


def test_metadata_from_array_attributes_and_arguments(tmp_path: Path) -> None:
    product = make_product(tmp_path / "run", 300, 300, 128, tags=("cube", "cls"))
    group = zarr.open_group(product, mode="r+", use_consolidated=False)
    group["cube"].attrs.update(
        {"band_descriptions": ["north", "south"], "geotiff_tags": {"SOURCE": "zarr_orch"}}
    )
    group["cls"].attrs["nbits"] = 4
    write_geotiff(product, "cube", tmp_path / "cube.tif", blocksize=128)
    write_geotiff(product, "cls", tmp_path / "cls.tif", blocksize=128)
    with rasterio.open(tmp_path / "cube.tif") as dataset:
        assert dataset.descriptions == ("north", "south")
        assert dataset.tags()["SOURCE"] == "zarr_orch"
    with rasterio.open(tmp_path / "cls.tif") as dataset:
        assert dataset.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "4"
        np.testing.assert_array_equal(dataset.read(1), group["cls"][...])
    write_geotiff(
        product,
        "cube",
        tmp_path / "cube.tif",  # replaced in place
        blocksize=128,
        band_descriptions=["a", "b"],
        tags={"K": "v"},
    )
    with rasterio.open(tmp_path / "cube.tif") as dataset:
        assert dataset.descriptions == ("a", "b") and dataset.tags()["K"] == "v"
        assert "SOURCE" not in dataset.tags()
    with pytest.raises(GeoTiffError, match="band_descriptions must be a list of 2"):
        write_geotiff(product, "cube", tmp_path / "bad.tif", band_descriptions=["one"])
    with pytest.raises(ocht.ProductError, match=r"tags \['cube', 'cls'\]: choose one"):
        write_geotiff(product, None, tmp_path / "bad.tif")
    with pytest.raises(GeoTiffError, match="compress must be one of"):
        write_geotiff(product, "cls", tmp_path / "bad.tif", compress="rar")
    assert not (tmp_path / "bad.tif").exists()


def test_cli_export(partial: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "zarr_orch.cli", "export"]
    out = tmp_path / "cls.tif"
    done = subprocess.run(
        [*cli, partial, "--tag", "cls", str(out), "--blocksize", "256"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 1 band(s) of 700x900" in done.stdout
    assert "1 tile(s) not recorded as done were written as nodata" in done.stdout
    assert_cog(out, 256)
    refused = subprocess.run(
        [*cli, partial, str(tmp_path / "x.tif")], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 1 and "choose one with tag=... (CLI: --tag NAME)" in refused.stderr


def test_export_from_and_to_s3(moto_server, s3_bucket, s3_options, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/run"
    product = make_product(url, 300, 260, 128, tags=("hgt",), storage_options=s3_options)
    local = tmp_path / "hgt.tif"
    report = write_geotiff(product, None, local, storage_options=s3_options, blocksize=128)
    assert report.missing_tiles == 0
    with rasterio.open(local) as dataset:
        np.testing.assert_array_equal(dataset.read(1), field("hgt", np.arange(300), np.arange(260)))
    remote = f"s3://{s3_bucket}/exports/hgt.tif"
    write_geotiff(product, "hgt", remote, storage_options=s3_options, blocksize=128)
    fs = Location.parse(remote, s3_options).fs
    assert fs.cat_file(remote.removeprefix("s3://")) == local.read_bytes()


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, rasterio, zarr, xarray  # the libraries the export uses, loaded first
    from zarr_orch.storage.writers.geotiff import write_geotiff

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    before = rss("VmRSS:")
    write_geotiff(sys.argv[1], "hgt", sys.argv[2], blocksize=512)
    print(json.dumps({"before": before, "peak": rss("VmHWM:")}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_export_memory_stays_bounded(tmp_path: Path) -> None:
    """A 192 MB raster exports with far less memory than its size (tile by tile)."""
    height, width, tile = 6144, 8192, 1024
    product = make_product(tmp_path / "big", height, width, tile, tags=("hgt",))
    raster_bytes = height * width * 4
    out = tmp_path / "big.tif"
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, product, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    growth = memory["peak"] - memory["before"]
    print(f"export of {raster_bytes / 2**20:.0f} MB: peak RSS grew by {growth / 2**20:.0f} MB")
    assert growth < raster_bytes / 2, f"peak grew by {growth / 2**20:.0f} MB"
    with rasterio.open(out) as dataset:
        assert dataset.shape == (height, width) and dataset.overviews(1)
        rows, cols = slice(5000, 5100), slice(7000, 7300)
        got = dataset.read(1, window=((5000, 5100), (7000, 7300)))
    np.testing.assert_array_equal(
        got, field("hgt", np.arange(height), np.arange(width))[rows, cols]
    )
