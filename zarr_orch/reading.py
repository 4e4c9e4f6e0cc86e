"""Reading products back: a lazy xarray view of a product, for notebooks and scripts.

`open_product` is the one way in for raster products. It adds what plain
``xarray.open_zarr`` cannot know: which tiles the run actually finished. The completion
records (``_zarr_orch/tiles_*``), not the chunks present, say what is done, so tiles that
were never recorded are masked to NaN lazily, even for integer tags and tags without a
nodata, where the zarr fill value would otherwise read as plausible data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.product import read_product_info

logger = logging.getLogger(__name__)

#: name of the run metadata file the orchestrator writes in its out_dir
METADATA_FILE = "metadata.json"

PathLike = str | os.PathLike[str] | Location


# -- product attributes ---------------------------------------------------------------------------


# -- completion records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordsArray:
    """One completion-records array of a product: its name and the tags it covers."""

    name: str
    tags: tuple[str, ...]
    fields: tuple[str, ...]


def list_records(location: Location, info: dict[str, Any]) -> list[RecordsArray]:
    """The completion-records arrays a product declares (with the tags each one covers)."""
    store = location.zarr_store(read_only=True)
    result = []
    for name in info.get("records") or []:
        try:
            array = rec.open_records(store, name)
        except FileNotFoundError:
            logger.warning(
                "%s declares completion records %s that do not exist", location.url, name
            )
            continue
        tags = tuple(array.attrs.get("tags") or ())
        fields = tuple(array.attrs.get("fields") or ())
        result.append(RecordsArray(name, tags, fields))
    return result


def done_grid(
    location: Location,
    info: dict[str, Any],
    tags: Iterable[str] | None = None,
    listing: dict[str, Any] | None = None,
) -> np.ndarray:
    """Boolean (tile rows, tile cols) grid: True where every tag of `tags` is recorded done.

    A tag is done on a tile when any records array covering it recorded the tile (one key
    listing per records array: cheap even on object stores). `tags` None means all tags.
    Pass the same `listing` dict to several calls to list each records array only once.
    """
    grid_shape = tuple(int(v) for v in info.get("tile_grid_shape") or (0, 0))
    wanted = list(tags) if tags is not None else list((info.get("tags") or {}).keys())
    listing = {} if listing is None else listing
    if "records" not in listing:
        listing["records"] = list_records(location, info)
    store = location.zarr_store(read_only=True)
    grid = np.ones(grid_shape, dtype=bool)
    for tag in wanted:
        tag_done = np.zeros(grid_shape, dtype=bool)
        for records_array in listing["records"]:
            if records_array.tags and tag not in records_array.tags:
                continue
            key = f"done:{records_array.name}"
            if key not in listing:
                listing[key] = rec.done_tiles(store, records_array.name)
            for row, col in listing[key]:
                if row < grid_shape[0] and col < grid_shape[1]:
                    tag_done[row, col] = True
        grid &= tag_done
    return grid


def _mask_block(block: np.ndarray, grid: np.ndarray, block_info: Any = None) -> np.ndarray:
    """dask block function: the block filled with its tile's done flag."""
    row, col = block_info[None]["chunk-location"][-2:]
    return np.full(block.shape, bool(grid[row, col]), dtype=bool)


