"""The per-tile JSON descriptions a product keeps so a rerun can rebuild replaced tiles.

Each description carries the tile's attrs (JSON-safe, and exactly typed when possible) and,
per variable, what rebuilds it: dims, shape, dtype and CRC32s of the whole and of the pieces
that neighbours share. Written by the tile's writer, read back by `readers.tile_store`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.storage.core.handles import cached_group, cached_handle
from zarr_orch.storage.format.encoding import cast_tile, to_json_safe
from zarr_orch.storage.format.product import ProductPlan
from zarr_orch.storage.format.records import META_GROUP, checksum

#: rows and cols (product pixels) of a rectangle: (r0, r1, c0, c1)
Box = tuple[int, int, int, int]


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
    window = tile.attrs.get(cst.WINDOW)
    overlaps = tile.attrs.get(cst.OVERLAPS) or {}
    variables = {}
    for name, var in tile.data_vars.items():
        spec = plan.spec(str(name), var.dtype)
        entry: dict[str, Any] = {
            "dims": list(var.dims),
            "shape": list(var.shape),
            "dtype": str(var.dtype),
        }
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
            if entry["crc"] is not None and window and stored.ndim in (2, 3):
                entry["pieces"] = _piece_crcs(plan, window, overlaps, stored)
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
    description = {"attrs": attrs, "variables": variables, "coords": coords}
    # attrs JSON cannot hold exactly are left out: such a tile is recomputed, never served
    with contextlib.suppress(LossyValue):
        description["typed_attrs"] = encode_exact(dict(tile.attrs))
    return json.dumps(description)


class LossyValue(Exception):
    """A value JSON cannot carry back exactly."""


_TAGS = ("__tuple__", "__scalar__", "__ndarray__", "__items__")


def encode_exact(obj: Any) -> Any:
    """`obj` as JSON that `decode_exact` turns back into an equal object of the same types."""
    if obj is None or type(obj) in (str, int, float, bool):
        return obj
    if type(obj) is list:
        return [encode_exact(v) for v in obj]
    if type(obj) is tuple:
        return {"__tuple__": [encode_exact(v) for v in obj]}
    if type(obj) is dict:
        if all(type(k) is str and k not in _TAGS for k in obj):
            return {k: encode_exact(v) for k, v in obj.items()}
        return {"__items__": [[encode_exact(k), encode_exact(v)] for k, v in obj.items()]}
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return {"__scalar__": encode_exact(obj.item()), "dtype": obj.dtype.str}
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    raise LossyValue(type(obj).__name__)


def decode_exact(obj: Any) -> Any:
    """The object `encode_exact` described."""
    if isinstance(obj, list):
        return [decode_exact(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj and len(obj) == 1:
        return tuple(decode_exact(v) for v in obj["__tuple__"])
    if "__items__" in obj and len(obj) == 1:
        return {decode_exact(k): decode_exact(v) for k, v in obj["__items__"]}
    if "__scalar__" in obj and len(obj) == 2:
        return np.dtype(obj["dtype"]).type(obj["__scalar__"])
    if "__ndarray__" in obj and len(obj) == 3:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    return {k: decode_exact(v) for k, v in obj.items()}


def write_tile_description(plan: ProductPlan, tile: xr.Dataset, row: int, col: int) -> None:
    """Store the tile's description (before its completion record)."""
    array = cached_handle(
        "tiles",
        plan.location,
        tiles_array_name(plan),
        lambda: cached_group(plan.location)[f"{META_GROUP}/{tiles_array_name(plan)}"],
    )
    array[row, col] = describe_tile(plan, tile)


def tile_box(window: dict, overlaps: dict) -> Box:
    """Rows and cols (product pixels) of a tile with its overlaps: (r0, r1, c0, c1)."""
    return (
        int(window[cst.ROW_MIN]) - int(overlaps.get(cst.UP, 0)),
        int(window[cst.ROW_MAX]) + int(overlaps.get(cst.DOWN, 0)),
        int(window[cst.COL_MIN]) - int(overlaps.get(cst.LEFT, 0)),
        int(window[cst.COL_MAX]) + int(overlaps.get(cst.RIGHT, 0)),
    )


def piece_key(rect: Box) -> str:
    """The key of a shared piece in a description's ``pieces``."""
    return "{}:{}:{}:{}".format(*rect)


def margin_rects(chunks: tuple[int, int], window: dict, box: Box) -> Iterator[tuple[int, int, Box]]:
    """Each chunk (i, j) other than the tile's own that its box reaches, with the part reached."""
    ch, cw = chunks
    own = (int(window[cst.ROW_MIN]) // ch, int(window[cst.COL_MIN]) // cw)
    r0, r1, c0, c1 = box
    for i in range(max(r0, 0) // ch, max(r1 - 1, 0) // ch + 1):
        for j in range(max(c0, 0) // cw, max(c1 - 1, 0) // cw + 1):
            if (i, j) != own:
                rect = (
                    max(r0, i * ch),
                    min(r1, (i + 1) * ch),
                    max(c0, j * cw),
                    min(c1, (j + 1) * cw),
                )
                yield i, j, rect


def _edge_rects(window: dict, overlaps: dict) -> Iterator[Box]:
    """The parts of the core that each of the 8 neighbours reaches, if its overlaps mirror ours."""
    r0, r1 = int(window[cst.ROW_MIN]), int(window[cst.ROW_MAX])
    c0, c1 = int(window[cst.COL_MIN]), int(window[cst.COL_MAX])
    up, down = int(overlaps.get(cst.UP, 0)), int(overlaps.get(cst.DOWN, 0))
    left, right = int(overlaps.get(cst.LEFT, 0)), int(overlaps.get(cst.RIGHT, 0))
    row_spans = {-1: (r0, min(r1, r0 + up)), 0: (r0, r1), 1: (max(r0, r1 - down), r1)}
    col_spans = {-1: (c0, min(c1, c0 + left)), 0: (c0, c1), 1: (max(c0, c1 - right), c1)}
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            (a, b), (c, d) = row_spans[dr], col_spans[dc]
            if (dr or dc) and a < b and c < d:
                yield (a, b, c, d)


def _piece_crcs(plan: ProductPlan, window: dict, overlaps: dict, stored: np.ndarray) -> dict:
    """CRC32 of the stored values of every piece a neighbour shares: margins and core edges."""
    box = tile_box(window, overlaps)
    if stored.shape[-2:] != (box[1] - box[0], box[3] - box[2]):
        return {}
    rects = [rect for _, _, rect in margin_rects(plan.chunks, window, box)]
    rects.extend(_edge_rects(window, overlaps))
    pieces = {}
    for rect in rects:
        a, b, c, d = rect
        pieces[piece_key(rect)] = checksum(
            stored[..., a - box[0] : b - box[0], c - box[2] : d - box[2]]
        )
    return pieces
