"""Completion records: which tiles of a product are done, stored inside the product.

Records are a small Zarr array ``_zarr_orch/<name>`` of shape (tile rows, tile cols, fields)
with one chunk per tile, so recording a tile is one atomic whole-chunk write made *after*
the tile's data, and finding every done tile is a key listing (no read per tile). A record
holds: done flag, unix time in ms, bytes written and one CRC32 per tag. Records, not chunk
presence, mean "done": zarr does not store all-nodata chunks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from zarr_orch.storage.zarr_io import list_keys

logger = logging.getLogger(__name__)

META_GROUP = "_zarr_orch"
BASE_FIELDS = ("done", "time_ms", "nbytes")


def records_name(tags: Sequence[str]) -> str:
    """The records array name of one set of tags (stable, filesystem-safe)."""
    digest = hashlib.sha1("\x00".join(sorted(tags)).encode()).hexdigest()[:10]
    return f"tiles_{digest}"


def create_records(group: zarr.Group, name: str, grid_shape: tuple[int, int], tags: Sequence[str]):
    """Create (or open and check) the records array for `tags` on a (rows, cols) tile grid."""
    meta = group.require_group(META_GROUP)
    if not meta.attrs.get("description"):
        meta.attrs["description"] = "zarr_orch bookkeeping: per-tile completion records"
    fields = [*BASE_FIELDS, *(f"crc32:{tag}" for tag in tags)]
    shape = (grid_shape[0], grid_shape[1], len(fields))
    if name in meta:
        records = meta[name]
        if tuple(records.shape) != shape:
            from zarr_orch.errors import ProductError

            raise ProductError(
                f"completion records {meta.path}/{name} have shape {tuple(records.shape)}, "
                f"expected {shape}: the product was written with another tile grid or tags"
            )
        return records
    return meta.create_array(
        name,
        shape=shape,
        chunks=(1, 1, len(fields)),
        dtype="uint64",
        fill_value=0,
        compressors=None,
        dimension_names=["tile_row", "tile_col", "field"],
        attributes={"tags": list(tags), "fields": fields},
        config={"write_empty_chunks": True},
        overwrite=False,
    )


def checksum(data: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order): cheap, and enough to notice damaged chunks."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


def record_key(name: str, row: int, col: int) -> str:
    """Store key (relative to the product) of tile (row, col)'s record chunk."""
    return f"{META_GROUP}/{name}/c/{row}/{col}/0"


def record_bytes(nbytes: int, crcs: Sequence[int]) -> bytes:
    """The encoded record chunk (uncompressed little-endian uint64, as the array declares)."""
    return np.array([1, int(time.time() * 1000), nbytes, *crcs], dtype="<u8").tobytes()


def record_tile(
    store: Any, name: str, row: int, col: int, nbytes: int, crcs: Sequence[int]
) -> None:
    """Mark tile (row, col) done: one whole-chunk write, to be made after its data.

    The chunk is encoded here and handed to the store directly: the records array has no
    compressor, so its chunk is the raw values, and this avoids zarr's per-call indexing
    machinery on the hot path (one record per tile).
    """
    from zarr_orch.storage.zarr_io import set_bytes

    set_bytes(store, record_key(name, row, col), record_bytes(nbytes, crcs))


def done_tiles(store: Any, name: str) -> set[tuple[int, int]]:
    """(row, col) of every recorded tile, from one listing of the records' chunk keys."""
    prefix = f"{META_GROUP}/{name}/c/"
    done: set[tuple[int, int]] = set()
    root = getattr(store, "root", None)
    if root is not None and os.path.isdir(os.path.join(str(root), prefix)):
        return _done_tiles_local(os.path.join(str(root), prefix))
    for key in list_keys(store, prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) != 3:
            continue
        try:
            done.add((int(parts[0]), int(parts[1])))
        except ValueError:  # a stray file in the product: not a record (zarr-orch verify)
            logger.warning("ignoring %s%s: not a completion record key", prefix, key[len(prefix) :])
    return done


def _done_tiles_local(base: str) -> set[tuple[int, int]]:
    """Fast path for LocalStore: two levels of scandir instead of an async recursive walk."""
    done: set[tuple[int, int]] = set()
    with os.scandir(base) as rows:
        for row_entry in rows:
            if not row_entry.is_dir() or not row_entry.name.isdigit():
                continue
            row = int(row_entry.name)
            with os.scandir(row_entry.path) as cols:
                for col_entry in cols:
                    if col_entry.name.isdigit() and os.path.exists(
                        os.path.join(col_entry.path, "0")
                    ):
                        done.add((row, int(col_entry.name)))
    return done


def forget_tiles(records: Any, tiles: Sequence[tuple[int, int]]) -> None:
    """Delete the records of `tiles` so a later run recomputes them."""
    from zarr_orch.storage.zarr_io import delete_key

    store_path = records.store_path
    for row, col in tiles:
        delete_key(store_path.store, f"{store_path.path}/c/{row}/{col}/0")


class RecordWriter:
    """Writes completion records in the background, in the main process.

    Receipts arrive only after a tile's data is written, so recording them here keeps the
    order "chunk first, record after" while the record's latency (one small object write,
    ~10 ms on S3) overlaps with the workers' next tiles. `flush` waits for every record and
    returns the tiles whose record could not be written (their data stays; a rerun redoes
    them).
    """

    def __init__(self, max_workers: int = 8) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="zarr_orch-records")
        self._pending: list[tuple[Any, str, int, int]] = []
        self._failed: list[tuple[str, int, int, BaseException]] = []

    def submit(self, location: Any, row: int, col: int, record: tuple[str, bytes]) -> None:
        """Queue one record write."""
        from zarr_orch.storage.product import write_record

        future = self._pool.submit(write_record, location, row, col, record)
        self._pending.append((future, location.url, row, col))
        if len(self._pending) >= 4096:
            self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        keep = []
        for future, url, row, col in self._pending:
            if not wait and not future.done():
                keep.append((future, url, row, col))
                continue
            exc = future.exception()
            if exc is not None:
                self._failed.append((url, row, col, exc))
        self._pending = keep

    def flush(self) -> list[tuple[str, int, int, BaseException]]:
        """Wait for every queued record; return (and forget) the failed ones."""
        self._collect(wait=True)
        failed, self._failed = self._failed, []
        return failed

    def close(self) -> None:
        """Flush and stop the threads."""
        self.flush()
        self._pool.shutdown(wait=True)
