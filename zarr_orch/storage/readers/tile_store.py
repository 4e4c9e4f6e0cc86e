"""Replaced tiles served back from the store, so a rerun resumes after a breakpoint.

For datasets that come back to the main process (the replace registry), the writer also
stores a small JSON description of each tile: its attrs, and for each variable its dims,
shape, dtype, a CRC32 of the whole variable *with overlaps* and CRC32s of the pieces that
neighbours share (its overlap margins, and the edges of its core that neighbours see as
theirs). On a rerun, a done tile whose pieces all agree with its neighbours' is rebuilt
exactly by the store: its cell gets a lazy `xr.Dataset` whose variables read the product
(core window plus overlaps from the neighbouring chunks) and check the CRC only when the
data is first used — by the application or, in a worker, by a later task that takes the
tile as an argument. A tile whose pieces cannot be matched (e.g. uneven overlaps) is rebuilt
and checked at the breakpoint; one that cannot be exact (overlaps that differ from the
neighbours' cores, attrs or coords JSON cannot carry back, a description from an older
writer) is recomputed. Resuming never changes results.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from zarr_orch import constants as cst
from zarr_orch.commands import cli_command, shell_join
from zarr_orch.errors import ProductError
from zarr_orch.storage.core.handles import cached_handle, open_group
from zarr_orch.storage.core.zarr_io import get_many
from zarr_orch.storage.format.product import ProductPlan
from zarr_orch.storage.format.records import META_GROUP, checksum
from zarr_orch.storage.format.tile_descriptions import (
    Box,
    decode_exact,
    margin_rects,
    piece_key,
    tile_box,
    tiles_array_name,
)

logger = logging.getLogger(__name__)

#: tiles rebuilt from the store in this process: "eager" at a breakpoint, "lazy" variables
#: read on first use (lets tests and benchmarks see that nothing was read)
READS: Counter[str] = Counter()


class StoredTileError(ProductError):
    """A tile served from the store no longer matches what its task returned."""


# -- serving done tiles at a breakpoint ----------------------------------------------------------


def serve_tiles(
    plan: ProductPlan, cells: list[tuple[int, int]], done: set[tuple[int, int]]
) -> dict[tuple[int, int], xr.Dataset]:
    """Tiles of `cells` the store rebuilds exactly; the others are left out (recomputed).

    Decided from the descriptions alone (no chunk is read): tiles whose shared pieces agree
    with their neighbours' come back lazy. Only those whose pieces cannot be matched are
    rebuilt and checked now, by `load_tiles`.
    """
    group = open_group(plan.location, "r")
    name = f"{META_GROUP}/{tiles_array_name(plan)}"
    if name not in group or not cells:
        return {}
    descriptions = _Descriptions(group[name], cells)
    result: dict[tuple[int, int], xr.Dataset] = {}
    unsure: list[tuple[int, int]] = []
    mismatched = 0
    for row, col in sorted(cells):
        desc = descriptions.get(row, col)
        parsed = _parse(plan, row, col, desc, done) if desc is not None else None
        if parsed is None:
            continue
        exact = _exact(plan, row, col, parsed, descriptions)
        if exact is None:
            unsure.append((row, col))
        elif exact:
            result[(row, col)] = lazy_tile(plan, row, col, parsed)
        else:
            mismatched += 1
    if mismatched:
        logger.info(
            "%s: %d done tile(s) have overlaps that differ from their neighbours' cores",
            plan.location.url,
            mismatched,
        )
    if unsure:
        result.update(load_tiles(plan, unsure, done))
    return result


class _Descriptions:
    """Parsed tile descriptions, read a band of rows at a time around the requested cells."""

    #: descriptions fetched per read (one concurrent batch on an object store)
    BATCH = 1024

    def __init__(self, array: Any, cells: list[tuple[int, int]]) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        first, last = min(c for _, c in cells), max(c for _, c in cells)
        self.cols = (max(first - 1, 0), min(last + 2, self.shape[1]))
        self.rows: dict[int, list[str]] = {}
        self.parsed: dict[tuple[int, int], dict | None] = {}
        self.decode = _chunk_decoder(array)

    def get(self, row: int, col: int) -> dict | None:
        """The description of tile (row, col), None when there is none."""
        if (row, col) in self.parsed:
            return self.parsed[(row, col)]
        if not (0 <= row < self.shape[0] and 0 <= col < self.shape[1]):
            return None
        if row not in self.rows:
            # cells come in row order and look one row up or down: forget older rows
            for old in [r for r in self.rows if r < row - 2]:
                del self.rows[old]
            for old in [cell for cell in self.parsed if cell[0] < row - 2]:
                del self.parsed[old]
            band = max(1, self.BATCH // max(1, self.cols[1] - self.cols[0]))
            self._read(row, min(row + band, self.shape[0]))
        index = col - self.cols[0]
        line = self.rows[row]
        # a column outside the band read for this row is read alone
        text = line[index] if 0 <= index < len(line) else str(self.array[row, col])
        parsed = json.loads(text) if text else None
        self.parsed[(row, col)] = parsed
        return parsed

    def _read(self, first: int, last: int) -> None:
        """Read rows [first, last) of the band of columns, in one batch when possible."""
        c0, c1 = self.cols
        if self.decode is not None:
            meta = self.array.metadata
            keys = [
                f"{self.array.path}/{meta.encode_chunk_key((r, c))}"
                for r in range(first, last)
                for c in range(c0, c1)
            ]
            try:
                blobs = get_many(self.array.store, keys)
                texts = ["" if blob is None else self.decode(blob) for blob in blobs]
            except Exception as exc:  # an unexpected layout: let zarr read them
                logger.debug("reading tile descriptions through zarr (%s)", exc)
                self.decode = None
            else:
                width = c1 - c0
                for k, r in enumerate(range(first, last)):
                    self.rows[r] = texts[k * width : (k + 1) * width]
                return
        block = self.array[first:last, c0:c1]
        for k, r in enumerate(range(first, last)):
            self.rows[r] = [str(t) for t in block[k]]


def _chunk_decoder(array: Any) -> Any:
    """Decoder of one raw (1, 1) description chunk, None unless its codecs are the usual ones.

    Decoding the few hundred small chunks here rather than through zarr's pipeline (one
    thread hop each) makes reading a rerun's descriptions ~20x faster.
    """
    from numcodecs import VLenUTF8, Zstd

    names = [type(codec).__name__ for codec in getattr(array.metadata, "codecs", ())]
    if tuple(array.chunks) != (1, 1):
        return None
    strings = VLenUTF8()
    if names == ["VLenUTF8Codec"]:
        return lambda blob: str(strings.decode(blob)[0])
    if names == ["VLenUTF8Codec", "ZstdCodec"]:
        zstd = Zstd()
        return lambda blob: str(strings.decode(zstd.decode(blob))[0])
    return None


def _exact(
    plan: ProductPlan, row: int, col: int, parsed: dict[str, Any], descriptions: _Descriptions
) -> bool | None:
    """Whether the store rebuilds the tile exactly: True, False, or None when unknown.

    The core is the tile's own chunk; each overlap margin lies in a neighbour's chunk and is
    exact when its CRC equals the one the neighbour recorded for that piece of its core.
    """
    variables = parsed["variables"]
    box = parsed["box"]
    for entry in variables.values():
        shape = entry.get("shape")
        if entry.get("pieces") is None or not shape or len(shape) not in (2, 3):
            return None  # no pieces to match (an older writer) or an unusual variable
        if tuple(shape[-2:]) != (box[1] - box[0], box[3] - box[2]):
            return None
    window = parsed["attrs"][cst.WINDOW]
    ch, cw = plan.chunks
    off_r, off_c = int(window[cst.ROW_MIN]) // ch - row, int(window[cst.COL_MIN]) // cw - col
    unknown = False
    for i, j, rect in margin_rects(plan.chunks, window, box):
        neighbour = descriptions.get(i - off_r, j - off_c)
        theirs_vars = (neighbour or {}).get("variables") or {}
        for name, entry in variables.items():
            mine = entry["pieces"].get(piece_key(rect))
            theirs = (theirs_vars.get(name) or {}).get("pieces", {}).get(piece_key(rect))
            if mine is None or theirs is None:
                unknown = True
            elif mine != theirs:
                return False
    return None if unknown else True


# -- lazy tiles ----------------------------------------------------------------------------------


def lazy_tile(plan: ProductPlan, row: int, col: int, parsed: dict[str, Any]) -> xr.Dataset:
    """The tile as an `xr.Dataset` whose variables are read (and CRC-checked) on first use."""
    data_vars = {}
    for var_name, entry in parsed["variables"].items():
        array = StoredArray(plan, row, col, var_name, entry, parsed["box"])
        data_vars[var_name] = xr.Variable(tuple(entry["dims"]), indexing.LazilyIndexedArray(array))
    tile = xr.Dataset(data_vars, coords=parsed["coords"])
    tile.attrs.update(parsed["attrs"])
    return tile


class StoredArray(BackendArray):
    """One variable of a done tile, read from the product when first used (picklable).

    Pickled unread, it says where to read (a few kB, no data): a worker receiving it in a
    task's arguments reads the tile itself. Once read, the values are kept (and pickled).
    """

    __slots__ = ("_lock", "_values", "box", "col", "dtype", "entry", "name", "plan", "row", "shape")

    def __init__(
        self, plan: ProductPlan, row: int, col: int, name: str, entry: dict[str, Any], box: Box
    ) -> None:
        self.plan = plan
        self.row, self.col = row, col
        self.name = name
        self.entry = {k: entry[k] for k in ("dims", "shape", "dtype", "crc", "has_nan")}
        self.box = tuple(box)
        self.shape = tuple(int(n) for n in entry["shape"])
        self.dtype = np.dtype(entry["dtype"])
        self._values: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for slot, value in state.items():
            setattr(self, slot, value)
        self._lock = threading.Lock()

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, lambda raw: self.values()[raw]
        )

    def __setitem__(self, key: indexing.ExplicitIndexer, value: Any) -> None:
        adapter = indexing.NumpyIndexingAdapter(self.values())
        if isinstance(key, indexing.OuterIndexer):
            adapter.oindex[key] = value
        elif isinstance(key, indexing.VectorizedIndexer):
            adapter.vindex[key] = value
        else:
            adapter[key] = value

    def values(self) -> np.ndarray:
        """The variable's values (read and checked on the first call)."""
        with self._lock:
            if self._values is None:
                self._values = read_stored(
                    self.plan, self.row, self.col, self.name, self.entry, self.box
                )
            return self._values


