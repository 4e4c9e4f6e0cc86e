"""Writing one raster tile: crop its overlaps, cast each tag and store it as one whole chunk."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.storage.core.handles import cached_handle
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.encoding import cast_tile, tile_core
from zarr_orch.storage.format.product import (
    ProductPlan,
    TagSpec,
    TileWrite,
    array_shape,
    chunk_index,
    open_tag_array,
)
from zarr_orch.storage.format.tile_descriptions import write_tile_description
from zarr_orch.storage.writers.chunk_writer import ChunkWriter

logger = logging.getLogger(__name__)


def write_arrays_tile(plan: ProductPlan, tile: Any, row: int, col: int, what: str) -> TileWrite:
    """Crop, check, cast and write each tag of an xarray tile as one whole chunk, then record it."""
    shape2d = array_shape(plan, tile)
    _, _, (r0, r1, c0, c1) = chunk_index(plan, tile.attrs.get(cst.WINDOW), shape2d, what)
    overlaps = tile.attrs.get(cst.OVERLAPS) or {}
    result = TileWrite()
    written, missing = [], []
    crcs: list[int] = []
    for tag in plan.specs_for(tile):
        if tag.name not in tile:
            missing.append(tag.name)
            crcs.append(0)
            if not tag.optional:
                logger.warning("%s has no tag %r: nothing saved for it", what, tag.name)
            continue
        core = tile_core(
            tile[tag.name].values, overlaps, (r1 - r0, c1 - c0), f"{what} tag {tag.name!r}"
        )
        data = cast_tile(core, np.dtype(tag.dtype), tag.nodata, f"{what} tag {tag.name!r}")
        array = open_tag_array(plan, tag, data, shape2d, tile, what)
        _write_chunk(plan, tag, array, data, (r0, r1, c0, c1))
        crc = rec.checksum(data)
        crcs.append(crc)
        result.crcs[tag.name] = crc
        result.nbytes += data.nbytes
        written.append(tag.name)
    result.tags, result.missing = tuple(written), tuple(missing)
    if plan.all_variables:
        crcs = [rec.checksum(np.array(crcs, dtype="<u8"))]
    if plan.describe_tiles:
        write_tile_description(plan, tile, row, col)
    result.record = tile_record(plan, result.nbytes, crcs)
    return result


def _write_chunk(plan: ProductPlan, tag: TagSpec, array: Any, data: np.ndarray, box: tuple) -> None:
    """Store one tile's values as its whole chunk: directly when the codec chain allows."""
    r0, r1, c0, c1 = box
    writer = cached_handle(
        "writer",
        plan.location,
        tag.name,
        lambda: ChunkWriter.for_array(plan.location, tag.name, array) or False,
    )
    if writer:
        ch, cw = plan.chunks
        writer.write((r0 // ch, c0 // cw) if data.ndim == 2 else (0, r0 // ch, c0 // cw), data)
    elif data.ndim == 2:
        array[r0:r1, c0:c1] = data
    else:
        array[:, r0:r1, c0:c1] = data


def tile_record(plan: ProductPlan, nbytes: int, crcs: list[int]) -> tuple[str, bytes]:
    """The completion record of a tile whose data is written (the main process stores it).

    Recording is bookkeeping: the receipt carries these few bytes back and the main process
    merges them into blocks of records (`records.RecordWriter`), so a worker pays one object
    write per tile, not two.
    """
    return plan.records, rec.record_bytes(nbytes, crcs)
