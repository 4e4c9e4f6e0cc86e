"""Module-level task functions and small helpers for the Core tests.

Tasks are plain module-level functions so that every execution mode (including spawn and
forkserver workers) can import them; they follow the CARS pattern: compute a tile, then
`fill_dataset` / `fill_dataframe` / `fill_dict` it with its saving_info before returning.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

import zarr_orch as ocht
from zarr_orch import CarsDataset, CarsDict, fill_dataframe, fill_dataset, fill_dict
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict

PROFILE = {
    "crs": "EPSG:32631",
    "transform": (0.5, 0.0, 600000.0, 0.0, -0.5, 4800000.0),
}


def profile_for(height: int, width: int) -> dict[str, Any]:
    """A rasterio-like profile of a height x width raster."""
    return dict(PROFILE, height=height, width=width, count=1)


def field(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Deterministic float32 values computable from pixel coordinates (no zarr_orch)."""
    r = rows[:, None].astype("float64")
    c = cols[None, :].astype("float64")
    return (np.sin(r / 37.0) * np.cos(c / 53.0) * 100 + (r * 7 + c * 3) % 11 + 0.25).astype(
        "float32"
    )


def full_field(height: int, width: int, offset: float = 0.0) -> np.ndarray:
    """The numpy reference of `array_tile` over a whole raster."""
    return field(np.arange(height), np.arange(width)) + np.float32(offset)


def _extended(window: dict, overlaps: dict) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(window["row_min"] - overlaps["up"], window["row_max"] + overlaps["down"])
    cols = np.arange(window["col_min"] - overlaps["left"], window["col_max"] + overlaps["right"])
    return rows, cols


# -- array tasks -------------------------------------------------------------------------------


def array_tile(
    window: dict,
    overlaps: dict,
    saving_info: dict,
    profile: dict | None = None,
    tags: tuple[str, ...] = ("hgt",),
    offset: float = 0.0,
    bands: int = 0,
) -> xr.Dataset:
    """`field` over window + overlaps for each tag; a 3-D ``bands`` tag when bands > 0."""
    rows, cols = _extended(window, overlaps)
    values = field(rows, cols) + np.float32(offset)
    variables: dict[str, Any] = {tag: (("row", "col"), values.copy()) for tag in tags}
    if bands:
        cube = np.stack([values * (i + 1) for i in range(bands)]).astype("float32")
        variables["bands"] = (("band_im", "row", "col"), cube)
    ds = xr.Dataset(variables)
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def constant_tile(
    window: dict,
    overlaps: dict,
    saving_info: dict,
    profile: dict | None = None,
    value: float = 0.0,
    dtype: str = "float32",
    tag: str = "hgt",
) -> xr.Dataset:
    """A tile whose `tag` is `value` everywhere (e.g. nodata or NaN)."""
    rows, cols = _extended(window, overlaps)
    ds = xr.Dataset({tag: (("row", "col"), np.full((rows.size, cols.size), value, dtype=dtype))})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def values_tile(
    window: dict, overlaps: dict, saving_info: dict, profile: dict | None, values: np.ndarray
) -> xr.Dataset:
    """A tile carrying given values (already including overlaps) as tag ``hgt``."""
    ds = xr.Dataset({"hgt": (("row", "col"), np.asarray(values))})
    fill_dataset(ds, saving_info=saving_info, window=window, profile=profile, overlaps=overlaps)
    return ds


def failing_tile(
    window: dict, overlaps: dict, saving_info: dict, profile: dict | None, fail_at: tuple
) -> xr.Dataset:
    """`array_tile`, except that cell `fail_at` raises a ValueError."""
    cell = (saving_info["cars_ds_row"], saving_info["cars_ds_col"])
    if cell == tuple(fail_at):
        raise ValueError(f"deliberate failure in cell {cell}")
    return array_tile(window, overlaps, saving_info, profile)


def marker_tile(window: dict, overlaps: dict, saving_info: dict, marker_dir: str) -> xr.Dataset:
    """Writes a marker file (the side effect of a compute-only dataset), returns a tile."""
    name = f"marker_{saving_info['cars_ds_row']}_{saving_info['cars_ds_col']}"
    with open(os.path.join(marker_dir, name), "w", encoding="utf-8") as handle:
        handle.write("done")
    return array_tile(window, overlaps, saving_info)


def two_outputs(
    window: dict, overlaps: dict, info_a: dict, info_b: dict, profile: dict, marker_dir: str
) -> tuple[xr.Dataset, xr.Dataset]:
    """A nout=2 task: the field and the field + 1000, routed to two datasets."""
    cell = f"{info_a['cars_ds_row']}_{info_a['cars_ds_col']}"
    with open(os.path.join(marker_dir, f"run_{cell}_{os.getpid()}"), "a", encoding="utf-8") as h:
        h.write("x")
    return (
        array_tile(window, overlaps, info_a, profile),
        array_tile(window, overlaps, info_b, profile, offset=1000.0),
    )


def add_one(tile: xr.Dataset, saving_info: dict) -> xr.Dataset:
    """A chained task: the input tile's ``hgt`` + 1, same window and overlaps."""
    ds = xr.Dataset({"hgt": tile["hgt"] + np.float32(1)})
    fill_dataset(
        ds,
        saving_info=saving_info,
        window=tile.attrs["window"],
        profile=tile.attrs.get("profile"),
        overlaps=tile.attrs["overlaps"],
    )
    return ds


