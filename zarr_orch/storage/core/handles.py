"""Store handles cached per process: a product's group, arrays and store are opened once.

Workers reopen from the product's URL; keys carry the pid so forked handles are never reused.
"""

from __future__ import annotations

import os
from typing import Any

import zarr

from zarr_orch.storage.core.location import Location

_HANDLES: dict[tuple[Any, ...], Any] = {}


def cached_handle(kind: str, location: Location, name: str, opener: Any) -> Any:
    """The handle `opener()` returns, opened once per (process, kind, product, name)."""
    key = (os.getpid(), kind, location.url, name)
    handle = _HANDLES.get(key)
    if handle is None:
        handle = opener()
        _HANDLES[key] = handle
    return handle


def forget_handles(location: Location | None = None) -> None:
    """Drop cached handles (all, or those of one product) after it was re-created."""
    for key in list(_HANDLES):
        if location is None or key[2] == location.url:
            del _HANDLES[key]


def open_group(location: Location, mode: str = "r+") -> zarr.Group:
    """Open the product group at `location` (zarr v3)."""
    store = location.zarr_store(read_only=mode == "r")
    # never the consolidated metadata: workers add arrays after it was written
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def cached_group(location: Location) -> zarr.Group:
    """The product's group opened for writing, once per process."""
    return cached_handle("group", location, "", lambda: open_group(location, "r+"))


def store_handle(location: Location) -> Any:
    """The product's (retrying) zarr store, opened once per process."""
    return cached_handle("store", location, "", location.zarr_store)
