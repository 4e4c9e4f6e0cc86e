"""Windowed products: tiles that carry their own windows, merged by one writer.

CARS's rasterization computes each tile's terrain window in the task; windows of
neighbouring tiles overlap and the dataset's ``final_function`` merges each new tile with
what is already on disk (``get_data``). Such tiles do not follow a chunk grid, so they are
written like CARS's saver writes them (the core, window minus overlaps, at the window;
``window=None`` is the whole raster; a later tile overwrites what it covers) into arrays
with a regular chunk grid of their own: the profile's ``blockysize``/``blockxsize`` when
it has them, else `WINDOW_CHUNK` x `WINDOW_CHUNK`. Only the main process writes them, one
tile after the other, so the read-modify-write of partial chunks is safe; merges are
committed with their completion records in journaled batches (`merge_batch`), so a record
means "this tile's merge is fully applied" and a killed commit is rolled back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.storage.core.handles import store_handle
from zarr_orch.storage.core.zarr_io import set_many
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.encoding import tile_core
from zarr_orch.storage.format.journal import MergeJournal
from zarr_orch.storage.format.product import (
    ProductPlan,
    TagSpec,
    TileWrite,
    array_shape,
    open_read_array,
    open_tag_array,
    window_box,
)
from zarr_orch.storage.writers.chunk_writer import ChunkWriter
from zarr_orch.storage.writers.merge_batch import BATCH, run_jobs
from zarr_orch.storage.writers.merge_cache import CACHE

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


Box = tuple[int, int, int, int]


def _pieces(box: Box, chunks: tuple[int, int]) -> list[tuple[int, int, Any, Any]]:
    """(i, j, part of the window, part of chunk (i, j)) for every chunk `box` touches: the
    two (..., rows, cols) slices of the same pixels, in window and in chunk coordinates."""
    r0, r1, c0, c1 = box
    ch, cw = chunks
    pieces = []
    for i in range(r0 // ch, (r1 - 1) // ch + 1):
        a0, a1 = max(r0, i * ch), min(r1, (i + 1) * ch)
        for j in range(c0 // cw, (c1 - 1) // cw + 1):
            b0, b1 = max(c0, j * cw), min(c1, (j + 1) * cw)
            window = (..., slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
            chunk = (..., slice(a0 - i * ch, a1 - i * ch), slice(b0 - j * cw, b1 - j * cw))
            pieces.append((i, j, window, chunk))
    return pieces


def _chunk_keys(array: Any, tag: str, box: Box) -> list[str]:
    """Store keys of the chunks of `array` that `box` touches."""
    keys = []
    for i, j, _, _ in _pieces(box, (int(array.chunks[-2]), int(array.chunks[-1]))):
        index = (i, j) if array.ndim == 2 else (0, i, j)
        keys.append(f"{tag}/{array.metadata.encode_chunk_key(index)}")
    return keys


@dataclass
class _Staged:
    """One product's part of a tile merge: its tags' data, its result, its record block."""

    plan: ProductPlan
    box: Box
    tags: list[tuple[TagSpec, Any, np.ndarray]]
    crcs: list[int]
    result: TileWrite
    store: Any = None
    keys: list[str] = field(default_factory=list)
    record_key: str = ""


def _stage(plan: ProductPlan, tile: Any, what: str) -> _Staged:
    """Check and cast the tile's registered tags for one product (nothing written yet)."""
    shape2d = array_shape(plan, tile)
    box = window_box(tile.attrs.get(cst.WINDOW), shape2d, what)
    r0, r1, c0, c1 = box
    overlaps = tile.attrs.get(cst.OVERLAPS) or {}
    layout = dataclasses.replace(plan, chunks=windowed_chunks(tile.attrs.get(cst.PROFILE)))
    staged = _Staged(plan, box, [], [], TileWrite())
    written, missing = [], []
    for tag in plan.tags:
        if tag.name not in tile:
            missing.append(tag.name)
            staged.crcs.append(0)
            if not tag.optional:
                logger.warning("%s has no tag %r: nothing saved for it", what, tag.name)
            continue
        core = tile_core(
            tile[tag.name].values, overlaps, (r1 - r0, c1 - c0), f"{what} tag {tag.name!r}"
        )
        data = gdal_cast(core, np.dtype(tag.dtype))
        array = open_tag_array(layout, tag, data, shape2d, tile, what)
        staged.tags.append((tag, array, data))
        crc = rec.checksum(data)
        staged.crcs.append(crc)
        staged.result.crcs[tag.name] = crc
        staged.result.nbytes += data.nbytes
        written.append(tag.name)
    staged.result.tags, staged.result.missing = tuple(written), tuple(missing)
    return staged


