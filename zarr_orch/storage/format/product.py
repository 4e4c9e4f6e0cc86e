"""The product layout: one Zarr v3 group per saved file name, one array per tag.

A tile's core window (overlaps cropped) is exactly one chunk of each tag's array, written
whole and once, so every write is atomic and safe to retry. Arrays are created by whoever
writes the first tile (the main process or a worker) with deterministic metadata and
``overwrite=False``: racing creators write identical bytes and never delete data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import zarr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError, TileError
from zarr_orch.storage.core.handles import cached_group, cached_handle, open_group
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.zarr_io import publish
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.coordinates import (
    SPATIAL_REF,
    ensure_coordinates,
    geo_for_tile,
    member,
    raster_dims,
)
from zarr_orch.storage.format.encoding import (
    xarray_fill_attrs,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "zarr_orch.product"
#: 2: records as plain objects, y/x dims when georeferenced, no crc32c by default,
#: consolidated metadata
FORMAT_VERSION = 2
KINDS = (cst.CARS_DS_TYPE_ARRAY, cst.CARS_DS_TYPE_POINTS, cst.CARS_DS_TYPE_DICT)


@dataclass(frozen=True)
class TagSpec:
    """One saved tag: its stored dtype (a numpy dtype string), nodata and optionality."""

    name: str
    dtype: str
    nodata: Any = None
    optional: bool = False


#: the tag of intermediate products: "every raster variable of the tile, as it is"
ALL_VARIABLES = TagSpec("*", "", None, True)


@dataclass(frozen=True)
class ProductPlan:
    """Everything a writer needs to store one dataset's tiles into one product (picklable)."""

    location: Location
    kind: str
    dataset_name: str
    tags: tuple[TagSpec, ...]
    chunks: tuple[int, int]
    extent: tuple[int, int]
    grid_shape: tuple[int, int]
    save_by_pair: bool = False
    codec: str = "zstd"
    checksum: bool = False
    describe_tiles: bool = False
    records: str = field(default="")
    #: tiles carry their own windows and are merged by the main process
    #: (`window_writer`); `chunks` is then nominal, the arrays' own grid decides
    windowed: bool = False

    def __post_init__(self) -> None:
        if not self.records:
            object.__setattr__(self, "records", rec.records_name([t.name for t in self.tags]))

    @property
    def tag_names(self) -> tuple[str, ...]:
        """The names of the saved tags."""
        return tuple(t.name for t in self.tags)

    @property
    def all_variables(self) -> bool:
        """True for intermediate products, which save every raster variable of the tile."""
        return self.tags == (ALL_VARIABLES,)

    def specs_for(self, tile: Any) -> tuple[TagSpec, ...]:
        """The tags to write for `tile` (every 2-D/3-D numeric variable for intermediates)."""
        if not self.all_variables:
            return self.tags
        specs = []
        for name, var in tile.data_vars.items():
            if var.ndim in (2, 3) and var.dtype.kind in "biuf":
                nodata = float("nan") if var.dtype.kind == "f" else None
                specs.append(TagSpec(str(name), var.dtype.str, nodata, True))
        return tuple(specs)

    def spec(self, name: str, dtype: Any = None) -> TagSpec | None:
        """The TagSpec of a saved variable, None when the product does not store it."""
        for tag in self.tags:
            if tag.name == name:
                return tag
        if self.all_variables and dtype is not None and np.dtype(dtype).kind in "biuf":
            kind = np.dtype(dtype).kind
            return TagSpec(name, np.dtype(dtype).str, float("nan") if kind == "f" else None, True)
        return None


@dataclass
class TileWrite:
    """What writing one tile into one product did (small: travels back in receipts)."""

    tags: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    nbytes: int = 0
    crcs: dict[str, int] = field(default_factory=dict)
    #: the completion record to write once the data is on disk: (records name, chunk bytes)
    record: tuple[str, bytes] | None = None


