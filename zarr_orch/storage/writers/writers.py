"""Dispatch one computed tile to the writer of its product kind."""

from __future__ import annotations

from typing import Any

from zarr_orch import constants as cst
from zarr_orch.errors import TileError
from zarr_orch.storage.format.product import ProductPlan, TileWrite
from zarr_orch.storage.writers.arrays import write_arrays_tile
from zarr_orch.storage.writers.points import write_dict_tile, write_points_tile
from zarr_orch.storage.writers.window_writer import merge_tile


def write_tile(plan: ProductPlan, tile: Any, row: int, col: int, what: str) -> TileWrite:
    """Write `tile` (cell row, col of its dataset) into `plan`'s product and record it."""
    if plan.kind == cst.CARS_DS_TYPE_ARRAY:
        if not hasattr(tile, "data_vars"):
            raise TileError(
                f"{what} is a {type(tile).__name__}; an 'arrays' dataset needs xarray.Dataset tiles"
            )
        if plan.windowed:
            return merge_tile((plan,), tile, row, col, what)[(plan.location.url, plan.records)]
        return write_arrays_tile(plan, tile, row, col, what)
    if plan.kind == cst.CARS_DS_TYPE_POINTS:
        return write_points_tile(plan, tile, row, col, what)
    return write_dict_tile(plan, tile, row, col, what)
