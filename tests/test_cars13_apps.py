"""Real CARS 1.3 applications run on zarr_orch unchanged, with the same outputs as on CARS's own
orchestrator (sequential and multiprocessing), GeoTIFF outputs included."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cars.applications.application import Application
from cars13_support import (
    MODES,
    compare_runs,
    dsm_inputs,
    read,
    run_app,
    run_matrix,
)

from zarr_orch.errors import TaskFailedError

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dsm_inputs(tmp_path_factory.mktemp("cars13_inputs"))


def filling_app(method: str, **extra: Any) -> Any:
    """A dsm_filling application as CARS's filling pipeline builds it."""
    cfg = {"method": method, "fill_classification": ["1"], **extra}
    return Application("dsm_filling", cfg=cfg)


def test_interpolation_filling(tmp_path: Path, inputs: dict[str, Path]) -> None:
    app = filling_app("interpolation", tile_size=128, margin=16, save_intermediate_data=True)

    def body(orchestrator: Any, out: Path) -> Any:
        app.run(
            str(inputs["dsm"]),
            str(inputs["classif"]),
            None,
            ["1"],
            str(out / "dump"),
            None,
            None,
            dsm_dir=str(out),
            orchestrator=orchestrator,
        )
        assert orchestrator.breakpoint() is False  # no disparity range involved
        # the registered path exists once the breakpoint returns (the next step reads it)
        assert (out / "dsm.tif").exists()

    names = compare_runs(run_matrix(tmp_path, body))
    assert {"dsm.tif", "dump/filling.tif", "dump/dsm_filled.tif"} <= set(names)
    filled, meta = read(tmp_path / "zarr_orch_sequential" / "dsm.tif")
    assert meta["descriptions"] == (None,)
    _, filling_meta = read(tmp_path / "zarr_orch_sequential" / "dump" / "filling.tif")
    assert filling_meta["descriptions"] == ("interpolation",)  # rio_band_description
    original, _ = read(inputs["dsm"])
    holes = original == np.float32(-32768.0)
    assert (filled[holes] != np.float32(-32768.0)).any()  # buildings were filled


def test_border_interpolation_filling(tmp_path: Path, inputs: dict[str, Path]) -> None:
    app = filling_app("border_interpolation", component_min_size=5, border_size=4)

    def body(orchestrator: Any, out: Path) -> Any:
        app.run(
            str(inputs["dsm"]),
            str(inputs["classif"]),
            None,
            ["1"],
            str(inputs["dtm"]),
            str(out / "dump"),
            None,
            None,
            dsm_dir=str(out),
            orchestrator=orchestrator,
            tile_size=128,
        )
        orchestrator.breakpoint()

    names = compare_runs(run_matrix(tmp_path, body))
    assert {"dsm.tif", "dump/filling.tif"} <= set(names)


