"""Replaced tiles served back from the store, so a rerun resumes after a breakpoint.

For datasets that come back to the main process (the replace registry), the writer also
stores a small JSON description of each tile: its attrs, and for each variable its dims,
dtype and a CRC32 of the whole variable *with overlaps*. On a rerun, a done tile is
rebuilt from the product (core window plus the overlaps read from the neighbouring chunks)
and used only if it is byte-identical to what the task returned — otherwise the tile is
simply recomputed. Resuming never changes results.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.storage.encoding import cast_tile
from zarr_orch.storage.points import to_json_safe
from zarr_orch.storage.product import ProductPlan, open_group
from zarr_orch.storage.records import META_GROUP, checksum

logger = logging.getLogger(__name__)


def tiles_array_name(plan: ProductPlan) -> str:
    """Name (inside the meta group) of the per-tile description array."""
    return f"{plan.records}_tiles"


def create_tile_descriptions(group: Any, plan: ProductPlan) -> None:
    """Create the (rows, cols) string array holding one JSON description per tile."""
    meta = group.require_group(META_GROUP)
    name = tiles_array_name(plan)
    if name in meta:
        return
    meta.create_array(
        name,
        shape=plan.grid_shape,
        chunks=(1, 1),
        dtype=str,
        fill_value="",
        dimension_names=["tile_row", "tile_col"],
        attributes={"description": "JSON description of each replaced tile (attrs, variables)"},
        overwrite=False,
    )


def describe_tile(plan: ProductPlan, tile: xr.Dataset) -> str:
    """The JSON description of a tile: attrs and, per saved variable, what rebuilds it."""
    variables = {}
    for name, var in tile.data_vars.items():
        spec = plan.spec(str(name), var.dtype)
        entry: dict[str, Any] = {"dims": list(var.dims), "dtype": str(var.dtype)}
        if spec is not None:
            values = np.asarray(var.values)
            entry["saved"] = True
            entry["has_nan"] = bool(values.dtype.kind == "f" and np.isnan(values).any())
            entry["has_nodata"] = bool(spec.nodata is not None and (values == spec.nodata).any())
            try:
                stored = cast_tile(values, np.dtype(spec.dtype), spec.nodata, name)
                entry["crc"] = checksum(stored)
                entry["same_dtype"] = values.dtype == np.dtype(spec.dtype)
            except Exception:  # the writer reports cast errors; here it only means "not servable"
                entry["crc"] = None
        variables[name] = entry
    coords: dict[str, Any] = {}
    for name, coord in tile.coords.items():
        values = np.asarray(coord.values)
        entry = {"dims": list(coord.dims), "dtype": str(values.dtype)}
        if values.ndim == 1 and values.dtype.kind in "iuf" and values.size:
            step = float(values[1] - values[0]) if values.size > 1 else 1.0
            entry.update(
                start=float(values[0]), step=step, size=int(values.size), crc=checksum(values)
            )
        else:
            entry["crc"] = None  # not an evenly spaced axis: the tile will be recomputed
        coords[name] = entry
    attrs = to_json_safe(dict(tile.attrs))
    return json.dumps({"attrs": attrs, "variables": variables, "coords": coords})


def write_tile_description(plan: ProductPlan, tile: xr.Dataset, row: int, col: int) -> None:
    """Store the tile's description (before its completion record)."""
    from zarr_orch.storage.product import _cached, _group

    array = _cached(
        "tiles",
        plan.location,
        tiles_array_name(plan),
        lambda: _group(plan.location)[f"{META_GROUP}/{tiles_array_name(plan)}"],
    )
    array[row, col] = describe_tile(plan, tile)


def load_tiles(
    plan: ProductPlan, cells: list[tuple[int, int]], done: set[tuple[int, int]]
) -> dict[tuple[int, int], xr.Dataset]:
    """Rebuild replaced tiles from the product; cells that cannot be exact are left out.

    Reads one band of rows per tile row (each chunk is decoded about once, not once per
    neighbour) and checks every rebuilt variable against the CRC its task's output had.
    """
    group = open_group(plan.location, "r")
    name = f"{META_GROUP}/{tiles_array_name(plan)}"
    if name not in group or not cells:
        return {}
    descriptions = group[name]
    by_row: dict[int, list[int]] = {}
    for row, col in cells:
        by_row.setdefault(row, []).append(col)
    result: dict[tuple[int, int], xr.Dataset] = {}
    arrays: dict[str, Any] = {}
    for row, cols in sorted(by_row.items()):
        first, last = min(cols), max(cols)
        texts = descriptions[row, first : last + 1]
        candidates = {}
        for col in cols:
            text = str(texts[col - first])
            parsed = _parse(plan, row, col, text, done) if text else None
            if parsed is not None:
                candidates[col] = parsed
        if not candidates:
            continue
        band_r0 = min(p["box"][0] for p in candidates.values())
        band_r1 = max(p["box"][1] for p in candidates.values())
        bands: dict[str, np.ndarray] = {}
        for col, parsed in candidates.items():
            tile = _rebuild(plan, group, arrays, bands, (band_r0, band_r1), parsed)
            if tile is not None:
                result[(row, col)] = tile
    return result


