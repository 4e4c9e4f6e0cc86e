"""The tile sink: what runs right after a tile is computed, in the process that computed it.

It checks the tile's routing (`saving_info`), writes each registered tag as one whole
chunk, records the tile as done, and returns a small `Receipt` to the main process. The
tile itself travels back only when the main process needs it (replaced datasets).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.errors import TileError
from zarr_orch.storage.format.product import ProductPlan, TileWrite, follows_chunk_grid
from zarr_orch.storage.writers.window_writer import merge_tile
from zarr_orch.storage.writers.writers import write_tile

logger = logging.getLogger(__name__)

#: attribute CARS tasks set when dense matching had to crop the disparity range
CROPPED_DISPARITY_RANGE = "cropped_disparity_range"


@dataclass
class Receipt:
    """What the main process learns about a finished tile (small unless `tile` is kept)."""

    key: int
    row: int
    col: int
    writes: dict[tuple[str, str], TileWrite] = field(default_factory=dict)
    seconds: float = 0.0
    pid: int = 0
    tile: Any = None
    empty: bool = False
    #: the tile says dense matching cropped its disparity range (CARS's breakpoint result)
    cropped: bool = False
    #: the tile's window is not one chunk of its grid product: nothing was written, the
    #: tile travels back and the main process merges it (`breakpoint.layouts`)
    misfit: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes written for this tile, all products together."""
        return sum(w.nbytes for w in self.writes.values())


@dataclass(frozen=True)
class TileSink:
    """Picklable callable applied to one computed tile of one registered dataset cell."""

    key: int
    name: str
    row: int
    col: int
    dataset_type: str
    plans: tuple[ProductPlan, ...] = ()
    keep_tile: bool = False

    @property
    def what(self) -> str:
        """How messages name this tile."""
        return f"tile (row={self.row}, col={self.col}) of {self.name}"

    def __call__(self, tile: Any) -> Receipt:
        start = time.perf_counter()
        receipt = Receipt(self.key, self.row, self.col, pid=os.getpid())
        if tile is None:
            receipt.empty = True
            return receipt
        self.check_routing(tile)
        inner = tile.attrs.get(cst.ATTRIBUTES)
        receipt.cropped = isinstance(inner, dict) and bool(inner.get(CROPPED_DISPARITY_RANGE))
        if self.plans and all(plan.windowed for plan in self.plans):
            # one transaction over every product of the tile (storage/window_writer.py)
            receipt.writes = merge_tile(self.plans, tile, self.row, self.col, self.what)
        elif not all(follows_chunk_grid(plan, tile, self.what) for plan in self.plans):
            # a window of its own (e.g. a subsampled raster on a full-resolution grid): no
            # worker may write it, chunks would be shared; checked before any write
            receipt.misfit = True
            receipt.tile = tile
            receipt.seconds = time.perf_counter() - start
            return receipt
        else:
            for plan in self.plans:
                receipt.writes[(plan.location.url, plan.records)] = write_tile(
                    plan, tile, self.row, self.col, self.what
                )
        receipt.seconds = time.perf_counter() - start
        if self.keep_tile:
            receipt.tile = tile
        return receipt

    def check_routing(self, tile: Any) -> None:
        """Refuse tiles without `saving_info` or whose saving_info names another cell."""
        attrs = getattr(tile, "attrs", None)
        if not isinstance(attrs, dict):
            raise TileError(
                f"{self.what}: the task returned a {type(tile).__name__}, which has no .attrs; "
                f"return an xarray.Dataset, a pandas.DataFrame or a CarsDict"
            )
        info = attrs.get(cst.SAVING_INFO)
        if not isinstance(info, dict):
            raise TileError(
                f"{self.what}: the task returned a tile without attrs['saving_info']; fill it "
                "with fill_dataset(..., saving_info=update_saving_infos(info, row, col))"
            )
        got = (info.get(cst.CARS_DS_KEY), info.get(cst.CARS_DS_ROW), info.get(cst.CARS_DS_COL))
        if got != (self.key, self.row, self.col):
            raise TileError(
                f"{self.what}: its saving_info {info} names dataset key {got[0]}, row {got[1]}, "
                f"col {got[2]} but the task sits at key {self.key}, row {self.row}, col "
                f"{self.col}; build it with update_saving_infos(saving_info, row, col)"
            )
