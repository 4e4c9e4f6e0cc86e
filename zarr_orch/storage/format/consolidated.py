"""Consolidated metadata of a product, written by the main process that owns its metadata.

xarray (``xr.open_zarr``) and GDAL read a product's whole layout from the consolidated
metadata in its root ``zarr.json``; without it xarray warns on every open. zarr_orch itself
never relies on it. It is written only when it lists every array: at the end of every
breakpoint, and when a product whose arrays all exist is prepared again (a new product has
none until its workers write tiles, and a run killed before its breakpoint ends leaves no
consolidated metadata rather than a stale one: xarray then warns, but shows every array).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import zarr

from zarr_orch.storage.core.location import Location

logger = logging.getLogger(__name__)


def consolidate(location: Location) -> bool:
    """Write the consolidated metadata of the product at `location`; False (logged) on error.

    A failure leaves the product fully usable by zarr_orch (which reads metadata directly);
    only readers relying on consolidated metadata may see it as it was before.
    """
    try:
        store = location.zarr_store()
        with warnings.catch_warnings():
            # the completion records are plain objects, not Zarr nodes: zarr notes them
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(store, zarr_format=3)
    except Exception as exc:  # metadata for other readers must never fail a run
        logger.warning(
            "cannot write the consolidated metadata of %s (%s: %s): xarray may warn when "
            "opening it until the next breakpoint",
            location.url,
            type(exc).__name__,
            exc,
        )
        return False
    return True


def consolidate_all(locations: Iterable[Location]) -> None:
    """Consolidate each distinct product of `locations` once (end of a breakpoint)."""
    for location in {loc.url: loc for loc in locations}.values():
        consolidate(location)