# -- what is on disk: the product attributes and layout checks -----------------------------------


def product_info(location: Location, reading: bool = False) -> dict[str, Any] | None:
    """The zarr_orch attributes of the product at `location`, None when nothing is there.

    Anything else than a zarr_orch product of a format this version knows is refused; the
    messages say what to do, for a writer (choose another name) or a reader.
    """
    store = location.zarr_store(read_only=True)
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    except FileNotFoundError:
        return None
    except Exception as exc:  # zarr v2 data, a file, garbage: refuse rather than touch it
        what = f"not a Zarr v3 group ({type(exc).__name__}: {exc})"
        raise ProductError(
            f"no zarr_orch product at {location.url} ({what})"
            if reading
            else f"{location.url} exists but is {what}; choose another file name or remove it"
        ) from None
    info = group.attrs.get("zarr_orch")
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise ProductError(
            f"{location.url} is a Zarr group but not a zarr_orch product (no zarr_orch.format "
            "attribute)"
            if reading
            else f"{location.url} is a Zarr group that zarr_orch did not write; refusing to "
            "write into it: choose another file name or remove it"
        )
    version = info.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ProductError(
            f"{location.url} was written by a newer zarr_orch (format version {version}; this "
            f"zarr_orch reads up to {FORMAT_VERSION}): upgrade zarr_orch to "
            + ("read it" if reading else "use it")
        )
    return dict(info)


def product_differences(plan: ProductPlan, components: dict[str, Any]) -> list[str]:
    """What differs between the product on disk and this plan ([] when new or identical).

    Only reads: deciding whether a rerun may resume never modifies anything.
    """
    info = product_info(plan.location)
    if info is None:
        return []
    if info.get("kind", plan.kind) != plan.kind:
        return [f"kind: was {info.get('kind')!r}, now {plan.kind!r}"]
    if info.get("format_version", 0) < FORMAT_VERSION:
        return [old_format_message(info)]
    stored = (info.get("fingerprints") or {}).get(plan.records)
    if stored is not None:
        return describe_differences(stored.get("components", {}), components)
    group = open_group(plan.location, "r")
    return _array_problems(group, plan)


def old_format_message(info: dict[str, Any]) -> str:
    """Why a product of an older format version cannot be resumed (and what still reads it)."""
    version = info.get("format_version", 0)
    return (
        f"product format version {version}, this zarr_orch writes version {FORMAT_VERSION} "
        "(open_product, zarr-orch status and verify still read it)"
    )


def check_existing_arrays(group: zarr.Group, plan: ProductPlan) -> None:
    """Refuse (ProductError) existing tag arrays whose layout differs from the plan."""
    problems = _array_problems(group, plan)
    if problems:
        raise ProductError(
            f"{plan.location.url} already exists with another layout ("
            + "; ".join(problems)
            + "): choose another out_dir or file name, set overwrite: true, or remove the old "
            "product"
        )


def _array_problems(group: zarr.Group, plan: ProductPlan) -> list[str]:
    """Differences between existing tag arrays and the plan (chunks, dtype, nodata, shape).

    Also catches a product edited by hand: metadata that no longer parses, and a tag whose
    shape disagrees with the raster size its ``row``/``col`` coordinates were written with.
    """
    if plan.kind != cst.CARS_DS_TYPE_ARRAY:
        return []
    problems: list[str] = []
    if plan.all_variables:
        return problems
    try:
        names = set(group.array_keys())
        size = _raster_size(group, names)
    except Exception as exc:  # garbled zarr.json of a member: refuse, do not guess
        return [f"its array metadata cannot be read ({type(exc).__name__}: {exc})"]
    for tag in plan.tags:
        if tag.name not in names:
            continue
        array = group[tag.name]
        if not plan.windowed and tuple(array.chunks[-2:]) != tuple(plan.chunks):
            problems.append(
                f"{tag.name}: chunks {tuple(array.chunks[-2:])} != tile size {plan.chunks}"
            )
        if np.dtype(array.dtype) != np.dtype(tag.dtype):
            problems.append(f"{tag.name}: dtype {array.dtype} != {np.dtype(tag.dtype)}")
        if not _same_fill(array.fill_value, tag.nodata):
            problems.append(f"{tag.name}: nodata {array.fill_value} != {tag.nodata}")
        if size is not None and tuple(array.shape[-2:]) != size:
            problems.append(
                f"{tag.name}: shape {tuple(array.shape)} does not match the {size[0]}x{size[1]} "
                "raster of its row/col coordinates"
            )
    return problems


