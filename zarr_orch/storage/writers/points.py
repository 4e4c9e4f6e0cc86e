"""Point-cloud and dict products: one sub-group per tile inside the product group.

Points tiles (pandas DataFrames) keep each column as a 1-D array and the frame's attrs as
JSON; dict tiles (CarsDict) are stored as JSON attributes. A tile's sub-group is replaced
whole on rewrite, then the tile is recorded, so a crash mid-tile never counts as done.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import zarr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError, TileError
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format.product import ProductPlan, TileWrite, _group, _record, open_group
from zarr_orch.storage.format.records import checksum, done_tiles

logger = logging.getLogger(__name__)

PAIR_ID_COLUMN = "global_id"


def tile_group_name(row: int, col: int) -> str:
    """Name of a tile's sub-group."""
    return f"tile_{row}_{col}"


def to_json_safe(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and CRS-like objects to JSON-compatible values."""
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if hasattr(obj, "to_wkt"):
        return obj.to_wkt()
    return repr(obj)


def _write_frame(group: zarr.Group, frame: pd.DataFrame, what: str) -> tuple[int, list[int]]:
    nbytes, crcs = 0, []
    for column in frame.columns:
        values = frame[column].to_numpy()
        if values.dtype.kind == "O" or values.dtype.kind == "U":
            try:
                values = values.astype(str)
            except Exception:
                raise TileError(f"{what} column {column!r} cannot be stored") from None
        elif values.dtype.kind not in "biuf":
            raise TileError(
                f"{what} column {column!r} has dtype {values.dtype}, which cannot be stored"
            )
        name = str(column)
        if "/" in name or name.startswith(("_", ".")) or name == "zarr.json":
            raise TileError(f"{what} column name {name!r} cannot be a Zarr array name")
        dtype = str if values.dtype.kind == "U" else values.dtype
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=(max(1, len(values)),),
            dtype=dtype,
            dimension_names=["point"],
            overwrite=True,
        )
        if len(values):
            array[:] = values
        if values.dtype.kind != "U":
            nbytes += values.nbytes
            crcs.append(checksum(values))
    group.attrs.update({"columns": [str(c) for c in frame.columns], "nb_points": len(frame)})
    return nbytes, crcs


def write_points_tile(plan: ProductPlan, tile: Any, row: int, col: int, what: str) -> TileWrite:
    """Store a DataFrame tile (optionally split by pair) as a sub-group, then record it."""
    if not isinstance(tile, pd.DataFrame):
        raise TileError(f"{what} is a {type(tile).__name__}; a points dataset needs DataFrames")
    group = _group(plan.location)
    tile_group = group.create_group(tile_group_name(row, col), overwrite=True)
    attrs = {k: v for k, v in tile.attrs.items() if k != cst.SAVING_INFO}
    tile_group.attrs["attrs"] = json.loads(json.dumps(to_json_safe(attrs)))
    if plan.save_by_pair:
        nbytes, crcs = _write_by_pair(tile_group, tile, what)
    else:
        nbytes, crcs = _write_frame(tile_group, tile, what)
    result = TileWrite(tags=plan.tag_names, nbytes=nbytes)
    result.record = _record(plan, nbytes, [crcs[0] if crcs else 0] * len(plan.tags))
    return result


def _write_by_pair(group: zarr.Group, tile: pd.DataFrame, what: str) -> tuple[int, list[int]]:
    if PAIR_ID_COLUMN not in tile.columns:
        raise TileError(
            f"{what}: save_points_cloud_by_pair needs a {PAIR_ID_COLUMN!r} column to split by"
        )
    names = (tile.attrs.get(cst.ATTRIBUTES) or {}).get("source_pc_names") or []
    nbytes, crcs = 0, []
    pairs = []
    for pair_id, part in tile.groupby(PAIR_ID_COLUMN, sort=True):
        index = int(pair_id)
        name = str(names[index]) if 0 <= index < len(names) else f"pair_{index}"
        pairs.append(name)
        size, crc = _write_frame(group.create_group(name, overwrite=True), part, what)
        nbytes += size
        crcs += crc
    group.attrs["pairs"] = pairs
    return nbytes, crcs


def write_dict_tile(plan: ProductPlan, tile: Any, row: int, col: int, what: str) -> TileWrite:
    """Store a CarsDict tile's data and attrs as JSON attributes of a sub-group."""
    data = getattr(tile, "data", None)
    if not isinstance(data, dict):
        raise TileError(f"{what} is a {type(tile).__name__}; a dict dataset needs CarsDict tiles")
    try:
        payload = json.loads(json.dumps(to_json_safe(data)))
        attrs = {k: v for k, v in tile.attrs.items() if k != cst.SAVING_INFO}
        attrs_payload = json.loads(json.dumps(to_json_safe(attrs)))
    except (TypeError, ValueError) as exc:
        raise TileError(f"{what} cannot be stored as JSON: {exc}") from None
    group = _group(plan.location)
    tile_group = group.create_group(tile_group_name(row, col), overwrite=True)
    tile_group.attrs.update({"data": payload, "attrs": attrs_payload})
    nbytes = len(json.dumps(payload))
    return TileWrite(
        tags=plan.tag_names, nbytes=nbytes, record=_record(plan, nbytes, [0] * len(plan.tags))
    )


def _done_sorted(location: Location) -> tuple[zarr.Group, list[tuple[int, int]]]:
    group = open_group(location, "r")
    info = group.attrs.get("zarr_orch") or {}
    done: set[tuple[int, int]] = set()
    for records in info.get("records", []):
        done |= done_tiles(location.zarr_store(read_only=True), records)
    return group, sorted(done)


def read_points(url: str | Location, storage_options: dict | None = None) -> pd.DataFrame:
    """All done tiles of a points product as one DataFrame (row-major tile order).

    Columns ``tile_row``/``tile_col`` (and ``pair`` for by-pair products) say where each
    point came from.
    """
    location = Location.parse(url, storage_options)
    group, tiles = _done_sorted(location)
    if (group.attrs.get("zarr_orch") or {}).get("kind") != cst.CARS_DS_TYPE_POINTS:
        raise ProductError(f"{location.url} is not a points product")
    frames = []
    for row, col in tiles:
        tile_group = group[tile_group_name(row, col)]
        parts = [(None, tile_group)]
        if "pairs" in tile_group.attrs:
            parts = [(name, tile_group[name]) for name in tile_group.attrs["pairs"]]
        for pair, part in parts:
            columns = part.attrs.get("columns", [])
            frame = pd.DataFrame({c: part[c][:] for c in columns})
            frame["tile_row"], frame["tile_col"] = row, col
            if pair is not None:
                frame["pair"] = pair
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def read_dicts(url: str | Location, storage_options: dict | None = None) -> dict:
    """{(row, col): data} of every done tile of a dict product."""
    location = Location.parse(url, storage_options)
    group, tiles = _done_sorted(location)
    return {(r, c): dict(group[tile_group_name(r, c)].attrs["data"]) for r, c in tiles}
