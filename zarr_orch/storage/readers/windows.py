"""Reading a stored product back by window, and which of its tiles are recorded done."""

from __future__ import annotations

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.product import open_read_array


def read_window(location: Location, tag: str, window: dict) -> np.ndarray:
    """The stored values of `tag` at a core window (all bands for 3-D tags)."""
    array = open_read_array(location, tag)
    r0, r1 = int(window[cst.ROW_MIN]), int(window[cst.ROW_MAX])
    c0, c1 = int(window[cst.COL_MIN]), int(window[cst.COL_MAX])
    if array.ndim == 2:
        return array[r0:r1, c0:c1]
    return array[:, r0:r1, c0:c1]


def done_tiles(location: Location, records_name: str) -> set[tuple[int, int]]:
    """Tiles recorded as done in the product at `location`."""
    return rec.done_tiles(location.zarr_store(read_only=True), records_name)
