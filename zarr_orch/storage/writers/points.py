"""Writing point-cloud and dict tiles: one sub-group per tile inside the product group.

Points tiles (pandas DataFrames) keep each column as a 1-D array and the frame's attrs as
JSON; dict tiles (CarsDict) are stored as JSON attributes. A tile's sub-group is replaced
whole on rewrite, then the tile is recorded, so a crash mid-tile never counts as done.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd
import zarr

from zarr_orch import constants as cst
from zarr_orch.errors import TileError
from zarr_orch.storage.core.handles import cached_group
from zarr_orch.storage.format.encoding import to_json_safe
from zarr_orch.storage.format.product import ProductPlan, TileWrite, tile_group_name
from zarr_orch.storage.format.records import checksum
from zarr_orch.storage.writers.arrays import tile_record

logger = logging.getLogger(__name__)

PAIR_ID_COLUMN = "global_id"


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
    group = cached_group(plan.location)
    tile_group = group.create_group(tile_group_name(row, col), overwrite=True)
    attrs = {k: v for k, v in tile.attrs.items() if k != cst.SAVING_INFO}
    tile_group.attrs["attrs"] = json.loads(json.dumps(to_json_safe(attrs)))
    if plan.save_by_pair:
        nbytes, crcs = _write_by_pair(tile_group, tile, what)
    else:
        nbytes, crcs = _write_frame(tile_group, tile, what)
    result = TileWrite(tags=plan.tag_names, nbytes=nbytes)
    result.record = tile_record(plan, nbytes, [crcs[0] if crcs else 0] * len(plan.tags))
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
    group = cached_group(plan.location)
    tile_group = group.create_group(tile_group_name(row, col), overwrite=True)
    tile_group.attrs.update({"data": payload, "attrs": attrs_payload})
    nbytes = len(json.dumps(payload))
    return TileWrite(
        tags=plan.tag_names, nbytes=nbytes, record=tile_record(plan, nbytes, [0] * len(plan.tags))
    )