def _raster_size(group: zarr.Group, names: set[str]) -> tuple[int, int] | None:
    """(height, width) from the ``row``/``col`` coordinates, None before the first tile."""
    if cst.ROW not in names or cst.COL not in names:
        return None
    return int(group[cst.ROW].shape[0]), int(group[cst.COL].shape[0])


def _same_fill(stored: Any, nodata: Any) -> bool:
    if nodata is None:
        return True
    stored = float(stored)
    return (np.isnan(stored) and np.isnan(float(nodata))) or stored == float(nodata)


# -- arrays ---------------------------------------------------------------------------------------


def _ensure_array(
    plan: ProductPlan, tag: TagSpec, shape: tuple[int, ...], tile: Any, what: str
) -> Any:
    """Open the tag's array, creating it (and the coordinates) when this is the first tile."""

    def opener() -> Any:
        group = cached_group(plan.location)
        array = member(group, tag.name)  # by name: siblings may be half-created right now
        if array is None:
            # georeferencing (a CRS parse) only matters to the writer that creates the array
            _create_array(group, plan, tag, shape, geo_for_tile(tile, what))
            array = group[tag.name]
        if tuple(array.shape) != shape:
            raise TileError(
                f"tag {tag.name!r} of {plan.location.url} has shape {tuple(array.shape)} but "
                f"this tile implies {shape} (profile height/width or band count changed)"
            )
        return array

    return cached_handle("array", plan.location, tag.name, opener)


def open_tag_array(
    plan: ProductPlan,
    tag: TagSpec,
    data: np.ndarray,
    shape2d: tuple[int, int],
    tile: Any,
    what: str,
) -> Any:
    """The array that receives `data` (a tag's 2-D or band-first 3-D values) in a raster of
    `shape2d`, cached per process, created with `plan.chunks` by the first tile."""
    full_shape = shape2d if data.ndim == 2 else (data.shape[0], *shape2d)
    array = _ensure_array(plan, tag, full_shape, tile, what)
    if array.ndim != data.ndim:
        raise TileError(
            f"{what} tag {tag.name!r} has {data.ndim} dimensions but the stored array has "
            f"{array.ndim}"
        )
    return array


def open_read_array(location: Location, tag: str) -> Any:
    """A read handle on the tag's array (cached per process); KeyError when it is absent."""
    return cached_handle("read", location, tag, lambda: open_group(location, "r")[tag])


def compressors_for(codec: str, checksum: bool = False) -> Any:
    """The zarr `compressors` argument for a conf `codec` name (+ an opt-in CRC32C codec).

    zstd frames carry their own content checksum, which every zstd decoder (zarr, xarray,
    GDAL) verifies, so damaged chunks fail loudly in any reader; the CRC32C codec
    (`checksum: true`) adds one for every codec but GDAL cannot read it.
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    chain: list[Any]
    if codec == "none":
        chain = []
    elif codec == "zstd":
        chain = [ZstdCodec(level=0, checksum=True)]
    elif codec == "zstd-1":
        chain = [ZstdCodec(level=1, checksum=True)]
    elif codec == "blosc-lz4":
        chain = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    else:
        raise ProductError(f"unknown codec {codec!r}")
    if checksum and crc32c_available():
        from zarr.codecs import Crc32cCodec

        chain.append(Crc32cCodec())
    return chain or None


@cache
def crc32c_available() -> bool:
    """Whether zarr's Crc32cCodec works here (it is broken in zarr 3.1.3)."""
    try:
        import zarr.storage as storage
        from zarr.codecs import Crc32cCodec

        array = zarr.create_array(
            storage.MemoryStore(), shape=(2,), chunks=(2,), dtype="u1", compressors=[Crc32cCodec()]
        )
        array[:] = 1
        return bool((array[:] == 1).all())
    except Exception as exc:  # an import or codec error: products are written without it
        logger.warning("zarr's crc32c codec is unavailable (%s): chunks carry no checksum", exc)
        return False


