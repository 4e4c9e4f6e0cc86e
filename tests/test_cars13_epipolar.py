"""Real CARS 1.3 epipolar applications on synthesised stereo inputs, CARS's own orchestrator vs
zarr_orch's (sequential and multiprocessing), every output raster compared.

Inputs are what CARS's grid generation hands to resampling: two tiny sensor images (no
georeferencing, as raw sensor rasters) and their epipolar rectification grids (2-band GeoTIFFs
of sensor positions, written in CARS's own grid layout). The geometry plugin is CARS's real
``SharelocGeometry``; resampling only uses it to interpolate those grids. The local disparity
range also localises through the right sensor's model: an RPC00B model synthesised in the
image's GeoTIFF tags (shareloc reads it through rasterio) over a DEM median, with DEM min/max.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cars13_support import compare_runs, read, run_matrix

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402

pytestmark = pytest.mark.timeout(600)

SENSOR_H, SENSOR_W = 150, 170
EPI_H, EPI_W = 100, 120
SPACING, ORIGIN = 10.0, -30.0  # grid step and origin, in epipolar pixels (both axes)


def write(path: Path, data: np.ndarray, **profile: Any) -> str:
    """A GeoTIFF of `data` ((bands,) rows, cols); sensor rasters carry no georeferencing."""
    data = data if data.ndim == 3 else data[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=data.shape[1],
            width=data.shape[2],
            count=data.shape[0],
            dtype=str(data.dtype),
            **profile,
        ) as dst:
            dst.write(data)
    return str(path)


def epipolar_grid(
    path: Path,
    shift: tuple[float, float],
    angle: float,
    shape: tuple[int, int] = (EPI_H, EPI_W),
    disp_to_alt_ratio: float = 0.7,
) -> dict[str, Any]:
    """A rectification grid (epipolar -> sensor: a rotation and a shift) as CARS's grid
    generation writes it (band 1 = sensor x, band 2 = sensor y, half-step offset transform)
    and the grid dict it returns, for an epipolar image of `shape`."""
    rows = int((shape[0] - 2 * ORIGIN) / SPACING) + 1
    cols = int((shape[1] - 2 * ORIGIN) / SPACING) + 1
    epi_y, epi_x = np.mgrid[0:rows, 0:cols] * SPACING + ORIGIN
    cos, sin = np.cos(angle), np.sin(angle)
    sensor_x = shift[0] + cos * epi_x - sin * epi_y
    sensor_y = shift[1] + sin * epi_x + cos * epi_y
    transform = Affine(SPACING, 0, ORIGIN - 0.5 * SPACING, 0, SPACING, ORIGIN - 0.5 * SPACING)
    grid = np.stack([sensor_x, sensor_y]).astype("float64")
    return {
        "path": write(path, grid, transform=transform),
        "grid_spacing": [SPACING, SPACING],
        "grid_origin": [ORIGIN, ORIGIN],
        "epipolar_size_x": shape[1],
        "epipolar_size_y": shape[0],
        "epipolar_origin_x": ORIGIN,
        "epipolar_origin_y": ORIGIN,
        "epipolar_spacing_x": SPACING,
        "epipolar_spacing": SPACING,
        "disp_to_alt_ratio": disp_to_alt_ratio,
    }


@pytest.fixture(scope="module")
def stereo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Left/right sensor images (uint16, nodata 0), a left mask, and both epipolar grids."""
    directory = tmp_path_factory.mktemp("cars13_stereo")
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:SENSOR_H, 0:SENSOR_W]
    texture = 1000 + 300 * np.sin(cols / 9.0) + 200 * np.cos(rows / 7.0)
    left = (texture + rng.normal(0, 20, texture.shape)).astype("uint16")
    right = np.roll(left, 3, axis=1)
    right[:, :3] = 0  # nodata
    mask = (rng.uniform(size=left.shape) > 0.95).astype("uint8")

    def sensor(name: str, image: np.ndarray, **extra: Any) -> dict[str, Any]:
        path = write(directory / f"{name}.tif", image)
        return {"image": {"bands": {"b0": {"path": path, "band": 0}}, "no_data": 0}, **extra}

    return {
        "left": sensor("left", left, mask=write(directory / "left_msk.tif", mask)),
        "right": sensor("right", right),
        "grid_left": epipolar_grid(directory / "grid_left.tif", (10, 12), 0.02),
        "grid_right": epipolar_grid(directory / "grid_right.tif", (11.5, 12), 0.02),
    }


def test_bicubic_resampling(tmp_path: Path, stereo: dict[str, Any]) -> None:
    """Resampling into epipolar geometry: 3 x 3 tiles with overlaps (bicubic interpolation
    over the grids), left/right images and masks saved through the orchestrator."""
    from cars.applications.application import Application
    from cars.core.geometry.abstract_geometry import AbstractGeometry

    app = Application(
        "resampling", cfg={"method": "bicubic", "strip_height": 40, "save_intermediate_data": True}
    )
    geometry = AbstractGeometry("SharelocGeometry")  # CARS's real plugin, no DEM needed here

    def body(orchestrator: Any, out: Path) -> Any:
        left, right = app.run(
            stereo["left"],
            stereo["right"],
            stereo["grid_left"],
            stereo["grid_right"],
            geometry,
            orchestrator=orchestrator,
            pair_folder=str(out / "pair"),
            tile_width=50,
            tile_height=40,
            required_bands={"left": ["b0"], "right": ["b0"]},
        )
        assert left.shape == right.shape == (3, 3)
        orchestrator.breakpoint()

    names = compare_runs(run_matrix(tmp_path, body))
    assert set(names) == {
        "pair/epi_img_left.tif",
        "pair/epi_img_right.tif",
        "pair/epi_img_left_mask.tif",
        "pair/epi_img_right_mask.tif",
    }  # classification and edges are optional tags no tile carries: CARS writes none either
    left, meta = read(tmp_path / "zarr_orch_multiprocessing" / "pair" / "epi_img_left.tif")
    right, _ = read(tmp_path / "zarr_orch_multiprocessing" / "pair" / "epi_img_right.tif")
    assert meta["shape"] == (1, EPI_H, EPI_W)
    assert not np.array_equal(left, right)  # the right grid is shifted by 1.5 pixels
    assert np.nanstd(left) > 50  # the texture was resampled, not a constant


