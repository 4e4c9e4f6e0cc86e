"""How tile values become stored values: dtype/nodata checks, casting, xarray attributes, geo.

Kept apart from the product layout so the rules (what a dtype can hold, how NaN becomes
nodata, how CRS and transform are written) are defined once and tested on their own.
"""

from __future__ import annotations

import logging
import math
from functools import cache
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import ConfigurationError, TileError

logger = logging.getLogger(__name__)


def normalize_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype a product array can hold (bool, integers, floats), else a clear error."""
    try:
        result = np.dtype(dtype)
    except TypeError as exc:
        raise ConfigurationError(f"dtype {dtype!r} is not a numpy dtype: {exc}") from None
    if result.kind not in "biuf" or result.itemsize > 8:
        raise ConfigurationError(
            f"dtype {result} cannot be saved to a raster product: use a boolean, integer or "
            "float dtype (complex, object, string and datetime dtypes are not supported)"
        )
    return result


def check_nodata(dtype: np.dtype, nodata: Any) -> Any:
    """Return `nodata` as a value of `dtype`, or raise when the dtype cannot hold it."""
    if nodata is None:
        return None
    if isinstance(nodata, bool | np.bool_) and dtype.kind != "b":
        raise ConfigurationError(f"nodata must be a number for dtype {dtype}, got {nodata!r}")
    try:
        value = float(nodata)
    except (TypeError, ValueError):
        raise ConfigurationError(f"nodata must be a number or None, got {nodata!r}") from None
    if dtype.kind == "b":
        if value not in (0.0, 1.0):
            raise ConfigurationError(f"nodata {nodata!r} cannot be stored in a boolean array")
        return bool(value)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if math.isnan(value) or math.isinf(value) or value != int(value):
            raise ConfigurationError(
                f"nodata {nodata!r} cannot be stored in dtype {dtype}: integer dtypes need an "
                f"integer nodata in [{info.min}, {info.max}] (or choose a float dtype)"
            )
        if not info.min <= int(value) <= info.max:
            raise ConfigurationError(
                f"nodata {nodata!r} does not fit dtype {dtype} (range {info.min}..{info.max}); "
                "choose another nodata or a wider dtype"
            )
        return int(value)
    finfo = np.finfo(dtype)
    if math.isfinite(value) and abs(value) > float(finfo.max):
        raise ConfigurationError(f"nodata {nodata!r} does not fit dtype {dtype}")
    return float(value)


def cast_tile(data: np.ndarray, dtype: np.dtype, nodata: Any, what: str) -> np.ndarray:
    """Cast tile values to `dtype`: NaN becomes nodata, floats round to the nearest integer.

    Values that the dtype cannot represent (inf or out of range for integers) raise a
    TileError naming `what` instead of wrapping around silently.
    """
    if data.dtype.kind not in "biuf":
        raise TileError(
            f"{what} has values of dtype {data.dtype}, which cannot be saved as {dtype}: "
            "return boolean, integer or float arrays"
        )
    if data.dtype == dtype:
        if dtype.kind == "f" and nodata is not None and not math.isnan(nodata):
            nan = np.isnan(data)
            if nan.any():
                data = np.where(nan, dtype.type(nodata), data)
        return _canonical_nan(np.ascontiguousarray(data), nodata)
    if dtype.kind in "iu" and data.dtype.kind == "f":
        nan = np.isnan(data)
        if np.isinf(data).any():
            raise TileError(f"{what} contains inf values, which {dtype} cannot hold")
        if nan.any():
            if nodata is None:
                raise TileError(
                    f"{what} contains NaN values, which {dtype} cannot hold without a nodata "
                    "value; register the tag with a nodata"
                )
            data = np.where(nan, nodata, np.rint(data))
        else:
            data = np.rint(data)
    if dtype.kind in "iu" and data.size:
        info = np.iinfo(dtype)
        low, high = data.min(), data.max()
        if low < info.min or high > info.max:
            raise TileError(
                f"{what} has values in [{low}, {high}], outside the range of {dtype} "
                f"[{info.min}, {info.max}]; choose a wider dtype or rescale"
            )
    result = np.ascontiguousarray(data.astype(dtype, copy=False))
    if dtype.kind == "f" and nodata is not None and not math.isnan(nodata):
        nan = np.isnan(result)
        if nan.any():
            result[nan] = nodata
    return _canonical_nan(result, nodata)


def _canonical_nan(data: np.ndarray, nodata: Any) -> np.ndarray:
    """`data` with every NaN of a float tile as the canonical NaN (a copy only if needed).

    When NaN is the fill value (nodata NaN or None), zarr stores no chunk for an all-NaN tile
    (any NaN equals a NaN fill) and reads it back as the canonical NaN; a tile holding x86's
    negative NaN (what 0/0 or inf-inf give) would then no longer match its recorded CRC.
    """
    if data.dtype.kind != "f" or (nodata is not None and not math.isnan(nodata)):
        return data
    nan = np.isnan(data)
    if not nan.any():
        return data
    bits = data.view(f"u{data.dtype.itemsize}")
    canonical = np.array(np.nan, dtype=data.dtype).view(bits.dtype)
    if (bits[nan] == canonical).all():
        return data
    return np.where(nan, data.dtype.type(np.nan), data)


@cache
def xarray_fill_attrs(dtype_str: str, nodata: Any, ndim: int) -> tuple[dict[str, Any], Any]:
    """The array attributes and zarr fill_value xarray itself writes for this dtype/nodata.

    xarray encodes `_FillValue` its own way for Zarr v3 (base64 for floats), so we ask it
    once per (dtype, nodata) on a tiny in-memory template instead of hand-writing it.
    """
    import xarray as xr
    import zarr

    store = zarr.storage.MemoryStore()
    dims = ("band", "row", "col")[-ndim:]
    encoding: dict[str, Any] = {"chunks": (1,) * ndim}
    if nodata is not None:
        encoding.update({"_FillValue": nodata, "fill_value": nodata})
    else:
        encoding["_FillValue"] = None
    var = xr.Variable(dims, np.zeros((1,) * ndim, dtype=dtype_str), encoding=encoding)
    xr.Dataset({"v": var}).to_zarr(store, zarr_format=3, consolidated=False, mode="w")
    array = zarr.open_array(store, path="v", zarr_format=3)
    fill = array.metadata.fill_value
    fill = fill.item() if hasattr(fill, "item") else fill
    return dict(array.attrs), fill


# -- georeferencing ----------------------------------------------------------------------------


def transform_coefficients(transform: Any) -> tuple[float, ...] | None:
    """The six affine coefficients (a, b, c, d, e, f) of an Affine or a 6/9-sequence."""
    if transform is None:
        return None
    try:
        values = [float(v) for v in transform]
    except TypeError:
        raise TileError(f"profile transform {transform!r} is not an affine transform") from None
    if len(values) not in (6, 9):
        raise TileError(
            f"profile transform must have 6 coefficients (a, b, c, d, e, f), got {len(values)}"
        )
    return tuple(values[:6])


def crs_to_wkt(crs: Any) -> tuple[str | None, str | None]:
    """(WKT, short text such as "EPSG:32631") of a CRS given as an EPSG int/str, WKT, or a
    CRS object (pyproj/rasterio); a value pyproj cannot parse is a TileError."""
    import pyproj

    if crs is None:
        return None, None
    if isinstance(crs, int | np.integer) and not isinstance(crs, bool):
        text: Any = f"EPSG:{int(crs)}"
    elif hasattr(crs, "to_wkt") and not isinstance(crs, pyproj.CRS):
        try:  # a rasterio CRS (or alike): its WKT is what pyproj parses
            text = str(crs.to_wkt())
        except Exception as exc:
            raise TileError(f"profile crs {crs!r} cannot express itself as WKT: {exc}") from None
    else:
        text = crs
    try:
        parsed = pyproj.CRS.from_user_input(text)
    except Exception as exc:  # pyproj.exceptions.CRSError and friends
        raise TileError(
            f"profile crs {str(crs)[:200]!r} is not a valid CRS ({exc}); give an EPSG code, "
            "WKT, or a rasterio/pyproj CRS"
        ) from None
    short = parsed.to_string()
    return parsed.to_wkt(), short


def geo_layout(profile: dict[str, Any] | None) -> dict[str, Any]:
    """The georeferencing of a rasterio-style profile, as stored in a product (JSON-safe)."""
    profile = profile or {}
    coeffs = transform_coefficients(profile.get("transform"))
    wkt, crs_text = crs_to_wkt(profile.get("crs"))
    return {"transform": list(coeffs) if coeffs else None, "crs_wkt": wkt, "crs": crs_text}


def pixel_centre_coords(coeffs: tuple[float, ...], height: int, width: int) -> tuple[Any, Any]:
    """1-D x (per column) and y (per row) pixel-centre coordinates of a north-up transform."""
    a, b, c, d, e, f = coeffs
    if b != 0 or d != 0:
        return None, None
    x = c + a * (np.arange(width) + 0.5)
    y = f + e * (np.arange(height) + 0.5)
    return x, y


def gdal_geotransform(coeffs: tuple[float, ...]) -> str:
    """GDAL's GeoTransform string (c a b f d e), as rioxarray/GDAL read it."""
    a, b, c, d, e, f = coeffs
    return " ".join(repr(float(v)) for v in (c, a, b, f, d, e))


