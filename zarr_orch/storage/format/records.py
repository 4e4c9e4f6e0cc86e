"""Completion records: which tiles of a product are done, stored inside the product.

Records are a small uint64 array ``_zarr_orch/<name>`` of shape (tile rows, tile cols, fields),
uncompressed, in blocks of up to 32x32 tiles; since format 2 they are plain objects (a
``records.json`` layout and raw blocks, `RawRecords`), not a Zarr node, so GDAL and xarray
never show them as a raster. A record holds: done flag,
unix time in ms, bytes written and one CRC32 per tag. Records, not chunk presence, mean
"done": zarr does not store all-nodata chunks.

Only the main process writes records, after the tile's data is on disk (the receipt says
so): `RecordWriter` merges them into their block and rewrites each changed block as soon as
its previous write has finished (group commit; at most every `OBJECT_STORE_FLOOR` seconds on
object stores), so a tile costs its data chunk and a share of one small block write, not a
second object of its own. A crash loses only the records of the tiles that finished during
the last block write (about the tiles in flight): their data is on disk and a rerun
rewrites them identically. Finding every done tile is a key listing plus
one read per block (O(tiles / 1024) requests on an object store).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import zarr

from zarr_orch.errors import ProductError
from zarr_orch.storage.core.atomic_files import is_temp_name
from zarr_orch.storage.core.handles import store_handle
from zarr_orch.storage.core.zarr_io import get_bytes, get_many, list_keys, set_bytes

logger = logging.getLogger(__name__)

META_GROUP = "_zarr_orch"
BASE_FIELDS = ("done", "time_ms", "nbytes")
#: tiles per side of one records chunk
BLOCK = 32
#: the plain JSON object describing a records array of format 2 (not a Zarr node)
LAYOUT_FILE = "records.json"
#: seconds between two record writes of one product on an object store (S3 and the like),
#: where every request costs; see `write_floor` (local stores write back to back)
OBJECT_STORE_FLOOR = 0.2


def records_name(tags: Sequence[str]) -> str:
    """The records array name of one set of tags (stable, filesystem-safe)."""
    digest = hashlib.sha1("\x00".join(sorted(tags)).encode()).hexdigest()[:10]
    return f"tiles_{digest}"


def create_records(group: zarr.Group, name: str, grid_shape: tuple[int, int], tags: Sequence[str]):
    """Create (or open and check) the records array for `tags` on a (rows, cols) tile grid."""
    try:
        group[META_GROUP]
    except KeyError:  # one metadata write, attributes included (object stores: one PUT)
        group.create_group(
            META_GROUP,
            attributes={"description": "zarr_orch bookkeeping: per-tile completion records"},
        )
    fields = [*BASE_FIELDS, *(f"crc32:{tag}" for tag in tags)]
    shape = (grid_shape[0], grid_shape[1], len(fields))
    store = group.store_path.store
    base = f"{group.store_path.path.strip('/')}/" if group.store_path.path.strip("/") else ""
    try:
        records = open_records(store, f"{name}", prefix=base)
    except FileNotFoundError:
        records = None
    if records is not None:
        if tuple(records.shape) != shape:
            raise ProductError(
                f"completion records {META_GROUP}/{name} have shape {tuple(records.shape)}, "
                f"expected {shape}: the product was written with another tile grid or tags"
            )
        return records
    chunks = (min(BLOCK, shape[0]) or 1, min(BLOCK, shape[1]) or 1, len(fields))
    return RawRecords.create(store, name, shape, chunks, list(tags), fields, prefix=base)


def checksum(data: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order): cheap, and enough to notice damaged chunks."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


def record_bytes(nbytes: int, crcs: Sequence[int]) -> bytes:
    """One tile's record (done, time, bytes, CRCs): the uint64 values the array stores."""
    return np.array([1, int(time.time() * 1000), nbytes, *crcs], dtype="<u8").tobytes()


def block_key(name: str, block_row: int, block_col: int) -> str:
    """Store key (relative to the product) of one block of records."""
    return f"{META_GROUP}/{name}/c/{block_row}/{block_col}/0"