def _parse(
    plan: ProductPlan, row: int, col: int, text: str, done: set[tuple[int, int]]
) -> dict[str, Any] | None:
    """Check a tile description: everything needed is stored and its neighbours are done."""
    desc = json.loads(text)
    coords = _rebuild_coords(desc.get("coords") or {})
    if coords is None:
        return None
    attrs = desc["attrs"]
    window, overlaps = attrs.get(cst.WINDOW), attrs.get(cst.OVERLAPS) or {}
    if not window:
        return None
    box = (
        int(window[cst.ROW_MIN]) - int(overlaps.get(cst.UP, 0)),
        int(window[cst.ROW_MAX]) + int(overlaps.get(cst.DOWN, 0)),
        int(window[cst.COL_MIN]) - int(overlaps.get(cst.LEFT, 0)),
        int(window[cst.COL_MAX]) + int(overlaps.get(cst.RIGHT, 0)),
    )
    if not _covered(plan, row, col, window, box, done):
        return None
    for entry in desc["variables"].values():
        if not entry.get("saved") or entry.get("crc") is None or not entry.get("same_dtype"):
            return None
        if entry.get("has_nan") and entry.get("has_nodata"):
            return None  # NaN and nodata were merged on write: the tile cannot be rebuilt
    return {"attrs": attrs, "coords": coords, "box": box, "variables": desc["variables"]}


def _rebuild(
    plan: ProductPlan,
    group: Any,
    arrays: dict[str, Any],
    bands: dict[str, np.ndarray],
    band_rows: tuple[int, int],
    parsed: dict[str, Any],
) -> xr.Dataset | None:
    """One tile from the row band, or None when a variable's CRC does not match."""
    r0, r1, c0, c1 = parsed["box"]
    b0, b1 = band_rows
    data_vars = {}
    for var_name, entry in parsed["variables"].items():
        if var_name not in bands:
            if var_name not in arrays:
                arrays[var_name] = group[var_name]
            array = arrays[var_name]
            bands[var_name] = array[b0:b1, :] if array.ndim == 2 else array[:, b0:b1, :]
        band = bands[var_name]
        values = np.ascontiguousarray(band[..., r0 - b0 : r1 - b0, c0:c1])
        if checksum(values) != entry["crc"]:
            return None  # overlaps differ from the neighbours' cores: recompute
        if entry.get("has_nan"):
            spec = plan.spec(var_name, entry["dtype"])
            values = values.copy()
            values[values == spec.nodata] = np.nan
        data_vars[var_name] = (tuple(entry["dims"]), values)
    tile = xr.Dataset(data_vars, coords=parsed["coords"])
    tile.attrs.update(parsed["attrs"])
    return tile


def _rebuild_coords(entries: dict[str, Any]) -> dict[str, Any] | None:
    """Evenly spaced 1-D coordinates from their description, None unless byte-identical."""
    coords = {}
    for name, entry in entries.items():
        if entry.get("crc") is None:
            return None
        values = (entry["start"] + entry["step"] * np.arange(entry["size"])).astype(entry["dtype"])
        if checksum(values) != entry["crc"]:
            return None
        coords[name] = (tuple(entry["dims"]), values)
    return coords


def _covered(
    plan: ProductPlan,
    row: int,
    col: int,
    window: dict,
    box: tuple[int, int, int, int],
    done: set[tuple[int, int]],
) -> bool:
    """True when every tile whose chunk the expanded window touches is recorded done."""
    ch, cw = plan.chunks
    off_r = int(window[cst.ROW_MIN]) // ch - row
    off_c = int(window[cst.COL_MIN]) // cw - col
    r0, r1, c0, c1 = box
    if r0 < 0 or c0 < 0:
        return False
    for i in range(r0 // ch, (r1 - 1) // ch + 1):
        for j in range(c0 // cw, (c1 - 1) // cw + 1):
            if (i - off_r, j - off_c) not in done:
                return False
    return True
