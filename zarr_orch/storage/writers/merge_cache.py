"""The stored bytes of windowed products, as their single writer last read or wrote them.

A windowed merge (`window_writer`) reads the chunks and record blocks a tile touches, for
``get_data``, for the undo journal and to update them, and neighbouring tiles in tile
order touch the same chunks again. Only the main process writes windowed products during
a breakpoint, so what it wrote is what is stored: reading it back is wasted I/O. This
bounded LRU keeps those bytes; it is emptied at the start of every breakpoint
(`window_writer.recover_merges`), before anything else could have changed the products.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from zarr_orch.storage.core.zarr_io import get_many

#: encoded bytes kept at most (the chunks of a few rows of tiles of a large raster)
LIMIT_BYTES = 256 * 2**20

Key = tuple[str, str]


class BytesCache:
    """Last known bytes (None: known absent) of (product URL, store key)."""

    def __init__(self, limit: int = LIMIT_BYTES) -> None:
        self.limit = limit
        self._values: OrderedDict[Key, bytes | None] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def read(self, url: str, store: Any, keys: list[str]) -> list[bytes | None]:
        """The bytes of `keys` of one product: remembered ones, the others read at once."""
        found: list[bytes | None] = [None] * len(keys)
        missing: list[int] = []
        with self._lock:
            for index, key in enumerate(keys):
                if (url, key) in self._values:
                    self._values.move_to_end((url, key))
                    found[index] = self._values[(url, key)]
                else:
                    missing.append(index)
        if missing:
            values = get_many(store, [keys[i] for i in missing])
            for index, value in zip(missing, values, strict=True):
                found[index] = value
                self.put(url, keys[index], value)
        return found

    def put(self, url: str, key: str, value: bytes | None) -> None:
        """Remember what is stored at `key` now (after writing or reading it)."""
        with self._lock:
            old = self._values.pop((url, key), None)
            self._size -= len(old) if old else 0
            self._values[(url, key)] = value
            self._size += len(value) if value else 0
            while self._size > self.limit and self._values:
                _, dropped = self._values.popitem(last=False)
                self._size -= len(dropped) if dropped else 0

    def forget(self, url: str, keys: list[str]) -> None:
        """Drop keys written by another path (zarr's), so they are read again."""
        with self._lock:
            for key in keys:
                old = self._values.pop((url, key), None)
                self._size -= len(old) if old else 0

    def clear(self) -> None:
        """Forget everything (a new breakpoint: other writers may have run meanwhile)."""
        with self._lock:
            self._values.clear()
            self._size = 0


#: the main process's cache of windowed products
CACHE = BytesCache()
