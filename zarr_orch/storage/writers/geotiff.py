"""GeoTIFF export: the one GeoTIFF writer of zarr_orch (CLI export and CARS `.tif` outputs).

`write_geotiff` streams one tag of a raster product, tile by tile, into a (Cloud-Optimized)
GeoTIFF with GDAL through rasterio: memory stays bounded by one tile, whatever the raster
size. CRS, transform, nodata and dtype come from the product; tiles the completion records
do not list as done are written as nodata and counted. The file appears under its final
name only when complete (temp name + rename; S3: local file, then one upload).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError, ZarrOrchError
from zarr_orch.storage.core.handles import open_group
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.coordinates import SPATIAL_REF
from zarr_orch.storage.format.product import PROFILE_NODATA, product_info

logger = logging.getLogger(__name__)

#: GDAL block cache while exporting (MB): bounds GDAL's share of memory
GDAL_CACHE_MB = 64
COMPRESSIONS = ("deflate", "lzw", "zstd", "lerc", "webp", "jpeg", "packbits", "none")


class GeoTiffError(ZarrOrchError):
    """A GeoTIFF cannot be written (bad option, missing rasterio, unwritable destination)."""


@dataclass(frozen=True)
class GeoTiffReport:
    """What `write_geotiff` wrote: where, its (bands, height, width), missing tiles, time."""

    dest: str
    shape: tuple[int, int, int]
    missing_tiles: int
    seconds: float


@dataclass(frozen=True)
class _Source:
    """One tag of a product, ready to be read window by window."""

    name: str
    array: Any
    bands: int
    height: int
    width: int
    chunks: tuple[int, int]
    nodata: Any
    crs_wkt: str | None
    transform: Any
    done: np.ndarray  # (tile rows, tile cols) bool


def write_geotiff(
    product: str | os.PathLike[str] | Location,
    tag: str | None,
    dest: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cog: bool = True,
    compress: str = "deflate",
    blocksize: int = 512,
    band_descriptions: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
    nbits: int | None = None,
    overviews: str | Sequence[int] = "auto",
    resampling: str = "nearest",
    dest_storage_options: dict[str, Any] | None = None,
) -> GeoTiffReport:
    """Write tag `tag` of the raster product at `product` to a GeoTIFF at `dest`.

    `tag` None picks the product's only tag. `cog` writes GDAL's Cloud-Optimized layout
    (tiled, compressed, overviews); `overviews` is "auto" (halve until one block), "none"
    or explicit factors. Band descriptions, GeoTIFF metadata tags and NBITS default to the
    tag array's attributes ``band_descriptions``, ``geotiff_tags`` and ``nbits``.
    `storage_options` are the product's fsspec options; `dest_storage_options` the
    destination's (default: the product's).
    """
    started = time.perf_counter()
    rasterio = _rasterio()
    location = Location.parse(product, storage_options)
    dest_location = Location.parse(
        dest, dest_storage_options if dest_storage_options is not None else storage_options
    )
    compress = _check_options(compress, blocksize, nbits, overviews, resampling)
    source = _open_source(location, tag)
    name = source.name
    attrs = dict(source.array.attrs)
    descriptions = _descriptions(band_descriptions, attrs, source.bands)
    metadata = dict(tags if tags is not None else attrs.get("geotiff_tags") or {})
    nbits = nbits if nbits is not None else attrs.get("nbits")
    dtype = _gdal_dtype(np.dtype(source.array.dtype))
    missing = int((~source.done).sum())
    if missing:
        logger.warning(
            "%s: %d of %d tiles of %r are not recorded as done: written as nodata (%s)",
            location.url,
            missing,
            source.done.size,
            name,
            source.nodata,
        )
    # staged uncompressed and tiled (tiles land in place, never re-compressed), then copied
    # block by block into the final compressed layout by GDAL
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": source.width,
        "height": source.height,
        "count": source.bands,
        "dtype": dtype,
        "crs": source.crs_wkt,
        "transform": source.transform,
        "nodata": source.nodata,
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        "bigtiff": "IF_SAFER",
        "sparse_ok": True,
    }
    factors = _factors(overviews, source.height, source.width, blocksize)
    options: dict[str, Any] = {"COMPRESS": compress.upper(), "BIGTIFF": "IF_SAFER"}
    if compress in ("deflate", "lzw", "zstd") and nbits is None:  # no predictor on NBITS
        options["PREDICTOR"] = "YES" if cog else (3 if dtype.startswith("float") else 2)
    if nbits is not None:
        options["NBITS"] = int(nbits)
    if cog:
        options["BLOCKSIZE"] = blocksize
        options["OVERVIEWS"] = "FORCE_USE_EXISTING" if factors else "NONE"
    else:
        options.update(TILED="YES", BLOCKXSIZE=blocksize, BLOCKYSIZE=blocksize)
        if factors:
            options["COPY_SRC_OVERVIEWS"] = "YES"
    with _local_target(dest_location) as final, rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        work = tempfile.mkdtemp(prefix=".zarr_orch-tif-", dir=os.path.dirname(final))
        try:
            staged = os.path.join(work, "staged.tif")
            _stream(rasterio, source, staged, profile, descriptions, metadata, dtype)
            if factors:
                with rasterio.open(staged, "r+") as dataset:
                    dataset.build_overviews(factors, rasterio.enums.Resampling[resampling])
            result = os.path.join(work, "result.tif")
            driver = "COG" if cog else "GTiff"
            rasterio.shutil.copy(staged, result, driver=driver, **options)
            os.replace(result, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report = GeoTiffReport(
        dest=dest_location.url,
        shape=(source.bands, source.height, source.width),
        missing_tiles=missing,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "wrote %s (%s, %dx%dx%d) from %s in %.2f s",
        report.dest,
        "COG" if cog else "GeoTIFF",
        *report.shape,
        location.url,
        report.seconds,
    )
    return report


# -- reading the product --------------------------------------------------------------------------


def _tag_name(location: Location, info: dict[str, Any], tag: str | None) -> str:
    names = list((info.get("tags") or {}).keys())
    if tag is not None:
        return tag
    if len(names) != 1:
        raise ProductError(
            f"{location.url} has tags {names}: choose one with tag=... (CLI: --tag NAME)"
        )
    return names[0]


def _open_source(location: Location, tag: str | None) -> _Source:
    info = product_info(location, reading=True)
    if info is None:
        raise ProductError(f"no zarr_orch product at {location.url}")
    if info.get("kind") != cst.CARS_DS_TYPE_ARRAY:
        raise ProductError(
            f"{location.url} is a {info.get('kind')!r} product: only raster products export "
            "to GeoTIFF"
        )
    name = _tag_name(location, info, tag)
    group = open_group(location, "r")
    arrays = set(group.array_keys())
    if name not in arrays:
        known = sorted((info.get("tags") or {}).keys())
        raise ProductError(
            f"{location.url} has no array for tag {name!r} (tags: {known}; a tag none of whose "
            "tiles was written has no array yet)"
        )
    array = group[name]
    if array.ndim not in (2, 3):
        raise ProductError(f"tag {name!r} of {location.url} has {array.ndim} dimensions")
    bands = int(array.shape[0]) if array.ndim == 3 else 1
    height, width = (int(v) for v in array.shape[-2:])
    chunks = (int(array.chunks[-2]), int(array.chunks[-1]))
    spec = (info.get("tags") or {}).get(name) or {}
    nodata = spec.get("nodata")
    if nodata is None and name not in (info.get("tags") or {}):
        nodata = float(array.fill_value) if np.dtype(array.dtype).kind == "f" else None
    if nodata is None and array.attrs.get(PROFILE_NODATA) is not None:
        nodata = float(array.attrs[PROFILE_NODATA])  # as CARS's descriptor: the profile's
    crs_wkt, transform = _georeferencing(group, arrays)
    grid = (math.ceil(height / chunks[0]), math.ceil(width / chunks[1]))
    done = _done_grid(location, info, name, grid)
    return _Source(name, array, bands, height, width, chunks, nodata, crs_wkt, transform, done)


def _georeferencing(group: Any, arrays: set[str]) -> tuple[str | None, Any]:
    """(CRS WKT, Affine) from the product's grid-mapping variable (None, None without)."""
    from affine import Affine

    if SPATIAL_REF not in arrays:
        return None, None
    attrs = dict(group[SPATIAL_REF].attrs)
    wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref") or None
    if wkt is None and attrs.get("crs"):
        import pyproj

        wkt = pyproj.CRS.from_user_input(attrs["crs"]).to_wkt()
    transform = None
    if attrs.get("GeoTransform"):
        c, a, b, f, d, e = (float(v) for v in str(attrs["GeoTransform"]).split())
        transform = Affine(a, b, c, d, e, f)
    return wkt, transform


