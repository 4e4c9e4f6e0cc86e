"""Step 4 of a breakpoint: put resumed tiles of replaced datasets back in their cells.

The store serves them lazily (`storage.tile_store.serve_tiles`; a tile it cannot rebuild
exactly is recomputed), and `read_saved` serves CARS's get_data from the saved products.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.breakpoint.plan import ServeEntry
from zarr_orch.breakpoint.state import Cell, RunState
from zarr_orch.registry.registries import TrackedDataset
from zarr_orch.registry.sink import TileSink
from zarr_orch.storage.readers.tile_store import serve_tiles
from zarr_orch.storage.readers.windows import read_window
from zarr_orch.storage.writers.window_writer import read_merged

logger = logging.getLogger(__name__)


def serve_resumed(to_serve: list[ServeEntry], state: RunState) -> list[ServeEntry]:
    """Put done replaced tiles, served by the store, in their cells.

    Cells get lazy tiles, read and checked only when used. Returns the entries that could
    not be rebuilt exactly (they are recomputed).
    """
    groups: dict[int, list[ServeEntry]] = {}
    for entry in to_serve:
        groups.setdefault(entry.item.key, []).append(entry)
    left: list[ServeEntry] = []
    for entries in groups.values():
        item, key_plans = entries[0].item, entries[0].plans
        pending: dict[Cell, ServeEntry] = {(e.row, e.col): e for e in entries}
        for plan in key_plans:
            if not pending:
                break
            try:
                tiles = serve_tiles(plan, list(pending), state.of(plan).done)
            except Exception as exc:  # a damaged description only costs recomputation
                logger.warning(
                    "tiles of %s cannot be served from %s (%s)", item.name, plan.location.url, exc
                )
                tiles = {}
            for (row, col), tile in tiles.items():
                item.cars_ds.tiles[row][col] = tile
                del pending[(row, col)]
        left.extend(pending.values())
    return left


def recompute_tasks(
    left: list[ServeEntry], attach_sink: Callable[[Any, TileSink], Any]
) -> tuple[list[Any], list[TileSink]]:
    """Tasks recomputing the tiles the store could not serve (kept in memory, not written)."""
    if left:
        logger.info(
            "%d done tile(s) of replaced datasets could not be rebuilt "
            "exactly from the store: recomputing them",
            len(left),
        )
    tasks, sinks = [], []
    for entry in left:
        item = entry.item
        sink = TileSink(
            item.key, item.name, entry.row, entry.col, item.cars_ds.dataset_type, (), True
        )
        tasks.append(attach_sink(entry.delayed, sink))
        sinks.append(sink)
    return tasks, sinks


def clear_unfinished(
    tracked: list[TrackedDataset], replace_keys: Collection[int], delayed_type: Any
) -> None:
    """Replaced datasets hold concrete tiles or None after a breakpoint, never delayed."""
    for item in tracked:
        if item.key not in replace_keys:
            continue
        for line in item.cars_ds.tiles:
            for col, obj in enumerate(line):
                if obj is not None and isinstance(obj, delayed_type):
                    line[col] = None


def read_saved(state: RunState, tag: str, future_object: Any) -> tuple[Any, Any]:
    """Data already on disk at the tile's core window: ``(array, nodata)`` or (None, None).

    What CARS's ``orchestrator.get_data`` returns for a tile of a saved dataset.
    """
    attrs = getattr(future_object, "attrs", None) or {}
    info = attrs.get(cst.SAVING_INFO) or {}
    key = info.get(cst.CARS_DS_KEY)
    product = state.saved_tags.get(key, {}).get(tag)
    window = attrs.get(cst.WINDOW)
    if product is None or (window is None and not state.products[product].plan.windowed):
        return None, None
    saved = state.products[product]
    if saved.plan.windowed:  # CARS: the window as on disk once any tile was merged
        url = saved.plan.location.url
        merged = any(s.done for (other, _), s in state.products.items() if other == url)
        return read_merged(saved.plan, merged, tag, future_object)
    tile = (info.get(cst.CARS_DS_ROW), info.get(cst.CARS_DS_COL))
    if tile not in saved.done:
        return None, None
    spec = next(t for t in saved.plan.tags if t.name == tag)
    return read_window(saved.plan.location, tag, window), spec.nodata