def merge_tile(
    plans: tuple[ProductPlan, ...], tile: Any, row: int, col: int, what: str
) -> dict[tuple[str, str], TileWrite]:
    """Merge a tile into every product of its dataset, as part of ONE journaled commit.

    Runs in the products' single writer (the main process). The merge is applied to the
    chunks and record blocks `merge_batch.BATCH` holds and committed with the merges of the
    tiles around it; the commit's journal (in the first product) holds the previous bytes
    of every key it changes in all products, so a crash leaves either none or all of them
    merged and recorded: a final_function reading one product (weights) to merge another
    sees a consistent state on resume. Tags registered but absent from the tile are
    skipped, as CARS's saver does.
    """
    parts = [_stage(plan, tile, what) for plan in plans]  # every check before any change
    for part in parts:
        part.store = store_handle(part.plan.location)
        block_shape = _records_block(part.plan)
        part.record_key = rec.block_key(
            part.plan.records, row // block_shape[0], col // block_shape[1]
        )
    with BATCH.lock:
        BATCH.check_usable(what)
        if any(_chunk_writer(p.plan, t.name, a) is None for p in parts for t, a, _ in p.tags):
            BATCH.commit()  # zarr writes these chunks itself: one tile, one commit
            _merge_through_zarr(parts, row, col)
        else:
            _merge_in_batch(parts, row, col)
    # recorded with the merge: no record for the background RecordWriter
    return {(part.plan.location.url, part.plan.records): part.result for part in parts}


def _merge_in_batch(parts: list[_Staged], row: int, col: int) -> None:
    """Apply the tile to the batch's chunks and record blocks: every chunk is fetched
    before the first value changes, so a failed read leaves the batch as it was."""
    pastes: list[tuple[np.ndarray, tuple[Any, ...], np.ndarray]] = []
    for part in parts:
        url = part.plan.location.url
        for tag, array, data in part.tags:
            writer = _chunk_writer(part.plan, tag.name, array)
            height, width = (int(n) for n in array.shape[-2:])
            ch, cw = writer.chunk_shape[-2:]
            for i, j, window, target in _pieces(part.box, (ch, cw)):
                coords = (i, j) if data.ndim == 2 else (0, i, j)
                valid = (slice(0, min(ch, height - i * ch)), slice(0, min(cw, width - j * cw)))
                values = BATCH.chunk_for_update(url, part.store, writer, coords, valid)
                pastes.append((values, target, data[window]))
        block_shape = _records_block(part.plan)
        block = BATCH.block_for_update(url, part.store, part.record_key, block_shape)
        record = np.frombuffer(rec.record_bytes(part.result.nbytes, part.crcs), dtype="<u8")
        pastes.append((block, (row % block_shape[0], col % block_shape[1], slice(None)), record))
    for values, target, piece in pastes:
        values[target] = piece
    urls = tuple(part.plan.location.url for part in parts)
    BATCH.added(urls, row, col, parts[0].store)