def test_chain_second_app_reads_and_updates_the_first_ones_geotiff(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    """Border interpolation writes out/dsm.tif; interpolation filling then reads that file and
    updates it in place (dsm_dir=None), in the same orchestrator, as the filling pipeline does."""
    first = filling_app("border_interpolation", component_min_size=5, border_size=4)
    second = filling_app("interpolation", tile_size=128, margin=16)

    def body(orchestrator: Any, out: Path) -> Any:
        first.run(
            str(inputs["dsm"]),
            str(inputs["classif"]),
            None,
            ["1"],
            str(inputs["dtm"]),
            str(out / "dump_border"),
            None,
            None,
            dsm_dir=str(out),
            orchestrator=orchestrator,
            tile_size=128,
        )
        orchestrator.breakpoint()
        step1, _ = read(out / "dsm.tif")
        second.run(
            str(out / "dsm.tif"),
            str(inputs["classif"]),
            None,
            ["1"],
            str(out / "dump_interp"),
            None,
            None,
            dsm_dir=None,
            orchestrator=orchestrator,
        )
        orchestrator.breakpoint()
        step2, _ = read(out / "dsm.tif")
        # step 2 read step 1's file (its own copy of it) and replaced it afterwards
        copy, _ = read(out / "dump_interp" / "dsm_not_filled.tif")
        assert np.array_equal(copy, step1, equal_nan=True)
        assert not np.array_equal(step2, step1, equal_nan=True)

    names = compare_runs(run_matrix(tmp_path, body))
    assert "dsm.tif" in names


def test_weighted_fusion_dsm_merging(tmp_path: Path) -> None:
    """dsm_merging merges two overlapping DSMs on a terrain tiling grid (metres).

    CARS 1.3 cannot produce it: weighted_fusion sets the profile crs to
    ``"EPSG:{}".format(src.crs)``, and str(CRS) is never a bare code with rasterio 1.4+
    ('EPSG:32631', WKT, ...), so CARS's saver drops every tile ("Tile not saved") and leaves
    a dsm.tif without CRS, all nodata. zarr_orch takes its metre grid (no chunk grid, no
    final_function) to the windowed path, runs the tiles, and refuses that CRS loudly,
    naming the tile, instead of writing an empty raster.
    """
    from cars13_support import TRANSFORM, write_raster

    directory = tmp_path / "merge_inputs"
    directory.mkdir()
    rng = np.random.default_rng(3)
    paths: dict[str, list[str]] = {"dsm": [], "weights": []}
    for index, shift in enumerate((0, 60)):
        dsm = (100 + rng.normal(0, 1, (200, 240))).astype("float32")
        weights = rng.uniform(0.5, 2, (200, 240)).astype("float32")
        transform = TRANSFORM * TRANSFORM.translation(shift, 0) if shift else TRANSFORM
        paths["dsm"].append(
            str(write_raster(directory / f"dsm{index}.tif", dsm, transform=transform))
        )
        paths["weights"].append(
            str(write_raster(directory / f"w{index}.tif", weights, nodata=0, transform=transform))
        )
    app = Application("dsm_merging", cfg={"method": "weighted_fusion", "tile_size": 64})

    def body(orchestrator: Any, out: Path) -> Any:
        app.run(
            paths,
            orchestrator,
            None,
            dump_dir=str(out / "dump"),
            dsm_file_name=str(out / "dsm" / "dsm.tif"),
            weights_file_name=str(out / "dsm" / "weights.tif"),
        )
        orchestrator.breakpoint()

    run_app("cars", "sequential", tmp_path / "cars", body)
    data, meta = read(tmp_path / "cars" / "dsm" / "dsm.tif")
    assert meta["crs"] is None and np.all(data == meta["nodata"])  # CARS 1.3's bug
    for mode in MODES:
        out = tmp_path / f"zarr_orch_{mode}"
        with pytest.raises(TaskFailedError) as err:
            run_app("zarr_orch", mode, out, body)
        text = str(err.value)
        assert "tile (row=0, col=0) of" in text, text
        assert "profile crs 'EPSG:EPSG:32631' is not a valid CRS" in text, text
        assert "MisalignedGridError" not in text
        assert not (out / "dsm" / "dsm.tif").exists()  # no GeoTIFF of a failed breakpoint


@pytest.mark.parametrize("mode", MODES)
def test_geotiff_outputs_off_keeps_runs_zarr_only(
    tmp_path: Path, inputs: dict[str, Path], mode: str
) -> None:
    app = filling_app("interpolation", tile_size=128, margin=16)

    def body(orchestrator: Any, out: Path) -> Any:
        app.run(
            str(inputs["dsm"]),
            str(inputs["classif"]),
            None,
            ["1"],
            str(out / "dump"),
            None,
            None,
            dsm_dir=str(out),
            orchestrator=orchestrator,
        )
        orchestrator.breakpoint()

    out = tmp_path / "out"
    run_app("zarr_orch", mode, out, body, conf_extra={"geotiff_outputs": False})
    assert not (out / "dsm.tif").exists()
    assert (out / "dsm.zarr").is_dir() and (out / "dump" / "filling.zarr").is_dir()
    import zarr

    # CARS's GeoTIFF options are kept on the tag array for a later export, in its own metadata
    # and in the consolidated metadata readers such as xarray use (written after the options)
    for consolidated in (False, True):
        filling = zarr.open_group(
            str(out / "dump" / "filling.zarr"), mode="r", use_consolidated=consolidated
        )
        attrs = filling["interpolation_filled_filling"].attrs
        assert attrs["band_descriptions"] == ["interpolation"], consolidated


def test_in_place_update_of_the_input_geotiff(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """dsm_filling with dsm_dir=None registers its own input dsm.tif as output: the file is
    replaced by the filled DSM once the breakpoint returns, as with CARS."""
    results = {}
    for which in ("cars", "zarr_orch"):
        work = tmp_path / which
        work.mkdir()
        dsm = work / "dsm.tif"
        shutil.copy(inputs["dsm"], dsm)
        app = filling_app("interpolation", tile_size=128, margin=16)

        def body(orchestrator: Any, out: Path, dsm: Path = dsm, app: Any = app) -> Any:
            app.run(
                str(dsm),
                str(inputs["classif"]),
                None,
                ["1"],
                str(out / "dump"),
                None,
                None,
                dsm_dir=None,
                orchestrator=orchestrator,
            )
            orchestrator.breakpoint()

        run_app(which, "sequential", work / "out", body)
        results[which] = read(dsm)
    before, _ = read(inputs["dsm"])
    assert not np.array_equal(results["cars"][0], before)
    assert np.array_equal(results["zarr_orch"][0], results["cars"][0])
    assert results["zarr_orch"][1]["nodata"] == results["cars"][1]["nodata"]


def test_sensor_subsampling_resampling(tmp_path: Path) -> None:
    """sensors_subsampling resamples a sensor image and its mask (rasterio, nbits) by 2."""
    from cars13_support import write_raster

    directory = tmp_path / "sensor"
    directory.mkdir()
    rng = np.random.default_rng(7)
    image = write_raster(
        directory / "img.tif", rng.integers(0, 4000, (240, 320)).astype("uint16"), nodata=0
    )
    mask_values = (rng.uniform(size=(240, 320)) > 0.9).astype("uint8")
    mask = write_raster(directory / "msk.tif", mask_values, nodata=None)
    sensor = {
        "image": {"bands": {"b0": {"path": str(image), "band": 0}}},
        "mask": str(mask),
    }
    app = Application("sensors_subsampling", cfg={"method": "rasterio", "tile_size": 128})

    def body(orchestrator: Any, out: Path) -> Any:
        app.run("left", sensor, 2, str(out / "subsampled"), orchestrator)
        orchestrator.breakpoint()

    names = compare_runs(run_matrix(tmp_path, body))
    assert {"subsampled/left/img.tif", "subsampled/left/msk.tif"} <= set(names)


def epipolar_point_cloud(cars_dataset: Any) -> Any:
    """A 110 x 130 epipolar point cloud (x, y, z per pixel, 2% outliers) in 50 x 60 tiles."""
    import xarray as xr

    cds = cars_dataset.CarsDataset("arrays", name="merged")
    cds.create_grid(130, 110, 50, 60, 0, 0)
    rng = np.random.default_rng(1)
    for row in range(cds.shape[0]):
        for col in range(cds.shape[1]):
            w = cars_dataset.window_array_to_dict(cds.tiling_grid[row, col])
            shape = (w["row_max"] - w["row_min"], w["col_max"] - w["col_min"])
            rows, cols = np.mgrid[w["row_min"] : w["row_max"], w["col_min"] : w["col_max"]]
            z = 100 + rng.normal(0, 0.1, shape)
            z[rng.uniform(size=shape) > 0.98] = 180
            cds[row, col] = xr.Dataset(
                {
                    "x": (("row", "col"), 600000 + cols * 0.5 + rng.normal(0, 0.01, shape)),
                    "y": (("row", "col"), 4800000 - rows * 0.5 + rng.normal(0, 0.01, shape)),
                    "z": (("row", "col"), z),
                },
                coords={"row": rows[:, 0], "col": cols[0]},
                attrs={"epsg": 32631},
            )
    return cds


def test_statistical_outlier_removal_saves_points(tmp_path: Path) -> None:
    """A points-saving app: its tasks call run_save_points (CSV, LAZ); the epipolar X/Y/Z
    arrays are saved through the orchestrator as tags named x, y, z."""
    import pandas as pd
    from cars.data_structures import cars_dataset

    app = Application(
        "point_cloud_outlier_removal", cfg={"method": "statistical", "save_intermediate_data": True}
    )

    def body(orchestrator: Any, out: Path) -> Any:
        app.run(
            epipolar_point_cloud(cars_dataset),
            orchestrator=orchestrator,
            point_cloud_dir=str(out / "pc"),
            point_cloud_format="csv",
            dump_dir=str(out / "dump"),
            epsg=32631,
        )
        orchestrator.breakpoint()

    outputs = run_matrix(tmp_path, body)
    names = compare_runs(outputs)
    assert {"pc/tif/X.tif", "pc/tif/Y.tif", "pc/tif/Z.tif"} <= set(names)

    def files(directory: Path) -> list[str]:
        return sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.is_file() and p.suffix in (".csv", ".laz")
        )

    reference = outputs[("cars", "sequential")]
    expected = files(reference)
    assert len([n for n in expected if n.endswith(".csv")]) == 6  # one per tile (3 x 2)
    for key, directory in outputs.items():
        assert files(directory) == expected, key
        for name in expected:
            if name.endswith(".csv"):
                pd.testing.assert_frame_equal(
                    pd.read_csv(directory / name), pd.read_csv(reference / name)
                )
