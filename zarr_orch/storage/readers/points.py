"""Reading points and dict products back: every done tile's table or dict, in tile order."""

from __future__ import annotations

import pandas as pd
import zarr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError
from zarr_orch.storage.core.handles import open_group
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format.product import tile_group_name
from zarr_orch.storage.format.records import done_tiles


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
