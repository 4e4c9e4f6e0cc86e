"""Tiles that follow no chunk grid, found while a breakpoint runs (main process only).

A grid-aligned dataset's worker refuses to write a tile whose window is not one chunk of
its grid (CARS's sensors_subsampling: a subsampled raster on a full-resolution grid) and
sends the tile back instead. The first such tile makes the dataset's products windowed
(`prepare.switch_to_windowed`): the main process merges every later tile, in tile order,
one writer for every chunk. A dataset mixing both kinds of tiles is refused tile by tile.
Where windows of a dataset without ``final_function`` overlap, the later tile in tile
order wins, as in CARS's sequential mode (CARS's multiprocessing saver: the last one to
arrive); it is deterministic in every mode and on resume, and logged once per dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.breakpoint.state import RunState, product_key
from zarr_orch.errors import TileError
from zarr_orch.registry.sink import Receipt, TileSink
from zarr_orch.storage.format.product import ProductPlan, array_shape, window_box

logger = logging.getLogger(__name__)

#: side of the cells that index claimed windows (only speeds up the overlap check)
_CELL = 512

#: makes a dataset's grid products windowed: (its plans, its key) -> the windowed plans
Switch = Callable[[list[ProductPlan], int], list[ProductPlan]]

Box = tuple[int, int, int, int]


class WindowLayouts:
    """Decides, per dataset of one breakpoint, who writes tiles carrying their own windows."""

    def __init__(
        self,
        state: RunState,
        plans: dict[int, list[ProductPlan]],
        switch: Switch,
        resume: bool = True,
    ) -> None:
        self.state = state
        self.plans = plans
        self.switch = switch
        #: whether tiles an earlier run wrote are kept (else every tile is written again)
        self.resume = resume
        #: datasets made windowed during this breakpoint
        self.switched: set[int] = set()
        self._warned: set[int] = set()
        #: datasets whose overlapping windows were logged already
        self._overlapping: set[int] = set()
        #: {dataset key: {cell: [(box, what)]}}: windows merged so far (no final_function)
        self._claims: dict[int, dict[tuple[int, int], list[tuple[Box, str]]]] = {}

    def switches(self, sink: TileSink, outcome: Any) -> bool:
        """Make the dataset windowed if `outcome` is its first tile found with a window of
        its own and none of its tiles was written on the grid (else `main_writes` refuses
        it); True when it switched now (its tiles then merge in tile order)."""
        receipt = outcome.value if outcome.ok else None
        if not isinstance(receipt, Receipt) or not receipt.misfit or sink.key in self.switched:
            return False
        plans = self.plans.get(sink.key, [])
        if not plans or all(plan.all_variables for plan in plans):
            return False
        if any(self._grid_written(p) for p in plans):
            return False
        self.plans[sink.key][:] = self.switch(list(plans), sink.key)
        self.switched.add(sink.key)
        return True

    def main_writes(self, sink: TileSink, receipt: Receipt, has_final: bool) -> bool:
        """Whether the main process must write this tile; TileError for a dataset whose
        tiles mix both layouts."""
        plans = self.plans.get(sink.key, [])
        if receipt.misfit:
            if sink.key in self.switched:
                return True
            if plans and all(plan.all_variables for plan in plans):
                if sink.key not in self._warned:
                    self._warned.add(sink.key)
                    logger.warning(
                        "%s: its tiles carry windows of their own; no intermediate product "
                        "is kept for it",
                        sink.name,
                    )
                return False
            written = next(p for p in plans if self._grid_written(p))
            raise TileError(
                f"{sink.what} has window {_window_text(receipt.tile)}, which is not one "
                f"chunk of its tiling grid, while {len(self._grid_written(written))} tile(s) "
                f"of {sink.name} in {written.location.url} were: the tiles of a dataset must "
                "all follow its tiling grid or all carry windows of their own. Make the "
                "task's window follow the grid, or rerun with resume: false"
            )
        if sink.key in self.switched and receipt.writes:
            raise TileError(
                f"{sink.what} was written as one chunk of its tiling grid while other tiles "
                f"of {sink.name} carry windows of their own (its products are now merged by "
                "the main process): the tiles of a dataset must all follow its tiling grid "
                "or all carry their own windows. A rerun merges this tile again"
            )
        if receipt.tile is None:
            return False
        # a final_function merges in this process; windowed tiles travel back unwritten
        return has_final or (not sink.plans and any(plan.windowed for plan in plans))

    def _grid_written(self, plan: ProductPlan) -> set[tuple[int, int]]:
        """Tiles of a grid product its workers wrote and this run keeps: this run's, and
        an earlier run's when resuming."""
        if plan.windowed:
            return set()
        product = product_key(plan)
        done = self.state.of(plan).done
        earlier = self.state.resumable.get(product, set())
        return set(done) if self.resume else set(done) - earlier

    def note_overlap(self, sink: TileSink, tile: Any) -> None:
        """Log (once per dataset) a window overlapping one merged earlier in this
        breakpoint, in a dataset without final_function: the later tile wins."""
        plans = self.plans.get(sink.key) or []
        if not plans or not hasattr(tile, "attrs") or sink.key in self._overlapping:
            return
        box = window_box(tile.attrs.get(cst.WINDOW), array_shape(plans[0], tile), sink.what)
        cells = self._claims.setdefault(sink.key, {})
        r0, r1, c0, c1 = box
        keys = [
            (i, j)
            for i in range(r0 // _CELL, (r1 - 1) // _CELL + 1)
            for j in range(c0 // _CELL, (c1 - 1) // _CELL + 1)
        ]
        for key in keys:
            for other, what in cells.get(key, ()):
                if r0 < other[1] and other[0] < r1 and c0 < other[3] and other[2] < c1:
                    self._overlapping.add(sink.key)
                    self._claims.pop(sink.key, None)
                    logger.warning(
                        "%s window rows [%d, %d) cols [%d, %d) overlaps %s (rows [%d, %d) "
                        "cols [%d, %d)) and %s has no final_function: where tiles overlap, "
                        "the later one in tile order wins (as in CARS's sequential mode); "
                        "crop the windows or set a final_function if that is not meant",
                        sink.what,
                        r0,
                        r1,
                        c0,
                        c1,
                        what,
                        *other,
                        sink.name,
                    )
                    return
        for key in keys:
            cells.setdefault(key, []).append((box, sink.what))


def _window_text(tile: Any) -> str:
    window = getattr(tile, "attrs", {}).get(cst.WINDOW)
    return "None (the whole raster)" if window is None else str(dict(window))