def read_stored(
    plan: ProductPlan, row: int, col: int, name: str, entry: dict[str, Any], box: Box
) -> np.ndarray:
    """A variable of a done tile read back from the product; StoredTileError if not exact."""
    r0, r1, c0, c1 = box
    try:
        array = cached_handle(
            "read", plan.location, name, lambda: open_group(plan.location, "r")[name]
        )
        raw = array[r0:r1, c0:c1] if array.ndim == 2 else array[:, r0:r1, c0:c1]
    except OSError:  # storage unreachable (already retried): not a damaged tile
        raise
    except Exception as exc:  # e.g. zarr's chunk checksum refusing a damaged chunk
        raise _damaged(plan, row, col, name, f"{type(exc).__name__}: {exc}") from exc
    values = np.ascontiguousarray(raw)
    READS["lazy"] += 1
    if list(values.shape) != list(entry["shape"]):
        raise _damaged(plan, row, col, name, f"shape {values.shape}, not {tuple(entry['shape'])}")
    if checksum(values) != entry["crc"]:
        raise _damaged(plan, row, col, name, "its CRC32 differs from the task's output")
    return _restore_nan(plan, name, entry, values)


def _damaged(plan: ProductPlan, row: int, col: int, name: str, reason: str) -> StoredTileError:
    url = plan.location.url
    return StoredTileError(
        f"tile (row={row}, col={col}) of {plan.dataset_name}, served from {url} after a "
        f"breakpoint, no longer matches what its task returned (variable {name!r}: {reason}): "
        "this tile's chunk, or a neighbour's its overlaps come from, was damaged or rewritten "
        f"since. Run `{cli_command()} verify --repair {shell_join(url)}`, then rerun the job: "
        "the bad tiles are "
        "recomputed (if verify finds nothing, another dataset saved to this product rewrote "
        "it: rerun with resume: false)"
    )


