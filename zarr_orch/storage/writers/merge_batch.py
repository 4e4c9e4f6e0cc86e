"""Group commit of windowed merges: tiles merged in memory, stored as one journaled batch.

A windowed tile (`window_writer`) changes a few chunks of every product it merges into and
one completion-record block per product; neighbouring tiles change the same chunks and
blocks again. Storing each tile's merge on its own rewrites every record block once per
tile (about 40 object writes per tile for CARS's rasterization, 0.15-0.5 ms each on a local
disk, a request each on S3). Instead the single writer (the main process) applies merges to
decoded chunks and record blocks kept here, and commits them together: at most
``merge_commit_seconds`` after the first of them (a timer thread, so a slow next tile does
not hold them), after `MAX_TILES` tiles, past `MAX_BYTES` of changed chunks, and at the end
of every breakpoint. A commit is one `MergeJournal` transaction (the stored bytes of every
key as they were before the batch, then the writes, then the commit), so a kill leaves
either the whole batch or none of it: records still mean "this tile's merge is applied",
and a rerun merges the missing tiles on exactly the bytes the killed run started from.
`get_data` reads the merged values from here until they are committed.

A commit that fails is rolled back at once (else at the next start-up); its tiles are
reported lost (`take_lost`, booked as unrecorded: a rerun merges them) and every later
merge of this breakpoint is refused, since it would build on values that are not stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from zarr_orch.errors import StorageError
from zarr_orch.storage.core.zarr_io import set_many
from zarr_orch.storage.format.journal import MergeJournal
from zarr_orch.storage.writers.chunk_writer import ChunkWriter
from zarr_orch.storage.writers.merge_cache import CACHE

logger = logging.getLogger(__name__)

#: default of the orchestrator's ``merge_commit_seconds``
COMMIT_SECONDS = 1.0
#: tiles merged in memory at most before a commit
MAX_TILES = 64
#: bytes of changed, decoded chunks held at most before a commit
MAX_BYTES = 256 * 2**20
#: threads that encode and store a commit's chunks (zstd and file writes release the GIL)
THREADS = 4

#: (product URL, store key)
Key = tuple[str, str]
#: a tile whose merge is lost: (product URL, row, col, error), as records report it
Lost = tuple[str, int, int, BaseException]


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="zarr_orch-merge")


def run_jobs(jobs: list[Callable[[], None]]) -> None:
    """Run `jobs` on the merge threads; every one has ended before the first failure is
    raised (no write outlives its commit)."""
    futures = [_pool().submit(job) for job in jobs]
    wait(futures)
    for future in futures:
        future.result()


@dataclass
class _Chunk:
    """A changed chunk: its writer, coordinates, decoded values and valid (in-array) part."""

    writer: ChunkWriter
    coords: tuple[int, ...]
    values: np.ndarray
    valid: tuple[slice, ...]


class MergeBatch:
    """The merges applied in memory since the last commit (one per process: its writer)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.seconds = COMMIT_SECONDS
        self._chunks: dict[Key, _Chunk] = {}
        self._blocks: dict[Key, np.ndarray] = {}
        self._before: dict[Key, bytes | None] = {}
        self._stores: dict[str, Any] = {}
        self._journal_store: Any = None
        self._tiles: list[tuple[tuple[str, ...], int, int]] = []
        self._bytes = 0
        self._timer: threading.Timer | None = None
        self._error: BaseException | None = None
        self._lost: list[Lost] = []

    # -- a breakpoint's life ----------------------------------------------------------------
    def start(self, seconds: float = COMMIT_SECONDS) -> None:
        """A new breakpoint: commit what is left, forget an earlier failure."""
        self.commit()
        with self.lock:
            self.seconds = seconds
            self._error = None
            self._lost = []

    def take_lost(self) -> list[Lost]:
        """Tiles whose merge was applied in memory but could not be stored (then forgotten)."""
        with self.lock:
            lost, self._lost = self._lost, []
            return lost

    def check_usable(self, what: str) -> None:
        """Refuse a merge after a failed commit: it would build on values never stored."""
        if self._error is not None:
            raise StorageError(
                f"{what}: not merged, because an earlier commit of merged tiles failed "
                f"({type(self._error).__name__}: {self._error}); fix the storage problem and "
                "rerun: the rerun merges every tile not recorded, in order"
            )

    # -- reading and changing ---------------------------------------------------------------
    def chunk_values(self, url: str, key: str) -> np.ndarray | None:
        """The decoded values of a changed chunk, None when it is not changed."""
        chunk = self._chunks.get((url, key))
        return None if chunk is None else chunk.values

    def chunk_for_update(
        self,
        url: str,
        store: Any,
        writer: ChunkWriter,
        coords: tuple[int, ...],
        valid: tuple[slice, ...],
    ) -> np.ndarray:
        """The chunk's values to change in place (decoded from the stored bytes the first
        time; those bytes are kept for the journal)."""
        key = writer.key(coords)
        chunk = self._chunks.get((url, key))
        if chunk is None:
            raw = self._remember(url, store, key)
            values = writer.decode(raw)  # a fresh array: changed in place
            chunk = _Chunk(writer, coords, values, valid)
            self._chunks[(url, key)] = chunk
            self._bytes += values.nbytes
        return chunk.values

    def block_for_update(
        self, url: str, store: Any, key: str, shape: tuple[int, ...]
    ) -> np.ndarray:
        """A record block's values (raw little-endian uint64) to change in place."""
        block = self._blocks.get((url, key))
        if block is None:
            raw = self._remember(url, store, key)
            block = (
                np.zeros(shape, dtype="<u8")
                if raw is None
                else np.frombuffer(raw, dtype="<u8").reshape(shape).copy()
            )
            self._blocks[(url, key)] = block
        return block

    def _remember(self, url: str, store: Any, key: str) -> bytes | None:
        """The key's stored bytes (the batch's undo copy), read once per batch."""
        if (url, key) not in self._before:
            [raw] = CACHE.read(url, store, [key])
            self._before[(url, key)] = raw
            self._stores[url] = store
        return self._before[(url, key)]

    def added(self, urls: tuple[str, ...], row: int, col: int, journal_store: Any) -> None:
        """A tile's merge is fully applied in memory: commit when a bound is reached."""
        if self._journal_store is None:
            self._journal_store = journal_store
        self._tiles.append((urls, row, col))
        if self.seconds <= 0 or len(self._tiles) >= MAX_TILES or self._bytes >= MAX_BYTES:
            self.commit()
        elif self._timer is None:
            self._timer = threading.Timer(self.seconds, self._commit_on_time)
            self._timer.daemon = True
            self._timer.name = "zarr_orch-merge-commit"
            self._timer.start()

    # -- committing -------------------------------------------------------------------------
    def _commit_on_time(self) -> None:
        try:
            self.commit()
        except BaseException as exc:  # the next merge or the breakpoint's end reports it
            logger.debug("timed commit failed: %s", exc)

    def commit(self) -> None:
        """Store every pending merge as one journaled transaction (nothing pending: no-op)."""
        with self.lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._tiles:
                return
            started = time.perf_counter()
            tiles = [(row, col) for _urls, row, col in self._tiles]
            journal = MergeJournal(self._journal_store)
            begun = False
            try:
                entries = [(url, self._stores[url], key) for url, key in self._before]
                journal.begin(tiles, entries, list(self._before.values()))
                begun = True
                payloads: dict[Key, bytes | None] = {}
                jobs = [
                    _encode_put(chunk, url, key, payloads)
                    for (url, key), chunk in self._chunks.items()
                ]
                jobs += [
                    _put_block(self._stores[url], url, key, block, payloads)
                    for (url, key), block in self._blocks.items()
                ]
                run_jobs(jobs)
                journal.commit()
            except BaseException as exc:
                self._fail(exc, journal if begun else None)
                raise
            for (url, key), payload in payloads.items():
                CACHE.put(url, key, payload)
            logger.debug(
                "committed the merges of %d tile(s): %d chunk(s), %d record block(s) in %.3f s",
                len(tiles),
                len(self._chunks),
                len(self._blocks),
                time.perf_counter() - started,
            )
            self._clear()

    def _fail(self, exc: BaseException, journal: MergeJournal | None) -> None:
        """A commit failed: undo what it stored, report its tiles lost, refuse what follows."""
        logger.error(
            "could not store the merges of %d tile(s) (%s: %s): rolled back; a rerun merges them",
            len(self._tiles),
            type(exc).__name__,
            exc,
        )
        if journal is not None:
            try:
                journal.recover(dict(self._stores))
            except Exception as undo_error:  # the journal stays: start-up rolls it back
                logger.error("rolling back at once failed (%s); the next run does it", undo_error)
        CACHE.clear()
        self._error = exc
        self._lost += [(url, row, col, exc) for urls, row, col in self._tiles for url in urls]
        self._clear()

    def _clear(self) -> None:
        self._chunks.clear()
        self._blocks.clear()
        self._before.clear()
        self._stores.clear()
        self._journal_store = None
        self._tiles.clear()
        self._bytes = 0


def _encode_put(
    chunk: _Chunk, url: str, key: str, payloads: dict[Key, bytes | None]
) -> Callable[[], None]:
    def job() -> None:
        payload = chunk.writer.encode(chunk.values[(..., *chunk.valid)])
        chunk.writer.put(chunk.coords, payload)
        payloads[(url, key)] = payload

    return job


def _put_block(
    store: Any, url: str, key: str, block: np.ndarray, payloads: dict[Key, bytes | None]
) -> Callable[[], None]:
    def job() -> None:
        raw = block.tobytes()
        set_many(store, {key: raw})
        payloads[(url, key)] = raw

    return job


#: the main process's batch of windowed merges
BATCH = MergeBatch()
