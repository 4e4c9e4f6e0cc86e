"""Helpers for the CARS 1.3 tests: synthetic GeoTIFF inputs, running a real CARS application
with CARS's own Orchestrator or zarr_orch's, and comparing every output raster.

The applications are CARS's own (``cars.applications``), constructed through CARS's
``Application`` factory as its pipelines do; only the orchestrator changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

cars = pytest.importorskip("cars", reason="CARS 1.3 is not installed (pip install 'cars==1.3.*')")
rasterio = pytest.importorskip("rasterio")

from rasterio.transform import from_origin  # noqa: E402

ORCHESTRATORS = ("cars", "zarr_orch")
MODES = ("sequential", "multiprocessing")
H, W = 260, 330
NODATA = -32768.0
TRANSFORM = from_origin(600000.0, 4800000.0, 0.5, 0.5)


def orchestrator_module(which: str) -> Any:
    """The orchestrator module an application would import (CARS's, or zarr_orch's)."""
    if which == "cars":
        from cars.orchestrator import orchestrator as ocht
    else:
        import zarr_orch.orchestrator as ocht
    return ocht


def conf_for(mode: str) -> dict[str, Any]:
    """The orchestrator conf of a mode, as a CARS user writes it (valid for both)."""
    if mode == "sequential":
        return {"mode": "sequential"}
    return {"mode": "multiprocessing", "nb_workers": 2}


def write_raster(path: Path, data: np.ndarray, nodata: Any = NODATA, **extra: Any) -> Path:
    """A small tiled GeoTIFF (1 band) with a UTM CRS."""
    profile = {
        "driver": "GTiff",
        "height": data.shape[0],
        "width": data.shape[1],
        "count": 1,
        "dtype": str(data.dtype),
        "crs": "EPSG:32631",
        "transform": extra.pop("transform", TRANSFORM),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        for band, text in extra.pop("descriptions", {}).items():
            dst.set_band_description(band, text)
    return path


def dsm_inputs(directory: Path, seed: int = 0) -> dict[str, Path]:
    """A DSM with holes (classified buildings, nodata rows), its classification and a DTM."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:H, 0:W]
    dtm = (90 + 0.02 * rows + 0.01 * cols).astype("float32")
    dsm = (dtm + 10 * np.sin(rows / 20.0) + 5 * np.cos(cols / 15.0)).astype("float32")
    dsm += rng.normal(0, 0.1, dsm.shape).astype("float32")
    classif = np.zeros((H, W), "uint8")
    classif[40:80, 50:120] = 1
    classif[170:230, 200:300] = 1
    classif[100:110, 0:40] = 1  # touches the border
    dsm[classif == 1] = NODATA
    dsm[:4, :] = NODATA
    dsm[120:125, 150:160] = NODATA  # a small hole (border interpolation's components)
    return {
        "dsm": write_raster(directory / "dsm.tif", dsm),
        "classif": write_raster(directory / "classif.tif", classif, nodata=None),
        "dtm": write_raster(directory / "dtm.tif", dtm),
    }


def run_app(
    which: str,
    mode: str,
    out_dir: Path,
    body: Callable[[Any, Path], Any],
    **orchestrator_kwargs: Any,
) -> Any:
    """Run `body(orchestrator, out_dir)` inside ``with Orchestrator(...)`` built as CARS
    pipelines build it (keywords conf, out_dir, log_dir, out_yaml_path); returns its result."""
    ocht = orchestrator_module(which)
    conf = dict(conf_for(mode), **orchestrator_kwargs.pop("conf_extra", {}))
    with ocht.Orchestrator(
        orchestrator_conf=conf,
        out_dir=str(out_dir),
        log_dir=str(out_dir / "logs"),
        out_yaml_path=str(out_dir / "metadata.yaml"),
    ) as orchestrator:
        return body(orchestrator, out_dir)


def tifs(directory: Path) -> list[str]:
    """Relative paths of every GeoTIFF under `directory` (inputs copied by apps included)."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.lower().endswith((".tif", ".tiff")):
                found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def read(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels and the georeferencing that matters to a reader (not the block layout)."""
    with rasterio.open(path) as src:
        meta = {
            "crs": src.crs,
            "transform": src.transform,
            "nodata": src.nodata,
            "dtypes": src.dtypes,
            "shape": (src.count, src.height, src.width),
            "descriptions": src.descriptions,
            "tags": {k: v for k, v in src.tags().items() if k != "AREA_OR_POINT"},
            "nbits": src.tags(1, "IMAGE_STRUCTURE").get("NBITS"),
            "tiled": src.profile.get("tiled", False),
        }
        return src.read(), meta


def compare_runs(outputs: dict[tuple[str, str], Path]) -> list[str]:
    """Assert zarr_orch wrote every raster CARS wrote, equal where CARS's modes agree.

    Returns the compared relative paths.
    """
    reference = outputs[("cars", "sequential")]
    names = tifs(reference)
    assert names, f"CARS wrote no GeoTIFF under {reference}"
    for key, directory in outputs.items():
        assert tifs(directory) == names, f"{key} wrote {tifs(directory)}, CARS {names}"
    for name in names:
        cars_seq, meta = read(reference / name)
        cars_mp, _ = read(outputs[("cars", "multiprocessing")] / name)
        stable = np.isclose(cars_seq, cars_mp, equal_nan=True, rtol=0, atol=0)
        for mode in MODES:
            data, other = read(outputs[("zarr_orch", mode)] / name)
            assert other["tiled"], f"{name} ({mode}) is not tiled"
            for field in ("crs", "transform", "nodata", "dtypes", "shape", "descriptions"):
                assert other[field] == meta[field], (name, mode, field, other[field], meta[field])
            assert other["tags"] == meta["tags"], (name, mode, other["tags"], meta["tags"])
            assert other["nbits"] == meta["nbits"], (name, mode)
            same = np.isclose(data, cars_seq, equal_nan=True, rtol=0, atol=0)
            assert same[stable].all(), (
                f"{name} ({mode}): {int((~same & stable).sum())} pixels differ from CARS's"
            )
    return names


def run_matrix(
    tmp_path: Path, body: Callable[[Any, Path], Any], **kwargs: Any
) -> dict[tuple[str, str], Path]:
    """Run `body` with both orchestrators in both modes, each in its own out_dir."""
    outputs = {}
    for which in ORCHESTRATORS:
        for mode in MODES:
            out = tmp_path / f"{which}_{mode}"
            run_app(which, mode, out, body, **kwargs)
            outputs[(which, mode)] = out
    return outputs
