"""Reading products back: a lazy xarray view of a product, for notebooks and scripts."""

from __future__ import annotations

import logging
import os
from typing import Any

import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError
from zarr_orch.storage.location import Location
from zarr_orch.storage.product import product_info

logger = logging.getLogger(__name__)


def open_product(
    path_or_url: str | os.PathLike[str] | Location, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """Open a raster product as a lazy, dask-backed `xarray.Dataset`.

    Dims are ``row``/``col`` (and ``band``), chunks are the tiles, unwritten tiles read as
    missing (the tag's nodata is its `_FillValue`), and the product's zarr_orch metadata is
    in ``ds.attrs["zarr_orch"]``. Points products are read with `read_points`.
    """
    location = Location.parse(path_or_url, storage_options)
    info = product_info(location)
    if info is None:
        raise ProductError(f"no zarr_orch product at {location.url}")
    if info.get("kind") != cst.CARS_DS_TYPE_ARRAY:
        raise ProductError(
            f"{location.url} is a {info.get('kind')!r} product: read it with "
            "zarr_orch.read_points (points) or zarr_orch.read_dicts (dict)"
        )
    store = location.zarr_store(read_only=True)
    return xr.open_zarr(store, consolidated=False, zarr_format=3, chunks={})