def _restore_nan(plan: ProductPlan, name: str, entry: dict[str, Any], values: np.ndarray):
    """Stored values with the task's NaNs back (the writer stored them as nodata)."""
    if entry.get("has_nan"):
        spec = plan.spec(name, entry["dtype"])
        values = values.copy()
        values[values == spec.nodata] = np.nan
    return values


# -- eager rebuild (tiles described by an older writer) ------------------------------------------


def load_tiles(
    plan: ProductPlan, cells: list[tuple[int, int]], done: set[tuple[int, int]]
) -> dict[tuple[int, int], xr.Dataset]:
    """Rebuild replaced tiles from the product now; cells that cannot be exact are left out.

    Reads one band of rows per tile row (each chunk is decoded about once, not once per
    neighbour) and checks every rebuilt variable against the CRC its task's output had.
    """
    group = open_group(plan.location, "r")
    name = f"{META_GROUP}/{tiles_array_name(plan)}"
    if name not in group or not cells:
        return {}
    descriptions = group[name]
    by_row: dict[int, list[int]] = {}
    for row, col in cells:
        by_row.setdefault(row, []).append(col)
    result: dict[tuple[int, int], xr.Dataset] = {}
    arrays: dict[str, Any] = {}
    for row, cols in sorted(by_row.items()):
        first, last = min(cols), max(cols)
        texts = descriptions[row, first : last + 1]
        candidates = {}
        for col in cols:
            text = str(texts[col - first])
            parsed = _parse(plan, row, col, json.loads(text), done) if text else None
            if parsed is not None:
                candidates[col] = parsed
        if not candidates:
            continue
        band_r0 = min(p["box"][0] for p in candidates.values())
        band_r1 = max(p["box"][1] for p in candidates.values())
        bands: dict[str, np.ndarray] = {}
        for col, parsed in candidates.items():
            tile = _rebuild(plan, group, arrays, bands, (band_r0, band_r1), parsed)
            if tile is not None:
                result[(row, col)] = tile
    return result