LAT0, LON0 = 43.6, 1.44  # scene centre (UTM 31N)


def rpc_model(parallax: float) -> Any:
    """An RPC00B model of a north-up sensor over the scene: line from latitude, sample from
    longitude plus `parallax` times the normalised height (the stereo baseline)."""
    from rasterio.rpc import RPC

    def coefficients(**terms: float) -> list[float]:
        order = ["one", "lon", "lat", "height"]  # the first RPC00B terms: 1, L, P, H
        values = [0.0] * 20
        for term, value in terms.items():
            values[order.index(term)] = value
        return values

    return RPC(
        height_off=100,
        height_scale=100,
        lat_off=LAT0,
        lat_scale=0.0007,
        long_off=LON0,
        long_scale=0.001,
        line_off=SENSOR_H / 2,
        line_scale=SENSOR_H / 2,
        samp_off=SENSOR_W / 2,
        samp_scale=SENSOR_W / 2,
        line_num_coeff=coefficients(lat=-1.0),
        line_den_coeff=coefficients(one=1.0),
        samp_num_coeff=coefficients(lon=1.0, height=parallax),
        samp_den_coeff=coefficients(one=1.0),
    )


@pytest.fixture(scope="module")
def rpc_scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A right sensor image with its RPC model in its GeoTIFF tags (read by shareloc through
    rasterio), its rectification grid, and the DEM median/min/max (EPSG:4326) of the scene."""
    from rasterio.transform import from_origin

    directory = tmp_path_factory.mktemp("cars13_rpc")
    rng = np.random.default_rng(9)
    image = (1000 + rng.normal(0, 20, (SENSOR_H, SENSOR_W))).astype("uint16")
    right = write(directory / "right.tif", image, rpcs=rpc_model(1.0))
    size = 40
    transform = from_origin(LON0 - 0.0016, LAT0 + 0.0012, 0.0032 / size, 0.0024 / size)
    rows, cols = np.mgrid[0:size, 0:size]
    median = 100 + 10 * np.sin(cols / 5.0) + 5 * np.cos(rows / 4.0)
    dems = {
        "median": median,
        "min": 80 + rng.uniform(0, 5, median.shape),
        "max": 125 + rng.uniform(0, 5, median.shape),
    }
    paths = {
        name: write(
            directory / f"dem_{name}.tif",
            values.astype("float32"),
            crs="EPSG:4326",
            transform=transform,
            nodata=-32768,
        )
        for name, values in dems.items()
    }
    # the model's epipolar lines are its rows: an identity rectification grid
    grid = epipolar_grid(
        directory / "grid_right.tif", (0, 0), 0.0, (SENSOR_H, SENSOR_W), disp_to_alt_ratio=1.0
    )
    sensor = {
        "image": {"bands": {"b0": {"path": right, "band": 0}}, "no_data": 0},
        "geomodel": {"path": right, "model_type": "RPC"},
    }
    return {"right": sensor, "grid_right": grid, **paths}


def test_local_disparity_grids(tmp_path: Path, rpc_scene: dict[str, Any]) -> None:
    """Dense matching's local disparity range: grids from the DEM min/max through the right
    sensor's RPC model (CARS's SharelocGeometry with the DEM median), 2 x 3 grid tiles in grid
    units with a propagation filter, each saved at its own window."""
    from cars.applications.application import Application
    from cars.core.geometry.abstract_geometry import AbstractGeometry

    app = Application(
        "dense_matching",
        cfg={
            "save_intermediate_data": True,
            "epi_disp_grid_tile_size": 8,
            "disp_range_propagation_filter_size": 20,
        },
    )
    geometry = AbstractGeometry("SharelocGeometry", dem=rpc_scene["median"])
    ranges = {}

    def body(orchestrator: Any, out: Path) -> Any:
        grids = app.generate_disparity_grids(
            rpc_scene["right"],
            rpc_scene["grid_right"],
            geometry,
            dem_min=rpc_scene["min"],
            dem_max=rpc_scene["max"],
            pair_folder=str(out / "dense_matching"),
            orchestrator=orchestrator,
        )
        ranges[out.name] = (grids["global_min"], grids["global_max"])
        assert Path(grids["grid_min_path"]).exists()  # the next step (dense matching) reads it

    names = compare_runs(run_matrix(tmp_path, body))
    assert set(names) == {"dense_matching/disp_min_grid.tif", "dense_matching/disp_max_grid.tif"}
    # the global range comes from every tile's dict output, as CARS's
    assert len(set(ranges.values())) == 1, ranges
    low, high = ranges["cars_sequential"]
    assert low < -10 and high > 10
    grid_min, meta = read(tmp_path / "zarr_orch_multiprocessing" / names[1])
    grid_max, _ = read(tmp_path / "zarr_orch_multiprocessing" / names[0])
    assert meta["shape"] == (1, 16, 18)  # (150 / 10 + 1) x (170 / 10 + 1) grid points
    assert (grid_min < grid_max).all()  # a real range everywhere, no empty (zero) tile
