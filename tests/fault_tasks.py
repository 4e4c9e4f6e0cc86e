"""Module-level task functions of the fault-matrix and verify tests (importable by workers).

Each returns what a buggy or unlucky CARS task could return: values of a dtype no raster
can hold, inf into an integer tag, a bare numpy array, a 1-D variable, a tile of x86's
negative NaN, or a tile that allocates far more memory than its worker may use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from app_tasks import array_tile

from zarr_orch import fill_dataset


def _extent(window: dict, overlaps: dict) -> tuple[int, int]:
    rows = window["row_max"] - window["row_min"] + overlaps["up"] + overlaps["down"]
    cols = window["col_max"] - window["col_min"] + overlaps["left"] + overlaps["right"]
    return rows, cols


def typed_tile(
    window: dict, overlaps: dict, saving_info: dict, profile: dict | None, kind: str
) -> xr.Dataset:
    """A tile whose ``hgt`` holds values of a bad kind: complex, object, str, inf, 1-D, 4-D."""
    rows, cols = _extent(window, overlaps)
    values: Any
    dims: tuple[str, ...] = ("row", "col")
    if kind == "complex":
        values = np.ones((rows, cols), dtype="complex64")
    elif kind == "object":
        values = np.full((rows, cols), None, dtype=object)
    elif kind == "str":
        values = np.full((rows, cols), "abc")
    elif kind == "inf":
        values = np.full((rows, cols), np.inf, dtype="float32")
    elif kind == "too_big":
        values = np.full((rows, cols), 1000.0, dtype="float32")
    elif kind == "nan":
        values = np.full((rows, cols), np.nan, dtype="float32")
    elif kind == "1d":
        values, dims = np.zeros(cols, dtype="float32"), ("col",)
    elif kind == "4d":
        values, dims = np.zeros((1, 1, rows, cols), dtype="float32"), ("a", "b", "row", "col")
    else:
        raise ValueError(kind)
    ds = xr.Dataset({"hgt": (dims, values)})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def ndarray_tile(window: dict, overlaps: dict, saving_info: dict) -> np.ndarray:
    """A bare numpy array where an xarray.Dataset tile is expected."""
    return np.zeros(_extent(window, overlaps), dtype="float32")


def negative_nan_tile(
    window: dict, overlaps: dict, saving_info: dict, profile: dict | None
) -> xr.Dataset:
    """All NaN, as 0/0 computes it on x86 (sign bit set): zarr stores no chunk for it."""
    zeros = np.zeros(_extent(window, overlaps), dtype="float32")
    with np.errstate(invalid="ignore"):
        values = zeros / zeros
    ds = xr.Dataset({"hgt": (("row", "col"), values)})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def random_tile(
    window: dict, overlaps: dict, saving_info: dict, profile: dict | None
) -> xr.Dataset:
    """Incompressible float32 values (seeded by the tile), to fill a small disk quickly."""
    seed = saving_info["cars_ds_row"] * 1000 + saving_info["cars_ds_col"]
    values = np.random.default_rng(seed).random(_extent(window, overlaps), dtype="float32")
    ds = xr.Dataset({"hgt": (("row", "col"), values)})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def leaky_tile(
    window: dict,
    overlaps: dict,
    saving_info: dict,
    profile: dict | None,
    leak_mb: int,
    at: tuple[int, int],
) -> xr.Dataset:
    """`array_tile`, except that cell `at` first touches `leak_mb` MB and keeps them."""
    if (saving_info["cars_ds_row"], saving_info["cars_ds_col"]) == tuple(at):
        hog = np.ones(leak_mb * 2**20, dtype="uint8")  # ones: pages are really touched
        _LEAKED.append(hog)
        import time

        time.sleep(3.0)  # hold it: the main process samples RSS every 0.5 s
    return array_tile(window, overlaps, saving_info, profile)


_LEAKED: list[np.ndarray] = []