def coordinate_attrs(axis: str, geo: dict[str, Any]) -> dict[str, Any]:
    """CF attributes of the ``x``/``y`` pixel-centre coordinates (names and units from the CRS)."""
    attrs: dict[str, Any] = {
        "long_name": f"{axis} coordinate of pixel centre",
        "axis": axis.upper(),
    }
    wkt = geo.get("crs_wkt")
    if not wkt:
        return attrs
    import pyproj

    crs = pyproj.CRS.from_wkt(wkt)
    if crs.is_geographic:
        attrs["standard_name"] = "longitude" if axis == "x" else "latitude"
        attrs["units"] = "degrees_east" if axis == "x" else "degrees_north"
    else:
        attrs["standard_name"] = f"projection_{axis}_coordinate"
        units = {a.direction: a.unit_name for a in crs.axis_info}
        unit = units.get("east" if axis == "x" else "north") or next(iter(units.values()), None)
        if unit:
            attrs["units"] = "m" if unit in ("metre", "meter") else unit
    return attrs


def to_json_safe(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and CRS-like objects to JSON-compatible values."""
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if hasattr(obj, "to_wkt"):
        return obj.to_wkt()
    return repr(obj)


def tile_core(
    values: Any, overlaps: dict[str, Any], window_shape: tuple[int, int], what: str
) -> np.ndarray:
    """A tag's values without the tile's overlaps, checked against its core window.

    Shared by the grid writer and the windowed writer so both refuse the same bad tiles
    with the same message.
    """
    values = np.asarray(values)
    if values.ndim not in (2, 3):
        raise TileError(
            f"{what} has {values.ndim} dimensions; expected (row, col) or (band, row, col)"
        )
    up, down = int(overlaps.get(cst.UP, 0)), int(overlaps.get(cst.DOWN, 0))
    left, right = int(overlaps.get(cst.LEFT, 0)), int(overlaps.get(cst.RIGHT, 0))
    h, w = values.shape[-2:]
    core = values[..., up : h - down, left : w - right]
    if core.shape[-2:] != tuple(window_shape):
        raise TileError(
            f"{what} has shape {values.shape} which, minus overlaps (up={up}, down={down}, "
            f"left={left}, right={right}), is {core.shape[-2:]} and disagrees with its window "
            f"of {window_shape[0]}x{window_shape[1]}"
        )
    return core