def open_records(store: Any, name: str, mode: str = "r", prefix: str = "") -> Any:
    """The records array `name` of the product at `store` (FileNotFoundError when absent).

    Format 2 stores them as plain objects (`RawRecords`), which GDAL and xarray do not see
    as arrays; products of format 1 hold a Zarr array, opened as such.
    """
    layout = get_bytes(store, f"{prefix}{META_GROUP}/{name}/{LAYOUT_FILE}")
    if layout is not None:
        return RawRecords(store, name, json.loads(layout), prefix=prefix, writable=mode != "r")
    return zarr.open_array(store, path=f"{prefix}{META_GROUP}/{name}", mode=mode, zarr_format=3)


def find_records(store: Any) -> list[str]:
    """Names of the records arrays present in the product at `store` (both formats)."""
    names = set()
    for key in list_keys(store, f"{META_GROUP}/"):
        parts = key[len(META_GROUP) + 1 :].split("/")
        if len(parts) == 2 and parts[1] in (LAYOUT_FILE, "zarr.json"):
            names.add(parts[0])
    return sorted(names)


def read_records(store: Any, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col, record) of every tile with a non-empty record, block by block.

    One listing of the block keys, then only the blocks that exist are fetched
    (concurrently on object stores); a block that cannot be decoded is skipped with a
    warning (``zarr-orch verify`` reports it).
    """
    try:
        array = open_records(store, name)
    except FileNotFoundError:
        return
    block_rows, block_cols, nfields = (int(n) for n in array.chunks)
    rows, cols = int(array.shape[0]), int(array.shape[1])
    prefix = f"{META_GROUP}/{name}/c/"
    blocks = []
    for key in list_keys(store, prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[2] == "0":
            blocks.append((int(parts[0]), int(parts[1])))
        elif is_temp_name(key):  # a block being written now, or a killed writer's temp file
            logger.debug("ignoring %s: a temp file, not a records block", key)
        else:  # a stray file in the product: not a record (zarr-orch verify)
            logger.warning("ignoring %s%s: not a completion record key", prefix, key[len(prefix) :])
    blocks.sort()
    size = block_rows * block_cols * nfields * 8
    for start in range(0, len(blocks), 256):
        batch = blocks[start : start + 256]
        raws = get_many(store, [block_key(name, bi, bj) for bi, bj in batch])
        for (bi, bj), raw in zip(batch, raws, strict=True):
            if raw is None:
                continue
            if len(raw) != size:
                logger.warning(
                    "ignoring records block %s%d/%d/0: %d bytes instead of %d",
                    prefix,
                    bi,
                    bj,
                    len(raw),
                    size,
                )
                continue
            values = np.frombuffer(raw, dtype="<u8").reshape(block_rows, block_cols, nfields)
            for a, b in zip(*np.nonzero(values.any(axis=2)), strict=True):
                row, col = bi * block_rows + int(a), bj * block_cols + int(b)
                if row < rows and col < cols:
                    yield row, col, values[a, b]


def done_tiles(store: Any, name: str) -> set[tuple[int, int]]:
    """(row, col) of every tile recorded done."""
    return {(row, col) for row, col, values in read_records(store, name) if int(values[0]) == 1}


def tiles_by_block(
    records: Any, tiles: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """The tiles of `tiles` inside the records' grid, grouped by records block."""
    block_rows, block_cols = int(records.chunks[0]), int(records.chunks[1])
    rows, cols = int(records.shape[0]), int(records.shape[1])
    blocks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for row, col in tiles:
        if 0 <= row < rows and 0 <= col < cols:
            blocks.setdefault((row // block_rows, col // block_cols), []).append((row, col))
    return blocks


def rewrite_block(
    records: Any, block: tuple[int, int], updates: dict[tuple[int, int], Any]
) -> None:
    """Set the records of `updates`' tiles (a record row, or 0 to forget) in one block write.

    The block is read again first, so the records of its other tiles are kept as stored.
    """
    block_rows, block_cols = int(records.chunks[0]), int(records.chunks[1])
    r0, c0 = block[0] * block_rows, block[1] * block_cols
    box = (slice(r0, r0 + block_rows), slice(c0, c0 + block_cols))
    values = np.array(records[box])
    for (row, col), record in updates.items():
        values[row - r0, col - c0, :] = record
    records[box] = values


def forget_tiles(records: Any, tiles: Sequence[tuple[int, int]]) -> None:
    """Clear the records of `tiles` so a later run recomputes them (one rewrite per block)."""
    for block, members in sorted(tiles_by_block(records, tiles).items()):
        rewrite_block(records, block, dict.fromkeys(members, 0))


def write_floor(location: Any) -> float:
    """Shortest time between two record writes of one product at `location` (seconds).

    Zero on local and in-memory stores, where a block write costs about a millisecond:
    the next batch goes out as soon as the previous write ends. Object stores charge
    per request, so there a batch waits at least `OBJECT_STORE_FLOOR` seconds.
    """
    return (
        0.0 if getattr(location, "protocol", "file") in ("file", "memory") else OBJECT_STORE_FLOOR
    )


class RecordWriter:
    """Writes completion records in the background, in the main process: group commit.

    Receipts arrive only after a tile's data is written, so recording them here keeps the
    order "chunk first, record after". A background thread writes whatever records are
    pending as soon as its previous write has finished: a batch is what arrived meanwhile
    (large under load, one tile when idle), merged into its 32x32-tile blocks, each block
    one whole-chunk write (atomic). A kill therefore loses only the records of tiles that
    finished during the last write, not a fixed interval's worth. Between two writes of a
    product the thread rests at least as long as the last one took (so records never take
    more than half a core from the main process), and on object stores writes of one
    product start at most every `write_floor` seconds (requests cost there). `flush`
    writes everything now and returns the tiles whose record could not be written (their
    data stays; a rerun redoes them).
    """

    def __init__(self, floor: float | Callable[[Any], float] = write_floor) -> None:
        #: location -> seconds between two writes of its records (a number: for every one)
        self._floor = floor if callable(floor) else (lambda _location: float(floor))
        self._lock = threading.Lock()  # guards _pending, _last, _thread, _closed
        self._io = threading.Lock()  # one block writer at a time
        #: (url, name) -> {(row, col): record row} waiting to be written
        self._pending: dict[tuple[str, str], dict[tuple[int, int], np.ndarray]] = {}
        self._locations: dict[str, Any] = {}
        self._floors: dict[str, float] = {}
        #: url -> monotonic time the last write of its records started, and its duration
        self._last: dict[str, float] = {}
        self._spent: dict[str, float] = {}
        #: records arrays opened since the last flush (a later breakpoint may recreate one)
        self._arrays: dict[tuple[str, str], Any] = {}
        self._failed: list[tuple[str, int, int, BaseException]] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None  # started by the first record
        #: how many records, block writes (each: read + write of one block) and array opens
        self.counts = {"records": 0, "block_writes": 0, "array_opens": 0}

    def submit(self, location: Any, row: int, col: int, record: tuple[str, bytes]) -> None:
        """Queue tile (row, col)'s record (`record_bytes`) for the next block write."""
        name, values = record[0], np.frombuffer(record[1], dtype="<u8")
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="zarr_orch-records", daemon=True
                )
                self._thread.start()
            if location.url not in self._locations:
                self._locations[location.url] = location
                self._floors[location.url] = float(self._floor(location))
                # the first batch of a floored store also gathers for one floor
                self._last[location.url] = time.monotonic()
            self._pending.setdefault((location.url, name), {})[(row, col)] = values
            self.counts["records"] += 1
        self._wake.set()

    @property
    def requests(self) -> int:
        """Store requests spent on records so far: a read and a write per block, one open."""
        return 2 * self.counts["block_writes"] + self.counts["array_opens"]

    def _run(self) -> None:
        timeout: float | None = None
        while True:
            self._wake.wait(timeout)
            self._wake.clear()
            if self._closed:  # close() flushes what is left
                return
            timeout = self._write_pending(due_only=True)

    def _take(self, due_only: bool) -> tuple[dict, float | None]:
        """Pop the pending records to write now; also the seconds until the next are due."""
        now = time.monotonic()
        taken: dict[tuple[str, str], dict[tuple[int, int], np.ndarray]] = {}
        wait: float | None = None
        with self._lock:
            for key in list(self._pending):
                url = key[0]
                # the writer rests as long as it last worked: at most half a core on records
                due = self._last[url] + max(self._floors[url], 2 * self._spent.get(url, 0.0))
                if due_only and due > now:
                    wait = due - now if wait is None else min(wait, due - now)
                    continue
                taken[key] = self._pending.pop(key)
            for url in {key[0] for key in taken}:
                self._last[url] = now
        return taken, wait

    def _write_pending(self, due_only: bool = False) -> float | None:
        """Write the pending records (only those past their floor when `due_only`).

        A background write that fails puts its records back in the queue, retried a second
        later and by `flush` (a full disk may have room again); only a failed `flush` write
        reports them failed. Returns the seconds until the records left pending are due.
        """
        with self._io:  # taken first: a flush waits for the background write in progress
            pending, wait = self._take(due_only)
            started = time.monotonic()
            retry: dict[tuple[str, str], dict[tuple[int, int], np.ndarray]] = {}
            for (url, name), tiles in pending.items():
                try:
                    array = self._array(url, name)
                except Exception as exc:
                    self._failed_write(url, name, tiles, list(tiles), exc, due_only, retry)
                    continue
                for block, members in tiles_by_block(array, tiles).items():
                    try:
                        rewrite_block(array, block, {t: tiles[t] for t in members})
                        self.counts["block_writes"] += 1
                    except Exception as exc:
                        self._failed_write(url, name, tiles, members, exc, due_only, retry)
            spent = time.monotonic() - started
            with self._lock:
                for url in {key[0] for key in pending}:
                    self._spent[url] = spent
                for key, tiles in retry.items():
                    self._spent[key[0]] = max(spent, 0.5)  # retry after about a second
                    queued = self._pending.setdefault(key, {})
                    for tile, values in tiles.items():
                        queued.setdefault(tile, values)
        if retry:
            wait = 1.0 if wait is None else min(wait, 1.0)
        return wait

    def _failed_write(
        self,
        url: str,
        name: str,
        tiles: dict[tuple[int, int], np.ndarray],
        members: list[tuple[int, int]],
        exc: BaseException,
        background: bool,
        retry: dict[tuple[str, str], dict[tuple[int, int], np.ndarray]],
    ) -> None:
        """Queue `members` again (background write) or report them failed (flush)."""
        if background:
            logger.debug("records write to %s failed (%s): retrying", url, exc)
            retry.setdefault((url, name), {}).update({t: tiles[t] for t in members})
        else:
            self._failed.extend((url, r, c, exc) for r, c in members)

    def _array(self, url: str, name: str) -> Any:
        """The records array, opened once per breakpoint: a product reset (overwrite) by a
        later breakpoint may recreate it with another tile grid, so `flush` forgets it."""
        array = self._arrays.get((url, name))
        if array is None:
            array = open_records(store_handle(self._locations[url]), name, mode="r+")
            self._arrays[(url, name)] = array
            self.counts["array_opens"] += 1
        return array

    def flush(self) -> list[tuple[str, int, int, BaseException]]:
        """Write every queued record now; return (and forget) the failed ones."""
        self._write_pending()
        with self._io:
            failed, self._failed = self._failed, []
            self._arrays.clear()
        return failed

    def close(self) -> None:
        """Flush and stop the background thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()
        self.flush()


def records_tags(store: Any, name: str) -> tuple[str, ...]:
    """The tags the records array `name` covers (FileNotFoundError when it does not exist)."""
    return tuple(open_records(store, name).attrs.get("tags") or ())


class RawRecords:
    """A records array stored as plain objects: a `LAYOUT_FILE` and raw uint64 blocks.

    The blocks are byte for byte what an uncompressed zarr uint64 array would store (full
    chunks, C order, little-endian, zero padded at the edges) under the same keys, but with
    no ``zarr.json`` the records are no Zarr node: GDAL, xarray and zarr list only the
    rasters. Supports what records need: ``shape``, ``chunks``, ``attrs``, and reading and
    writing boxes with ``[]``.
    """

    def __init__(
        self, store: Any, name: str, layout: dict[str, Any], prefix: str = "", writable: bool = True
    ) -> None:
        self.store, self.name, self.layout, self.writable = store, name, layout, writable
        self.path = f"{prefix}{META_GROUP}/{name}"
        self.shape = tuple(int(v) for v in layout["shape"])
        self.chunks = tuple(int(v) for v in layout["chunks"])
        self.dtype = np.dtype(layout.get("dtype", "<u8"))
        self.ndim = len(self.shape)
        self.attrs = {"tags": list(layout.get("tags") or []), "fields": list(layout["fields"])}

    @classmethod
    def create(
        cls,
        store: Any,
        name: str,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        tags: list[str],
        fields: list[str],
        prefix: str = "",
    ) -> RawRecords:
        """Write the layout object of a new records array (no block yet: all tiles to do)."""
        layout = {
            "zarr_orch_records": 1,
            "description": "per-tile completion records: raw little-endian uint64 blocks at "
            "c/<block row>/<block col>/0, shape (tile rows, tile cols, fields)",
            "shape": list(shape),
            "chunks": list(chunks),
            "dtype": "<u8",
            "tags": tags,
            "fields": fields,
        }
        key = f"{prefix}{META_GROUP}/{name}/{LAYOUT_FILE}"
        set_bytes(store, key, json.dumps(layout, indent=1).encode())
        return cls(store, name, layout, prefix=prefix)

    def _block_key(self, bi: int, bj: int) -> str:
        return f"{self.path}/c/{bi}/{bj}/0"

    def _boxes(self, key: Any) -> tuple[range, range, tuple[int, ...]]:
        """Rows and cols of a ``[rows, cols(, fields)]`` key, and the axes given as ints."""
        if not isinstance(key, tuple):
            key = (key,)
        if key and key[-1] is Ellipsis:
            key = key[:-1]
        key = key + (slice(None),) * (3 - len(key))
        ints = tuple(i for i, k in enumerate(key) if isinstance(k, int | np.integer))
        parts = [slice(int(k), int(k) + 1) if i in ints else k for i, k in enumerate(key)]
        rows, cols = (range(*k.indices(n)) for k, n in zip(parts[:2], self.shape[:2], strict=True))
        if rows.step != 1 or cols.step != 1 or (parts[2] != slice(None) and 2 not in ints):
            raise IndexError("records boxes take contiguous slices of whole records")
        return rows, cols, ints

    def _read_block(self, bi: int, bj: int) -> np.ndarray:
        raw = get_bytes(self.store, self._block_key(bi, bj))
        if raw is None:
            return np.zeros(self.chunks, dtype="<u8")
        return np.frombuffer(raw, dtype="<u8").reshape(self.chunks).copy()

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols, ints = self._boxes(key)
        out = np.zeros((len(rows), len(cols), self.shape[2]), dtype="<u8")
        br, bc = self.chunks[0], self.chunks[1]
        for bi in range(rows.start // br, (rows.stop - 1) // br + 1 if len(rows) else 0):
            for bj in range(cols.start // bc, (cols.stop - 1) // bc + 1 if len(cols) else 0):
                block = self._read_block(bi, bj)
                r0, r1 = max(rows.start, bi * br), min(rows.stop, (bi + 1) * br)
                c0, c1 = max(cols.start, bj * bc), min(cols.stop, (bj + 1) * bc)
                out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = block[
                    r0 - bi * br : r1 - bi * br, c0 - bj * bc : c1 - bj * bc
                ]
        if 2 in ints:
            out = out[:, :, int(key[2]) : int(key[2]) + 1]
        return out.reshape([n for i, n in enumerate(out.shape) if i not in ints])

    def __setitem__(self, key: Any, values: Any) -> None:
        """Write whole blocks (what `rewrite_block` does): one object write per block."""
        if not self.writable:
            raise PermissionError(f"records {self.path} were opened read-only")
        rows, cols, ints = self._boxes(key)
        br, bc = self.chunks[0], self.chunks[1]
        if ints or rows.start % br or cols.start % bc:
            raise IndexError("records are written one whole block at a time")
        bi, bj = rows.start // br, cols.start // bc
        if rows.stop != min((bi + 1) * br, self.shape[0]) or cols.stop != min(
            (bj + 1) * bc, self.shape[1]
        ):
            raise IndexError("records are written one whole block at a time")
        block = np.zeros(self.chunks, dtype="<u8")
        block[: len(rows), : len(cols)] = np.asarray(values, dtype="<u8")
        set_bytes(self.store, self._block_key(bi, bj), block.tobytes())
