"""Real CARS 1.3 epipolar applications on synthesised stereo inputs, CARS's own orchestrator vs
zarr_orch's (sequential and multiprocessing), every output raster compared.

Inputs are what CARS's grid generation hands to resampling: two tiny sensor images (no
georeferencing, as raw sensor rasters) and their epipolar rectification grids (2-band GeoTIFFs
of sensor positions, written in CARS's own grid layout). The geometry plugin is CARS's real
``SharelocGeometry``; resampling only uses it to interpolate those grids.
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


def epipolar_grid(path: Path, shift_x: float, angle: float) -> dict[str, Any]:
    """A rectification grid (epipolar -> sensor: a rotation and a shift) as CARS's grid
    generation writes it (band 1 = sensor x, band 2 = sensor y, half-step offset transform)
    and the grid dict it returns."""
    rows = int((EPI_H - 2 * ORIGIN) / SPACING) + 1
    cols = int((EPI_W - 2 * ORIGIN) / SPACING) + 1
    epi_y, epi_x = np.mgrid[0:rows, 0:cols] * SPACING + ORIGIN
    cos, sin = np.cos(angle), np.sin(angle)
    sensor_x = 10 + shift_x + cos * epi_x - sin * epi_y
    sensor_y = 12 + sin * epi_x + cos * epi_y
    transform = Affine(SPACING, 0, ORIGIN - 0.5 * SPACING, 0, SPACING, ORIGIN - 0.5 * SPACING)
    grid = np.stack([sensor_x, sensor_y]).astype("float64")
    return {
        "path": write(path, grid, transform=transform),
        "grid_spacing": [SPACING, SPACING],
        "grid_origin": [ORIGIN, ORIGIN],
        "epipolar_size_x": EPI_W,
        "epipolar_size_y": EPI_H,
        "epipolar_origin_x": ORIGIN,
        "epipolar_origin_y": ORIGIN,
        "epipolar_spacing_x": SPACING,
        "epipolar_spacing": SPACING,
        "disp_to_alt_ratio": 0.7,
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
        "grid_left": epipolar_grid(directory / "grid_left.tif", 0.0, 0.02),
        "grid_right": epipolar_grid(directory / "grid_right.tif", 1.5, 0.02),
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