def _merge_through_zarr(parts: list[_Staged], row: int, col: int) -> None:
    """One tile's merge, committed on its own, for arrays whose codec chain only zarr
    writes (`ChunkWriter.for_array` is None): zarr read-modify-writes their chunks."""
    entries: list[tuple[str, Any, str]] = []
    for part in parts:
        part.keys = [
            k for tag, array, _ in part.tags for k in _chunk_keys(array, tag.name, part.box)
        ]
        url = part.plan.location.url
        entries += [(url, part.store, key) for key in [*part.keys, part.record_key]]
    values: list[bytes | None] = []
    for part in parts:  # what is stored now: remembered by this writer, else read at once
        values += CACHE.read(part.plan.location.url, part.store, [*part.keys, part.record_key])
    journal = MergeJournal(parts[0].store)
    journal.begin((row, col), entries, values)
    previous = iter(values)
    jobs: list[Callable[[], None]] = []
    for part in parts:
        for _key in part.keys:
            next(previous)
        old_block = next(previous)
        r0, r1, c0, c1 = part.box
        for _tag, array, data in part.tags:
            if data.ndim == 2:
                array[r0:r1, c0:c1] = data
            else:
                array[:, r0:r1, c0:c1] = data
        CACHE.forget(part.plan.location.url, part.keys)
        block_shape = _records_block(part.plan)
        records = (
            np.zeros(block_shape, dtype="<u8")
            if old_block is None
            else np.frombuffer(old_block, dtype="<u8").reshape(block_shape).copy()
        )
        records[row % block_shape[0], col % block_shape[1], :] = np.frombuffer(
            rec.record_bytes(part.result.nbytes, part.crcs), dtype="<u8"
        )
        jobs.append(partial(_put_record, part, records.tobytes()))
    run_jobs(jobs)
    journal.commit()


def _put_record(part: _Staged, block: bytes) -> None:
    """Store a product's updated record block (and remember it)."""
    set_many(part.store, {part.record_key: block})
    CACHE.put(part.plan.location.url, part.record_key, block)


def _chunk_writer(plan: ProductPlan, tag: str, array: Any) -> ChunkWriter | None:
    key = (plan.location.url, tag, tuple(array.chunks), str(array.dtype), repr(array.fill_value))
    if key not in _WRITERS:
        _WRITERS[key] = ChunkWriter.for_array(plan.location, tag, array)
    return _WRITERS[key]


_WRITERS: dict[tuple[Any, ...], ChunkWriter | None] = {}


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
    r0, r1, c0, c1 = window_box(tile.attrs.get(cst.WINDOW), tuple(array.shape[-2:]), what)
    writer = _chunk_writer(plan, tag, array)
    if writer is None:  # a codec chain ChunkWriter does not reproduce: zarr reads it
        return np.asarray(array[r0:r1, c0:c1] if array.ndim == 2 else array[:, r0:r1, c0:c1])
    out = np.empty((*array.shape[:-2], r1 - r0, c1 - c0), dtype=writer.dtype)
    pieces = _pieces((r0, r1, c0, c1), writer.chunk_shape[-2:])
    keys = [writer.key((i, j) if array.ndim == 2 else (0, i, j)) for i, j, _, _ in pieces]
    url = plan.location.url
    with BATCH.lock:  # merged but not yet committed: the batch holds the values
        changed = [BATCH.chunk_values(url, key) for key in keys]
        unknown = [key for key, values in zip(keys, changed, strict=True) if values is None]
        raws = iter(CACHE.read(url, store_handle(plan.location), unknown))
    for (_i, _j, window, part), values in zip(pieces, changed, strict=True):
        chunk = writer.decode(next(raws)) if values is None else values
        out[window] = chunk[part]
    return out


def recover_merges(plans: list[ProductPlan]) -> list[tuple[int, int]]:
    """Roll back the merges a crash left unfinished in these windowed products (start-up,
    before their records are read); returns the rolled-back tiles."""
    CACHE.clear()  # a new breakpoint: anything may have changed the products meanwhile
    stores = {plan.location.url: store_handle(plan.location) for plan in plans}
    tiles = []
    for url in sorted(stores):
        tile = MergeJournal(stores[url]).recover(stores)
        if tile is not None:
            tiles.append(tile)
    return tiles


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
