"""A tag array's coordinates: pixel indices, pixel-centre x/y, the CF grid mapping.

Georeferenced (north-up) products use ``y``/``x`` dims with 1-D pixel-centre coordinates in
CRS units and keep ``row``/``col`` pixel indices as non-dimension coordinates; the
``spatial_ref`` variable carries ``crs_wkt``/``spatial_ref``/``GeoTransform`` as GDAL,
rioxarray and CF readers expect. Products without a transform use ``row``/``col`` dims.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from zarr_orch import constants as cst
from zarr_orch.errors import TileError
from zarr_orch.storage.format.encoding import (
    coordinate_attrs,
    gdal_geotransform,
    geo_layout,
    pixel_centre_coords,
)

#: the CF grid-mapping variable of georeferenced products
SPATIAL_REF = "spatial_ref"


def raster_dims(ndim: int, georeferenced: bool) -> list[str]:
    """Dimension names of a tag array: ``y``/``x`` when north-up georeferenced (what GDAL,
    rioxarray and CF readers expect), else ``row``/``col``; ``band`` first for 3-D tags."""
    dims = ["y", "x"] if georeferenced else [cst.ROW, cst.COL]
    return dims if ndim == 2 else [cst.BAND, *dims]


def member(group: zarr.Group, name: str) -> Any:
    """The array or group `name` of `group`, None when absent.

    Looked up by name, never by listing the group: another worker may be creating a sibling
    at this moment (its directory exists before its ``zarr.json``), and zarr warns about
    every such half-created member a listing meets.
    """
    try:
        return group[name]
    except KeyError:
        return None


def ensure_coordinates(
    group: zarr.Group, staged: zarr.Group, height: int, width: int, bands: int | None, geo: dict
) -> None:
    """Index coordinates row/col (pixel numbers), x/y from the transform, spatial_ref.

    Existing ones (in `group`) are checked and rewritten; missing ones go to `staged`.
    """

    def put(name: str, values: np.ndarray, dims: list[str], attrs: dict[str, Any]) -> None:
        stored = member(group, name)
        if stored is not None:
            if tuple(stored.shape) != values.shape:
                raise TileError(
                    f"coordinate {name!r} of {group.store_path} has {stored.shape[0]} values "
                    f"but this tile implies {values.shape[0]}: every tag of one product must "
                    "share the raster size; save tags of other sizes to another file name"
                )
            stored[...] = values  # same bytes again: heals a crash between create and write
            return
        array = staged.create_array(
            name,
            shape=values.shape,
            chunks=values.shape or (),
            dtype=values.dtype,
            dimension_names=dims,
            attributes=attrs,
            fill_value=0,
        )
        array[...] = values

    ydim, xdim = raster_dims(2, bool(geo.get("has_xy")))
    put(cst.ROW, np.arange(height, dtype="int64"), [ydim], {"long_name": "pixel row"})
    put(cst.COL, np.arange(width, dtype="int64"), [xdim], {"long_name": "pixel column"})
    if bands is not None:
        put(cst.BAND, np.arange(1, bands + 1, dtype="int64"), [cst.BAND], {"long_name": "band"})
    coeffs = geo.get("transform")
    if coeffs:
        x, y = pixel_centre_coords(tuple(coeffs), height, width)
        if x is not None and geo.get("has_xy"):  # not when tags are named x/y (point clouds)
            put("x", x, ["x"], coordinate_attrs("x", geo))
            put("y", y, ["y"], coordinate_attrs("y", geo))
    if geo.get("has_ref"):
        ref_attrs: dict[str, Any] = {}
        if geo.get("crs_wkt"):
            ref_attrs["crs_wkt"] = geo["crs_wkt"]
            ref_attrs["spatial_ref"] = geo["crs_wkt"]
        if geo.get("crs"):
            ref_attrs["crs"] = geo["crs"]
        if coeffs:
            ref_attrs["GeoTransform"] = gdal_geotransform(tuple(coeffs))
        put(SPATIAL_REF, np.array(0, dtype="int64"), [], ref_attrs)


def geo_for_tile(tile: Any, what: str) -> dict[str, Any]:
    """Georeferencing of the array a tile creates, from its rasterio profile (and the
    profile's nodata: CARS's GeoTIFF takes it when the tag was registered without one)."""
    profile = tile.attrs.get(cst.PROFILE) or {}
    try:
        geo = geo_layout(profile)
    except TileError as exc:
        raise TileError(f"{what}: {exc}") from None
    coeffs = geo["transform"]
    geo["has_xy"] = bool(coeffs) and coeffs[1] == 0 and coeffs[3] == 0
    geo["has_ref"] = bool(coeffs or geo["crs_wkt"] or geo["crs"])
    geo["profile_nodata"] = profile.get("nodata")
    return geo
