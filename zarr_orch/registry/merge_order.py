"""Merge order of windowed datasets: tiles are merged in tile order, whatever the arrival.

A ``final_function`` merge (weighted means, sums) depends on the order tiles are merged in,
down to the last bit of a float. Merging in the order the tasks were created (row-major)
makes multiprocessing and dask runs byte-identical to sequential ones, and makes the done
tiles of a killed run a prefix of that order, so a resumed run merges the rest exactly as
the uninterrupted run would have. Tiles that arrive early wait here (in the main process)
for their predecessors. After a failed tile the rest of its dataset is not merged, so a
rerun still merges in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any


class MergeOrder:
    """Releases (sink, outcome) pairs of ordered datasets in their creation order."""

    def __init__(self) -> None:
        self._order: dict[int, deque[tuple[int, int]]] = {}
        self._waiting: dict[int, dict[tuple[int, int], tuple[Any, Any]]] = {}
        self._broken: dict[int, str] = {}

    def expect(self, key: int, row: int, col: int) -> None:
        """Tile (row, col) of dataset `key` is submitted; it is merged after the ones before."""
        self._order.setdefault(key, deque()).append((row, col))
        self._waiting.setdefault(key, {})

    def ready(self, sink: Any, outcome: Any) -> Iterator[tuple[Any, Any]]:
        """The pairs that may be merged now that `outcome` arrived (itself if not ordered)."""
        order = self._order.get(sink.key)
        if order is None:
            yield sink, outcome
            return
        waiting = self._waiting[sink.key]
        waiting[(sink.row, sink.col)] = (sink, outcome)
        while order and order[0] in waiting:
            yield waiting.pop(order.popleft())

    def waiting(self) -> int:
        """Tiles that arrived and wait for a predecessor."""
        return sum(len(w) for w in self._waiting.values())

    def break_chain(self, key: int, what: str) -> None:
        """`what` (a tile of dataset `key`) failed: the tiles after it are not merged."""
        if key in self._order:  # datasets that are not ordered keep their other tiles
            self._broken.setdefault(key, what)

    def broken_by(self, key: int) -> str | None:
        """The failed tile that stopped dataset `key`'s merges (None while none failed)."""
        return self._broken.get(key)
