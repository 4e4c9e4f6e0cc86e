"""Windowed products: tiles that carry their own windows, merged by one writer.

CARS's rasterization computes each tile's terrain window in the task; windows of
neighbouring tiles overlap and the dataset's ``final_function`` merges each new tile with
what is already on disk (``get_data``). Such tiles do not follow a chunk grid, so they are
written like CARS's saver writes them (the core, window minus overlaps, at the window;
``window=None`` is the whole raster; a later tile overwrites what it covers) into arrays
with a regular chunk grid of their own: the profile's ``blockysize``/``blockxsize`` when
it has them, else `WINDOW_CHUNK` x `WINDOW_CHUNK`. Only the main process writes them, one
tile after the other, so the read-modify-write of partial chunks is safe; every tile's
merge is journaled (`journal.MergeJournal`) and committed with its completion record, so a
record means "this tile's merge is fully applied" and a killed merge is rolled back.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import TileError
from zarr_orch.storage import records as rec
from zarr_orch.storage.journal import MergeJournal
from zarr_orch.storage.product import (
    ProductPlan,
    TagSpec,
    TileWrite,
    array_shape,
    open_read_array,
    open_tag_array,
    store_handle,
)
from zarr_orch.storage.zarr_io import get_many, set_many

logger = logging.getLogger(__name__)

#: chunk side of windowed products whose profile names no block size
WINDOW_CHUNK = 256


def windowed_chunks(profile: dict[str, Any] | None) -> tuple[int, int]:
    """The chunk shape of a windowed product: the profile's block size, else 256x256
    (GDAL's block of a tiled GeoTIFF, as CARS's rasters have)."""
    profile = profile or {}
    try:
        ch, cw = int(profile["blockysize"]), int(profile["blockxsize"])
    except (KeyError, TypeError, ValueError):
        return WINDOW_CHUNK, WINDOW_CHUNK
    if ch > 0 and cw > 0:
        return ch, cw
    return WINDOW_CHUNK, WINDOW_CHUNK


def tile_box(window: Any, shape: tuple[int, int], what: str) -> tuple[int, int, int, int]:
    """(row_min, row_max, col_min, col_max) of a tile's window; None is the whole raster.

    A window reaching outside the raster is refused (CARS's rasterio would fail too).
    """
    height, width = shape
    if window is None:
        return 0, height, 0, width
    try:
        r0, r1 = int(window[cst.ROW_MIN]), int(window[cst.ROW_MAX])
        c0, c1 = int(window[cst.COL_MIN]), int(window[cst.COL_MAX])
    except (KeyError, TypeError, ValueError):
        raise TileError(
            f"{what} has no valid attrs['window'] (row_min, row_max, col_min, col_max): got "
            f"{window!r}; fill it with fill_dataset(..., window=...) or leave it None for the "
            "whole raster"
        ) from None
    if r0 < 0 or c0 < 0 or r1 > height or c1 > width or r1 <= r0 or c1 <= c0:
        raise TileError(
            f"{what} window rows [{r0}, {r1}) cols [{c0}, {c1}) is outside the {height}x{width} "
            "raster of its profile (or empty); crop the window to the raster"
        )
    return r0, r1, c0, c1


def gdal_cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast values as GDAL does when CARS's rasterio writes them: NaN stays NaN in floats;
    floats written to integers round half away from zero, clamp to the range, NaN -> 0."""
    if data.dtype == dtype:
        return np.ascontiguousarray(data)
    if dtype.kind in "iub" and data.dtype.kind == "f":
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        values = np.where(np.isnan(data), 0, data)
        values = np.sign(values) * np.floor(np.abs(values) + 0.5)
        if info is not None:
            values = np.clip(values, info.min, info.max)
        return np.ascontiguousarray(values.astype(dtype))
    if dtype.kind in "iu" and data.dtype.kind in "iub":
        info = np.iinfo(dtype)
        return np.ascontiguousarray(np.clip(data, info.min, info.max).astype(dtype))
    return np.ascontiguousarray(data.astype(dtype))


def _core(values: np.ndarray, overlaps: dict[str, Any]) -> np.ndarray:
    up, down = int(overlaps.get(cst.UP, 0)), int(overlaps.get(cst.DOWN, 0))
    left, right = int(overlaps.get(cst.LEFT, 0)), int(overlaps.get(cst.RIGHT, 0))
    h, w = values.shape[-2:]
    return values[..., up : h - down, left : w - right]


def _chunk_keys(array: Any, tag: str, box: tuple[int, int, int, int]) -> list[str]:
    """Store keys of the chunks of `array` that `box` touches."""
    r0, r1, c0, c1 = box
    ch, cw = int(array.chunks[-2]), int(array.chunks[-1])
    keys = []
    for i in range(r0 // ch, (r1 - 1) // ch + 1):
        for j in range(c0 // cw, (c1 - 1) // cw + 1):
            index = (i, j) if array.ndim == 2 else (0, i, j)
            keys.append(f"{tag}/{array.metadata.encode_chunk_key(index)}")
    return keys


def write_window_tile(plan: ProductPlan, tile: Any, row: int, col: int, what: str) -> TileWrite:
    """Write each tag's core at the tile's window, journaled, then record the tile.

    Runs in the product's single writer (the main process). Tags registered but absent
    from the tile are skipped (a warning unless optional), as CARS's saver does.
    """
    shape2d = array_shape(plan, tile)
    box = tile_box(tile.attrs.get(cst.WINDOW), shape2d, what)
    r0, r1, c0, c1 = box
    overlaps = tile.attrs.get(cst.OVERLAPS) or {}
    layout = dataclasses.replace(plan, chunks=windowed_chunks(tile.attrs.get(cst.PROFILE)))
    result = TileWrite()
    staged: list[tuple[TagSpec, Any, np.ndarray]] = []
    crcs: list[int] = []
    written, missing = [], []
    for tag in plan.tags:
        if tag.name not in tile:
            missing.append(tag.name)
            crcs.append(0)
            if not tag.optional:
                logger.warning("%s has no tag %r: nothing saved for it", what, tag.name)
            continue
        values = np.asarray(tile[tag.name].values)
        if values.ndim not in (2, 3):
            raise TileError(
                f"{what} tag {tag.name!r} has {values.ndim} dimensions; expected (row, col) or "
                "(band, row, col)"
            )
        core = _core(values, overlaps)
        if core.shape[-2:] != (r1 - r0, c1 - c0):
            raise TileError(
                f"{what} tag {tag.name!r} has shape {values.shape} which, minus overlaps, is "
                f"{core.shape[-2:]} and disagrees with its window of {r1 - r0}x{c1 - c0}"
            )
        data = gdal_cast(core, np.dtype(tag.dtype))
        full_shape = shape2d if data.ndim == 2 else (data.shape[0], *shape2d)
        array = open_tag_array(layout, tag, full_shape, tile)
        if array.ndim != data.ndim:
            raise TileError(
                f"{what} tag {tag.name!r} has {data.ndim} dimensions but the stored array has "
                f"{array.ndim}"
            )
        staged.append((tag, array, data))
        crc = rec.checksum(data)
        crcs.append(crc)
        result.crcs[tag.name] = crc
        result.nbytes += data.nbytes
        written.append(tag.name)
    store = store_handle(plan.location)
    block_shape = _records_block(plan)
    block = (row // block_shape[0], col // block_shape[1])
    record_key = rec.block_key(plan.records, *block)
    keys = [k for tag, array, _ in staged for k in _chunk_keys(array, tag.name, box)]
    journal = MergeJournal(store)
    if staged:
        previous = journal.begin((row, col), [*keys, record_key])
    else:  # nothing merged (no registered tag in the tile): recording it is idempotent
        previous = get_many(store, [record_key])
    for _tag, array, data in staged:
        if data.ndim == 2:
            array[r0:r1, c0:c1] = data
        else:
            array[:, r0:r1, c0:c1] = data
    # the record last, into the block bytes the journal read (records are raw uint64)
    old = previous[-1]
    values = (
        np.zeros(block_shape, dtype="<u8")
        if old is None
        else np.frombuffer(old, dtype="<u8").reshape(block_shape).copy()
    )
    values[row % block_shape[0], col % block_shape[1], :] = np.frombuffer(
        rec.record_bytes(result.nbytes, crcs), dtype="<u8"
    )
    set_many(store, {record_key: values.tobytes()})
    if staged:
        journal.commit()
    result.tags, result.missing = tuple(written), tuple(missing)
    return result  # recorded already (with its merge): no record for the RecordWriter


def _records_block(plan: ProductPlan) -> tuple[int, int, int]:
    """Shape of one block of the product's records (opened once per process)."""
    key = (plan.location.url, plan.records, plan.grid_shape)
    shape = _BLOCKS.get(key)
    if shape is None:
        records = rec.open_records(store_handle(plan.location), plan.records)
        shape = tuple(int(n) for n in records.chunks)
        _BLOCKS[key] = shape
    return shape


_BLOCKS: dict[tuple[str, str, tuple[int, int]], tuple[int, ...]] = {}


def read_window_tile(plan: ProductPlan, tag: str, tile: Any, what: str) -> np.ndarray | None:
    """What the store holds for `tag` at the tile's window (None before the tag's array exists)."""
    try:
        array = open_read_array(plan.location, tag)
    except KeyError:
        return None
    r0, r1, c0, c1 = tile_box(tile.attrs.get(cst.WINDOW), tuple(array.shape[-2:]), what)
    if array.ndim == 2:
        return np.asarray(array[r0:r1, c0:c1])
    return np.asarray(array[:, r0:r1, c0:c1])


def recover(plan: ProductPlan) -> tuple[int, int] | None:
    """Roll back a merge a crash left unfinished in the product (start-up, single writer)."""
    return MergeJournal(plan.location.zarr_store()).recover()


def read_merged(plan: ProductPlan, any_done: bool, tag: str, tile: Any) -> tuple[Any, Any]:
    """get_data of a windowed product: (None, None) until a tile is merged, then the
    tile's whole window as stored, whatever chunks it spans (as CARS's saver reads it)."""
    spec = next((t for t in plan.tags if t.name == tag), None)
    if not any_done or spec is None:
        return None, None
    info = tile.attrs.get(cst.SAVING_INFO) or {}
    what = (
        f"tile (row={info.get(cst.CARS_DS_ROW)}, col={info.get(cst.CARS_DS_COL)}) of "
        f"{plan.dataset_name}"
    )
    data = read_window_tile(plan, tag, tile, what)
    return (None, None) if data is None else (data, spec.nodata)