#: names of the pixel-centre coordinates; a product saving tags of these names has none
XY_NAMES = frozenset({"x", "y"})


def _create_array(
    group: zarr.Group, plan: ProductPlan, tag: TagSpec, shape: tuple[int, ...], geo: dict
) -> None:
    height, width = shape[-2:]
    # missing nodes are built in memory with zarr's API and stored all at once (identical
    # bytes from racing creators; one round trip on object stores instead of one per node)
    staged = zarr.create_group(zarr.storage.MemoryStore(), zarr_format=3)
    bands = shape[0] if len(shape) == 3 else None
    if XY_NAMES & set(plan.tag_names):  # CARS saves point clouds as tags "x", "y", "z"
        geo = {**geo, "has_xy": False}
    ensure_coordinates(group, staged, height, width, bands, geo)
    attrs, fill_value = xarray_fill_attrs(tag.dtype, tag.nodata, len(shape))
    if tag.nodata is None and geo.get("profile_nodata") is not None:
        # CARS writes a tag registered without nodata with its first tile's profile nodata
        attrs[PROFILE_NODATA] = json_number(geo["profile_nodata"])
    coords = [cst.ROW, cst.COL] if geo.get("has_xy") else []
    if geo.get("has_ref"):
        coords.append(SPATIAL_REF)
        attrs["grid_mapping"] = SPATIAL_REF
    if coords:
        attrs["coordinates"] = " ".join(coords)
    dims = raster_dims(len(shape), bool(geo.get("has_xy")))
    chunks = tuple(plan.chunks) if len(shape) == 2 else (shape[0], *plan.chunks)
    staged.create_array(
        tag.name,
        shape=shape,
        chunks=chunks,
        dtype=tag.dtype,
        fill_value=fill_value,
        dimension_names=dims,
        attributes=attrs,
        compressors=compressors_for(plan.codec, plan.checksum),
    )
    publish(staged.store, group.store_path.store, skip=("zarr.json",), prefix=group.path)


#: array attribute: the tile profile's nodata of a tag registered without one (GeoTIFFs)
PROFILE_NODATA = "cars_profile_nodata"


def json_number(value: Any) -> Any:
    """A nodata value as JSON holds it: NaN and infinities as strings (zarr refuses them)."""
    number = float(value)
    if math.isfinite(number):
        return int(number) if number.is_integer() and not isinstance(value, float) else number
    return str(number)


def array_shape(plan: ProductPlan, tile: Any) -> tuple[int, int]:
    """(height, width) of the product: the profile's when given, else the tile grid's extent."""
    profile = tile.attrs.get(cst.PROFILE) or {}
    height = profile.get("height", plan.extent[0])
    width = profile.get("width", plan.extent[1])
    try:
        return int(height), int(width)
    except (TypeError, ValueError):
        raise TileError(f"profile height/width {height!r}/{width!r} are not integers") from None