def _done_grid(
    location: Location, info: dict[str, Any], tag: str, grid: tuple[int, int]
) -> np.ndarray:
    """(tile rows, tile cols) True where a records array covering `tag` says done."""
    if info.get("windowed"):  # records are merged tiles, not chunks: every chunk counts
        return np.ones(grid, dtype=bool)
    store = location.zarr_store(read_only=True)
    done = np.zeros(grid, dtype=bool)
    for name in info.get("records") or []:
        try:
            covered = rec.records_tags(store, name)
        except FileNotFoundError:
            continue
        if covered and tag not in covered:
            continue
        for row, col in rec.done_tiles(store, name):
            if row < grid[0] and col < grid[1]:
                done[row, col] = True
    return done


def _windows(source: _Source) -> Iterator[tuple[int, int, int, int, bool]]:
    """(r0, r1, c0, c1, done) of every tile, row by row."""
    ch, cw = source.chunks
    for i in range(source.done.shape[0]):
        for j in range(source.done.shape[1]):
            r0, c0 = i * ch, j * cw
            yield (
                r0,
                min(r0 + ch, source.height),
                c0,
                min(c0 + cw, source.width),
                bool(source.done[i, j]),
            )


def _stream(
    rasterio: Any,
    source: _Source,
    path: str,
    profile: dict[str, Any],
    descriptions: list[str] | None,
    metadata: dict[str, str],
    dtype: str,
) -> None:
    """Write every tile of `source` into a tiled GeoTIFF at `path`, one tile in memory."""
    from rasterio.windows import Window

    fill = source.nodata if source.nodata is not None else source.array.fill_value
    with rasterio.open(path, "w", **profile) as dataset:
        if descriptions:
            for band, text in enumerate(descriptions, start=1):
                dataset.set_band_description(band, text)
        if metadata:
            dataset.update_tags(**{str(k): str(v) for k, v in metadata.items()})
        for r0, r1, c0, c1, done in _windows(source):
            shape = (source.bands, r1 - r0, c1 - c0)
            if done:
                if source.array.ndim == 2:
                    values = np.asarray(source.array[r0:r1, c0:c1]).reshape(shape)
                else:
                    values = np.asarray(source.array[:, r0:r1, c0:c1])
            else:
                values = np.full(shape, fill, dtype=source.array.dtype)
            window = Window(c0, r0, c1 - c0, r1 - r0)
            dataset.write(values.astype(dtype, copy=False), window=window)