def _parse(
    plan: ProductPlan, row: int, col: int, desc: dict[str, Any], done: set[tuple[int, int]]
) -> dict[str, Any] | None:
    """Check a tile description: everything needed is stored and its neighbours are done."""
    coords = _rebuild_coords(desc.get("coords") or {})
    if coords is None or "typed_attrs" not in desc:
        return None  # coords or attrs cannot come back exactly (or an older writer)
    attrs = decode_exact(desc["typed_attrs"])
    window, overlaps = attrs.get(cst.WINDOW), attrs.get(cst.OVERLAPS) or {}
    if not window:
        return None
    box = tile_box(window, overlaps)
    if not _covered(plan, row, col, window, box, done):
        return None
    for entry in desc["variables"].values():
        if not entry.get("saved") or entry.get("crc") is None or not entry.get("same_dtype"):
            return None
        if entry.get("has_nan") and entry.get("has_nodata"):
            return None  # NaN and nodata were merged on write: the tile cannot be rebuilt
    return {"attrs": attrs, "coords": coords, "box": box, "variables": desc["variables"]}


def _rebuild(
    plan: ProductPlan,
    group: Any,
    arrays: dict[str, Any],
    bands: dict[str, np.ndarray],
    band_rows: tuple[int, int],
    parsed: dict[str, Any],
) -> xr.Dataset | None:
    """One tile from the row band, or None when a variable's CRC does not match."""
    r0, r1, c0, c1 = parsed["box"]
    b0, b1 = band_rows
    data_vars = {}
    for var_name, entry in parsed["variables"].items():
        if var_name not in bands:
            if var_name not in arrays:
                arrays[var_name] = group[var_name]
            array = arrays[var_name]
            bands[var_name] = array[b0:b1, :] if array.ndim == 2 else array[:, b0:b1, :]
        band = bands[var_name]
        values = np.ascontiguousarray(band[..., r0 - b0 : r1 - b0, c0:c1])
        if checksum(values) != entry["crc"]:
            return None  # overlaps differ from the neighbours' cores: recompute
        data_vars[var_name] = (tuple(entry["dims"]), _restore_nan(plan, var_name, entry, values))
    READS["eager"] += 1
    tile = xr.Dataset(data_vars, coords=parsed["coords"])
    tile.attrs.update(parsed["attrs"])
    return tile


def _rebuild_coords(entries: dict[str, Any]) -> dict[str, Any] | None:
    """Evenly spaced 1-D coordinates from their description, None unless byte-identical."""
    coords = {}
    for name, entry in entries.items():
        if entry.get("crc") is None:
            return None
        values = (entry["start"] + entry["step"] * np.arange(entry["size"])).astype(entry["dtype"])
        if checksum(values) != entry["crc"]:
            return None
        coords[name] = (tuple(entry["dims"]), values)
    return coords


def _covered(
    plan: ProductPlan,
    row: int,
    col: int,
    window: dict,
    box: tuple[int, int, int, int],
    done: set[tuple[int, int]],
) -> bool:
    """True when every tile whose chunk the expanded window touches is recorded done."""
    ch, cw = plan.chunks
    off_r = int(window[cst.ROW_MIN]) // ch - row
    off_c = int(window[cst.COL_MIN]) // cw - col
    r0, r1, c0, c1 = box
    if r0 < 0 or c0 < 0:
        return False
    for i in range(r0 // ch, (r1 - 1) // ch + 1):
        for j in range(c0 // cw, (c1 - 1) // cw + 1):
            if (i - off_r, j - off_c) not in done:
                return False
    return True