def window_box(window: Any, shape: tuple[int, int], what: str) -> tuple[int, int, int, int]:
    """(row_min, row_max, col_min, col_max) of a tile's window; None is the whole raster (CARS).

    A window reaching outside the raster (or empty) is refused (CARS's rasterio would fail too).
    """
    height, width = shape
    if window is None:
        return 0, height, 0, width
    try:
        r0, r1 = int(window[cst.ROW_MIN]), int(window[cst.ROW_MAX])
        c0, c1 = int(window[cst.COL_MIN]), int(window[cst.COL_MAX])
    except (KeyError, TypeError, ValueError):
        raise TileError(
            f"{what} has no valid attrs['window'] (row_min, row_max, col_min, col_max): got "
            f"{window!r}; fill it with fill_dataset(..., window=...) or leave it None for the "
            "whole raster"
        ) from None
    if r0 < 0 or c0 < 0 or r1 > height or c1 > width or r1 <= r0 or c1 <= c0:
        raise TileError(
            f"{what} window rows [{r0}, {r1}) cols [{c0}, {c1}) is outside the {height}x{width} "
            "raster of its profile (or empty); crop the window to the raster"
        )
    return r0, r1, c0, c1


def is_chunk_window(
    plan: ProductPlan, box: tuple[int, int, int, int], shape: tuple[int, int]
) -> bool:
    """Whether `box` is exactly one chunk of the plan's grid (the worker-side write path)."""
    r0, r1, c0, c1 = box
    ch, cw = plan.chunks
    height, width = shape
    return not (r0 % ch or c0 % cw or r1 != min(r0 + ch, height) or c1 != min(c0 + cw, width))


def follows_chunk_grid(plan: ProductPlan, tile: Any, what: str) -> bool:
    """Whether an arrays tile's window is one chunk of its grid product (False for a tile
    that carries a window of its own: the main process then merges it, `window_writer`)."""
    if plan.windowed or plan.kind != cst.CARS_DS_TYPE_ARRAY or not hasattr(tile, "data_vars"):
        return True  # (a tile of the wrong type is refused by its writer)
    window = tile.attrs.get(cst.WINDOW)
    if window is None and tuple(plan.grid_shape) != (1, 1):
        return False  # CARS: None is the whole raster
    shape = array_shape(plan, tile)
    return is_chunk_window(plan, window_box(window, shape, what), shape)


def chunk_index(plan: ProductPlan, window: dict, shape: tuple[int, int], what: str):
    """The chunk (i, j) that `window` is exactly; refuse any window that is not one chunk
    (None, the whole raster, is one only for a single-tile dataset)."""
    r0, r1, c0, c1 = window_box(window, shape, what)
    ch, cw = plan.chunks
    if not is_chunk_window(plan, (r0, r1, c0, c1), shape):
        raise TileError(
            f"{what} window rows [{r0}, {r1}) cols [{c0}, {c1}) is not exactly one {ch}x{cw} "
            "chunk of the product; tiles must follow the dataset's tiling grid (tiles that carry "
            "their own, possibly overlapping, windows need the dataset's final_function to say "
            "how they merge: set cars_ds.final_function)"
        )
    return r0 // ch, c0 // cw, (r0, r1, c0, c1)


def now_iso() -> str:
    """UTC time stamp for product attributes."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tile_group_name(row: int, col: int) -> str:
    """Name of a tile's sub-group."""
    return f"tile_{row}_{col}"


def describe_differences(stored: dict, current: dict) -> list[str]:
    """Human-readable list of what differs between two component dicts."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            lines.append(f"{key}: was {stored.get(key)!r}, now {current.get(key)!r}")
    return lines


def read_product_info(location: Location) -> dict[str, Any]:
    """The ``zarr_orch`` attributes of the product at `location`, checked for reading.

    Unlike the writer's check, every problem is an error here (nothing there, not a Zarr v3
    group, not written by zarr_orch, a newer format): a reader must not guess.
    """
    try:
        exists = location.exists()
    except Exception as exc:  # network / credentials problems: say where
        raise ProductError(f"cannot access {location.url}: {type(exc).__name__}: {exc}") from None
    if not exists:
        raise ProductError(f"{location.url} does not exist")
    info = product_info(location, reading=True)
    if info is None:
        raise ProductError(f"no zarr_orch product at {location.url} (not a Zarr v3 group)")
    return info