def accumulate_final(orchestrator: Any, tile: xr.Dataset) -> xr.Dataset:
    """CARS-style final_function: add what is already on disk (read-modify-write)."""
    old, nodata = orchestrator.get_data("count", tile)
    tile.attrs.setdefault("attributes", {})["had_old"] = old is not None
    if old is not None:
        ov = tile.attrs["overlaps"]
        h, w = tile["count"].shape
        core = tile["count"].values[ov["up"] : h - ov["down"], ov["left"] : w - ov["right"]]
        core += np.where(old == nodata, 0, old).astype(core.dtype)
    return tile


# -- broken tiles (bad-input tests) ------------------------------------------------------------


def no_saving_info_tile(window: dict, overlaps: dict, saving_info: dict) -> xr.Dataset:
    """A tile that forgot its saving_info."""
    tile = array_tile(window, overlaps, saving_info)
    del tile.attrs["saving_info"]
    return tile


def wrong_cell_tile(window: dict, overlaps: dict, saving_info: dict) -> xr.Dataset:
    """A tile whose saving_info names another cell."""
    wrong = ocht.update_saving_infos(saving_info, row=saving_info["cars_ds_row"] + 7, col=0)
    return array_tile(window, overlaps, wrong)


def shifted_window_tile(
    window: dict, overlaps: dict, saving_info: dict, profile: dict, shift: int
) -> xr.Dataset:
    """A tile whose attrs window is moved by `shift` rows (outside the array if large)."""
    tile = array_tile(window, overlaps, saving_info, profile)
    moved = dict(window, row_min=window["row_min"] + shift, row_max=window["row_max"] + shift)
    tile.attrs["window"] = moved
    return tile


def cropped_tile(window: dict, overlaps: dict, saving_info: dict, profile: dict) -> xr.Dataset:
    """A tile one pixel short of its window."""
    tile = array_tile(window, overlaps, saving_info, profile)
    return fill_dataset(tile.isel(row=slice(0, -1)), saving_info=saving_info)


def dataframe_tile(window: dict, overlaps: dict, saving_info: dict) -> pd.DataFrame:
    """A DataFrame where an xarray tile is expected."""
    return fill_dataframe(pd.DataFrame({"x": [1.0, 2.0]}), saving_info=saving_info)


# -- points and dict tasks ---------------------------------------------------------------------


def points_tile(saving_info: dict, nb_points: int, names: list[str] | None = None) -> pd.DataFrame:
    """A point-cloud tile: x, y, z, a class column and `global_id` (pair index)."""
    row, col = saving_info["cars_ds_row"], saving_info["cars_ds_col"]
    idx = np.arange(nb_points)
    frame = pd.DataFrame(
        {
            "x": 1000.0 * col + idx,
            "y": 1000.0 * row - idx,
            "z": (idx * 0.5).astype("float32"),
            "classif": (idx % 3).astype("uint8"),
            "global_id": (idx % 2).astype("int64"),
        }
    )
    attributes = {"source_pc_names": names} if names else {}
    return fill_dataframe(frame, saving_info=saving_info, attributes=attributes)


def dict_tile(saving_info: dict, scale: float) -> CarsDict:
    """A CarsDict tile with numpy content."""
    row, col = saving_info["cars_ds_row"], saving_info["cars_ds_col"]
    data = {
        "cell": [row, col],
        "value": np.float64(scale * (row + 1) * (col + 1)),
        "vector": np.arange(3) * row,
        "nested": {"name": f"tile_{row}_{col}"},
    }
    return fill_dict(CarsDict(data), saving_info=saving_info, attributes={"scale": scale})


# -- application helpers -----------------------------------------------------------------------


def arrays_dataset(
    height: int, width: int, tile: tuple[int, int], overlap: int = 0, name: str = "ds"
) -> CarsDataset:
    """An 'arrays' CarsDataset tiling a height x width raster."""
    cds = CarsDataset("arrays", name=name)
    cds.create_grid(width, height, tile[0], tile[1], overlap, overlap)
    return cds


def schedule(orchestrator: Any, cds: CarsDataset, func: Any, *args: Any, **kwargs: Any) -> None:
    """Fill every cell of `cds` with ``func(window, overlaps, saving_info, *args, **kwargs)``."""
    [saving_info] = orchestrator.get_saving_infos([cds])
    task = orchestrator.cluster.create_task(func)
    for row in range(cds.shape[0]):
        for col in range(cds.shape[1]):
            cds[row, col] = task(
                window_array_to_dict(cds.tiling_grid[row, col]),
                overlap_array_to_dict(cds.overlaps[row, col]),
                ocht.update_saving_infos(saving_info, row=row, col=col),
                *args,
                **kwargs,
            )


def schedule_cells(orchestrator: Any, cds: CarsDataset, func: Any, *args: Any) -> None:
    """Fill every cell with ``func(saving_info, *args)`` (points and dict datasets)."""
    [saving_info] = orchestrator.get_saving_infos([cds])
    task = orchestrator.cluster.create_task(func)
    for row in range(cds.shape[0]):
        for col in range(cds.shape[1]):
            cds[row, col] = task(ocht.update_saving_infos(saving_info, row=row, col=col), *args)


def points_without_id(saving_info: dict) -> pd.DataFrame:
    """A point-cloud tile without the `global_id` column."""
    return fill_dataframe(pd.DataFrame({"x": [1.0, 2.0]}), saving_info=saving_info)