# -- options and destinations ---------------------------------------------------------------------


def _rasterio() -> Any:
    try:
        import rasterio
        import rasterio.enums
        import rasterio.shutil
    except ImportError:
        raise GeoTiffError("writing GeoTIFF needs rasterio: pip install 'rasterio>=1.4'") from None
    return rasterio


def _check_options(
    compress: str, blocksize: int, nbits: int | None, overviews: Any, resampling: str
) -> str:
    from rasterio.enums import Resampling

    text = str(compress).lower()
    if text not in COMPRESSIONS:
        raise GeoTiffError(f"compress must be one of {', '.join(COMPRESSIONS)}, got {compress!r}")
    if not isinstance(blocksize, int) or blocksize < 128 or blocksize % 16:
        raise GeoTiffError(
            f"blocksize must be a multiple of 16 and at least 128 (e.g. 256, 512), got "
            f"{blocksize!r}"
        )
    if nbits is not None and (not isinstance(nbits, int) or not 1 <= nbits <= 32):
        raise GeoTiffError(f"nbits must be an integer in 1..32, got {nbits!r}")
    if isinstance(overviews, str):
        if overviews not in ("auto", "none"):
            raise GeoTiffError(f"overviews must be 'auto', 'none' or factors, got {overviews!r}")
    elif not all(isinstance(f, int) and f >= 2 for f in overviews):
        raise GeoTiffError(f"overview factors must be integers >= 2, got {list(overviews)!r}")
    if resampling not in Resampling.__members__:
        raise GeoTiffError(
            f"resampling must be one of {', '.join(Resampling.__members__)}, got {resampling!r}"
        )
    return text


def _factors(overviews: Any, height: int, width: int, blocksize: int) -> list[int]:
    """Overview decimation factors: 2, 4, ... until the overview fits in one block."""
    if isinstance(overviews, str):
        if overviews == "none":
            return []
        factors, factor = [], 2
        while max(height, width) / (factor // 2) > blocksize:
            factors.append(factor)
            factor *= 2
        return factors
    return sorted(set(overviews))


def _gdal_dtype(dtype: np.dtype) -> str:
    """The GDAL-writable dtype that holds `dtype`'s values (bool as uint8, float16 as float32)."""
    if dtype.kind == "b":
        return "uint8"
    if dtype.kind == "f" and dtype.itemsize < 4:
        return "float32"
    return dtype.name


def _descriptions(given: Sequence[str] | None, attrs: dict[str, Any], bands: int) -> list | None:
    values = list(given) if given is not None else attrs.get("band_descriptions")
    if values is None:
        return None
    if isinstance(values, str) or len(values) != bands:
        raise GeoTiffError(
            f"band_descriptions must be a list of {bands} strings (one per band), got {values!r}"
        )
    return [str(v) for v in values]


@contextlib.contextmanager
def _local_target(dest: Location) -> Iterator[str]:
    """A local path to write the final file at: the destination itself when local, else a
    temporary file uploaded to the destination (one object write) when the block succeeds."""
    if dest.is_local:
        directory = os.path.dirname(dest.fs_path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise GeoTiffError(f"cannot create the directory of {dest.url}: {exc}") from None
        if os.path.isdir(dest.fs_path):
            raise GeoTiffError(f"{dest.url} is a directory: give a .tif file name")
        yield dest.fs_path
        return
    with tempfile.TemporaryDirectory(prefix="zarr_orch-tif-") as work:
        local = os.path.join(work, f"{uuid.uuid4().hex}.tif")
        yield local
        dest.fs.put_file(local, dest.fs_path)