def done_mask(grid: np.ndarray, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
    """A lazy (row, col) boolean dask array, one block per tile, True where the tile is done.

    Built from the small tile grid: no product data is read to compute it.
    """
    import dask.array as da

    if tuple(len(c) for c in chunks) != grid.shape:
        raise ProductError(
            f"the product's chunk grid {tuple(len(c) for c in chunks)} does not match its "
            f"completion records grid {grid.shape}"
        )
    template = da.zeros(tuple(sum(c) for c in chunks), chunks=chunks, dtype=bool)
    return template.map_blocks(_mask_block, grid=grid, dtype=bool, meta=np.array((), dtype=bool))


# -- run metadata ---------------------------------------------------------------------------------


def read_json(location: Location) -> dict[str, Any] | None:
    """A JSON object stored at `location`, None when there is none (a warning when unreadable)."""
    try:
        if not location.exists():
            return None
        content = json.loads(location.read_text())
    except Exception as exc:  # a metadata file must never stop reading a product
        logger.warning("cannot read %s: %s", location.url, exc)
        return None
    return content if isinstance(content, dict) else None


def metadata_entry(
    metadata: dict[str, Any] | None, location: Location, info: dict[str, Any]
) -> dict[str, Any] | None:
    """The entry of a product in a run's metadata.json (matched by URL, then file name)."""
    products = ((metadata or {}).get("zarr_orch") or {}).get("products") or {}
    if not isinstance(products, dict):
        return None
    where = location.url.replace("\\", "/")
    for entry in products.values():
        if not isinstance(entry, dict):
            continue
        path = entry.get("path")  # relative to the run directory holding the metadata
        if entry.get("url") == location.url or (
            isinstance(path, str) and path and where.endswith("/" + path.strip("/"))
        ):
            return entry
    entry = products.get(info.get("file_name"))
    return entry if isinstance(entry, dict) else None


def find_run_metadata(location: Location, info: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata.json of the run that wrote the product at `location`, if it can be found.

    Looks in the product's directory and the one above (products saved under a
    sub-directory such as ``intermediate/``); a file that lists the product wins, else the
    one beside the product.
    """
    beside = None
    candidate = location.parent
    for depth in range(2):
        metadata = read_json(candidate.join(METADATA_FILE))
        if metadata is not None:
            if metadata_entry(metadata, location, info) is not None:
                return metadata
            if depth == 0:
                beside = metadata
        parent = candidate.parent
        if parent.url == candidate.url:
            break
        candidate = parent
    return beside


# -- opening a product ----------------------------------------------------------------------------


def open_product(
    path_or_url: PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    mask_missing: bool = True,
    dims: Literal["pixel", "xy"] = "pixel",
) -> xr.Dataset:
    """Open a raster product as a lazy, dask-backed `xarray.Dataset`.

    - Dims are ``row``/``col`` (``band`` first for 3-D tags) and chunks are the tiles, also
      for georeferenced products, whose arrays are stored with ``y``/``x`` dims (what plain
      ``xr.open_zarr``, rioxarray and GDAL see);
      coordinates are the pixel indices ``row``/``col`` plus ``x``/``y`` (pixel centres) and
      the ``spatial_ref`` grid mapping (``crs_wkt``, ``GeoTransform``) when the product was
      written with a transform/CRS, so ``ds.rio.crs`` and ``ds[tag].rio.transform()`` work.
    - Each tag's nodata is its ``_FillValue``: xarray decodes it to NaN.
    - ``mask_missing`` (default): tiles that the completion records do not list as done
      are masked to NaN as well (lazily, from the small tile grid), so an unfinished run
      never shows plausible values, even for integer tags or tags saved without a nodata.
      Masking promotes such tags to float; when every tile is done nothing is masked and
      dtypes stay as stored.
    - ``dims="xy"`` makes ``y``/``x`` the dimensions (``row``/``col`` stay as coordinates),
      which is what rioxarray needs for bounds, clipping, reprojection and ``to_raster``.
      Do not use ``rio.set_spatial_dims(x_dim="col", y_dim="row")`` instead: rioxarray
      would compute bounds from pixel indices.
    - ``ds.attrs["zarr_orch"]`` holds the product's attributes, ``ds.attrs["tiles_done"]``
      and ``["tiles_total"]`` its progress, and ``ds.attrs["run_metadata"]`` the run's
      metadata.json when it is found beside the product (or one directory up).

    Points products are read with `read_points`, dict products with `read_dicts`.
    """
    location = Location.parse(path_or_url, storage_options)
    info = read_product_info(location)
    if info.get("kind") != cst.CARS_DS_TYPE_ARRAY:
        raise ProductError(
            f"{location.url} is a {info.get('kind')!r} product: read it with "
            "zarr_orch.read_points (points) or zarr_orch.read_dicts (dict)"
        )
    store = location.zarr_store(read_only=True)
    ds = xr.open_zarr(store, consolidated=False, zarr_format=3, chunks={})
    if "y" in ds.dims and "x" in ds.dims and cst.ROW in ds.coords and cst.COL in ds.coords:
        ds = ds.swap_dims({"y": cst.ROW, "x": cst.COL})  # format 2, georeferenced: y/x on disk
    tags = [name for name in (info.get("tags") or {}) if name in ds.data_vars]
    tags += [name for name in ds.data_vars if name not in tags]
    listing: dict[str, Any] = {}
    grid = done_grid(location, info, None, listing)
    ds.attrs["tiles_done"] = int(grid.sum())
    ds.attrs["tiles_total"] = int(grid.size)
    if mask_missing and tags and not grid.all():
        ds = _mask_unfinished(ds, location, info, tags, listing)
    metadata = find_run_metadata(location, info)
    if metadata is not None:
        ds.attrs["run_metadata"] = metadata
    if dims == "xy":
        if "x" not in ds.coords or "y" not in ds.coords:
            raise ProductError(
                f"{location.url} has no x/y coordinates (it was written without a north-up "
                "transform): open it with dims='pixel'"
            )
        ds = ds.swap_dims({cst.ROW: "y", cst.COL: "x"})
    elif dims != "pixel":
        raise ValueError(f"dims must be 'pixel' or 'xy', got {dims!r}")
    return ds


def _mask_unfinished(
    ds: xr.Dataset,
    location: Location,
    info: dict[str, Any],
    tags: list[str],
    listing: dict[str, Any],
) -> xr.Dataset:
    """Mask, per tag, the tiles its completion records do not list as done."""
    masks: dict[bytes, xr.DataArray] = {}
    order = list(ds.data_vars)
    for tag in tags:
        var = ds[tag]
        if cst.ROW not in var.dims or cst.COL not in var.dims or var.chunks is None:
            continue
        grid = done_grid(location, info, [tag], listing)
        if grid.all():
            continue
        key = grid.tobytes()
        if key not in masks:
            chunks = (var.chunks[var.dims.index(cst.ROW)], var.chunks[var.dims.index(cst.COL)])
            masks[key] = xr.DataArray(done_mask(grid, chunks), dims=(cst.ROW, cst.COL))
        attrs, encoding = dict(var.attrs), dict(var.encoding)
        masked = var.where(masks[key])
        masked.attrs = attrs
        if "_FillValue" not in encoding and np.dtype(encoding.get("dtype", "f8")).kind in "iub":
            encoding.pop("dtype", None)  # NaN cannot be encoded back into an integer dtype
        masked.encoding = encoding
        ds[tag] = masked
    return ds[order]
