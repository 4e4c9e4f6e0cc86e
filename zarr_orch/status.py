"""How far a run got: per-tile status of a product and an overview of a run's products.

Everything here is read from what the run left on disk: the completion records inside each
product (the truth about which tiles are done, with when and how many bytes), and the
run's ``metadata.json`` (which tiles failed, run id, conf, statistics). Nothing is computed
from product data, so inspecting even a large run is a handful of small reads.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError
from zarr_orch.reading import (
    METADATA_FILE,
    PathLike,
    find_run_metadata,
    list_records,
    metadata_entry,
    open_product,
    read_json,
    read_product_info,
)
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.run_dir import listed_products, log_location
from zarr_orch.storage.format import records as rec

logger = logging.getLogger(__name__)

#: the values of a tile status map
DONE, MISSING, FAILED = "done", "missing", "failed"
STATUSES = (DONE, MISSING, FAILED)

_NOT_GIVEN: Any = object()


# -- one product: the tile status map -------------------------------------------------------------


def _read_records(location: Location, name: str) -> np.ndarray:
    """The whole records array (tile rows, tile cols, fields) as uint64; absent chunks are 0."""
    store = location.zarr_store(read_only=True)
    array = rec.open_records(store, name)
    return np.asarray(array[...], dtype="uint64")


def _failed_tiles(
    metadata: dict[str, Any] | None, location: Location, info: dict[str, Any]
) -> dict[tuple[int, int], str]:
    """{(row, col): error} of the tiles a run's metadata.json says failed for this product.

    Read from the run-level ``failed_tiles`` list (``{"dataset", "row", "col", "error"}``,
    matched on the product's dataset) and from a per-product ``tiles_failed`` list
    (``{"row", "col", "error"}`` or ``[row, col]``). Only a metadata.json that lists the
    product counts, so another run's failures are never pinned on it.
    """
    entry = metadata_entry(metadata, location, info)
    if entry is None:
        return {}
    items: list[Any] = list(entry.get("tiles_failed") or [])
    run = (metadata or {}).get("zarr_orch") or {}
    for item in run.get("failed_tiles") or []:
        if isinstance(item, dict) and item.get("dataset") == info.get("dataset"):
            items.append(item)
    failed: dict[tuple[int, int], str] = {}
    for item in items:
        try:
            if isinstance(item, dict):
                failed[(int(item["row"]), int(item["col"]))] = str(item.get("error", ""))
            else:
                failed[(int(item[0]), int(item[1]))] = ""
        except (KeyError, IndexError, TypeError, ValueError):
            logger.debug("ignoring malformed failed-tile item %r", item)
    return failed


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000.0))


def tile_status(
    path_or_url: PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    tag: str | None = None,
    metadata: dict[str, Any] | None = _NOT_GIVEN,
) -> xr.DataArray:
    """The status of every tile of a product: "done", "missing" or "failed".

    Returns a string `xarray.DataArray` over dims ``tile_row``/``tile_col``. A tile is
    "done" when its completion records say so (for `tag`, or for every tag when `tag` is
    None); otherwise "failed" when the run's metadata.json says its task failed (the
    run's ``failed_tiles``), else "missing" (not run yet, interrupted, never recorded).

    Coordinates: ``row_min``/``row_max`` (along ``tile_row``) and ``col_min``/``col_max``
    (along ``tile_col``) give each tile's pixel window (raster products); ``done_time``
    (UTC, NaT when not done), ``nbytes`` (bytes written) and ``error`` (failed tiles) are
    per tile. Attributes hold the counts and the last update time.

    `metadata` is the run's metadata.json content when the caller already has it (None:
    ignore failures); by default it is looked up beside the product.
    """
    location = Location.parse(path_or_url, storage_options)
    info = read_product_info(location)
    return product_tile_status(location, info, tag, metadata)


def product_tile_status(
    location: Location, info: dict[str, Any], tag: str | None, metadata: dict[str, Any] | None
) -> xr.DataArray:
    """`tile_status` of a product already opened (its checked `info` and run `metadata`)."""
    grid_shape = tuple(int(v) for v in info.get("tile_grid_shape") or (0, 0))
    all_tags = list((info.get("tags") or {}).keys())
    if tag is not None and tag not in all_tags:
        raise ProductError(
            f"{location.url} has no tag {tag!r}; its tags are: {', '.join(all_tags) or 'none'}"
        )
    tags = [tag] if tag is not None else all_tags
    done = np.ones(grid_shape, dtype=bool)
    done_ms = np.zeros(grid_shape, dtype="uint64")
    nbytes = np.zeros(grid_shape, dtype="uint64")
    records = list_records(location, info)
    values: dict[str, np.ndarray] = {}
    for tag_name in tags:
        tag_done = np.zeros(grid_shape, dtype=bool)
        for records_array in records:
            if records_array.tags and tag_name not in records_array.tags:
                continue
            if records_array.name not in values:
                values[records_array.name] = _read_records(location, records_array.name)
            data = values[records_array.name]
            if data.shape[:2] != grid_shape:
                raise ProductError(
                    f"completion records {records_array.name} of {location.url} cover "
                    f"{data.shape[:2]} tiles but the product's tile grid is {grid_shape}"
                )
            fields = records_array.fields or rec.BASE_FIELDS
            flag = data[..., fields.index("done")] > 0
            tag_done |= flag
            stamp = np.where(flag, data[..., fields.index("time_ms")], 0)
            done_ms = np.maximum(done_ms, stamp)
        done &= tag_done
    for records_array in records:
        if records_array.name in values and (
            tag is None or not records_array.tags or tag in records_array.tags
        ):
            data = values[records_array.name]
            fields = records_array.fields or rec.BASE_FIELDS
            nbytes += np.where(
                data[..., fields.index("done")] > 0, data[..., fields.index("nbytes")], 0
            ).astype("uint64")
    if metadata is _NOT_GIVEN:
        metadata = find_run_metadata(location, info)
    failed = _failed_tiles(metadata, location, info)
    status = np.full(grid_shape, MISSING, dtype="<U7")
    status[done] = DONE
    errors = np.full(grid_shape, "", dtype=object)
    for (row, col), error in failed.items():
        if row < grid_shape[0] and col < grid_shape[1] and not done[row, col]:
            status[row, col] = FAILED
            errors[row, col] = error
    done_ms = np.where(done, done_ms, 0)
    times = np.where(done_ms > 0, done_ms.astype("int64"), np.iinfo("int64").min)
    coords: dict[str, Any] = {
        "tile_row": np.arange(grid_shape[0]),
        "tile_col": np.arange(grid_shape[1]),
        "done_time": (("tile_row", "tile_col"), times.astype("datetime64[ms]")),
        "nbytes": (("tile_row", "tile_col"), nbytes),
        "error": (("tile_row", "tile_col"), errors.astype(str)),
    }
    if info.get("kind") == cst.CARS_DS_TYPE_ARRAY:
        (height, width), (ch, cw) = info.get("extent"), info.get("tile_size")
        starts_r = np.arange(grid_shape[0]) * int(ch)
        starts_c = np.arange(grid_shape[1]) * int(cw)
        coords["row_min"] = ("tile_row", starts_r)
        coords["row_max"] = ("tile_row", np.minimum(starts_r + int(ch), int(height)))
        coords["col_min"] = ("tile_col", starts_c)
        coords["col_max"] = ("tile_col", np.minimum(starts_c + int(cw), int(width)))
    counts = {s: int((status == s).sum()) for s in STATUSES}
    return xr.DataArray(
        status,
        dims=("tile_row", "tile_col"),
        coords=coords,
        name="tile_status",
        attrs={
            "product": location.url,
            "kind": info.get("kind"),
            "dataset": info.get("dataset"),
            "tags": tags,
            "tiles_done": counts[DONE],
            "tiles_missing": counts[MISSING],
            "tiles_failed": counts[FAILED],
            "tiles_total": int(status.size),
            "last_update": _iso(int(done_ms.max()) if done_ms.size else None),
        },
    )


def status_map(status: xr.DataArray) -> str:
    """A text picture of a tile status map: ``#`` done, ``.`` missing, ``X`` failed."""
    symbols = {DONE: "#", MISSING: ".", FAILED: "X"}
    return "\n".join(
        "".join(symbols.get(str(v), "?") for v in line) for line in np.asarray(status.values)
    )


# -- a run: all its products ----------------------------------------------------------------------


@dataclass
class ProductSummary:
    """One product of a run: what it is and how far it got (``error`` when unreadable)."""

    name: str
    url: str
    kind: str | None = None
    dataset: str | None = None
    file_name: str | None = None
    tags: list[str] = field(default_factory=list)
    tiles_done: int = 0
    tiles_failed: int = 0
    tiles_total: int = 0
    last_update: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        """True when every tile is done."""
        return self.error is None and self.tiles_total > 0 and self.tiles_done == self.tiles_total

    @property
    def state(self) -> str:
        """complete, failed (some tiles failed), partial, empty or error."""
        if self.error is not None:
            return "error"
        if self.complete:
            return "complete"
        if self.tiles_failed:
            return "failed"
        return "partial" if self.tiles_done else "empty"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with the derived ``state``)."""
        return {**asdict(self), "state": self.state}


def summarize_product(
    path_or_url: PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    metadata: dict[str, Any] | None = _NOT_GIVEN,
) -> ProductSummary:
    """A `ProductSummary` of one product; problems go to its ``error`` instead of raising."""
    location = Location.parse(path_or_url, storage_options)
    summary = ProductSummary(name=name or location.name, url=location.url)
    try:
        info = read_product_info(location)
        summary.kind = info.get("kind")
        summary.dataset = info.get("dataset")
        summary.file_name = info.get("file_name")
        summary.tags = list((info.get("tags") or {}).keys())
        status = product_tile_status(
            location,
            info,
            None,
            metadata if metadata is not _NOT_GIVEN else find_run_metadata(location, info),
        )
    except ProductError as exc:
        summary.error = str(exc)
        return summary
    except Exception as exc:  # a damaged product must not hide the others of the run
        summary.error = f"{type(exc).__name__}: {exc}"
        return summary
    summary.tiles_done = status.attrs["tiles_done"]
    summary.tiles_failed = status.attrs["tiles_failed"]
    summary.tiles_total = status.attrs["tiles_total"]
    summary.last_update = status.attrs["last_update"]
    return summary


@dataclass
class RunInfo:
    """A run's output directory: its metadata.json and a summary of each product.

    ``products`` follow the run's order (metadata.json), then any other product found in
    the directory or one sub-directory down (e.g. ``intermediate/``). Use `open` to read
    one, `table` for a pandas overview (what a notebook displays).
    """

    out_dir: str
    metadata: dict[str, Any] | None
    products: list[ProductSummary]
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run(self) -> dict[str, Any]:
        """The orchestrator's part of metadata.json (run id, times, conf, stats), or {}."""
        return dict((self.metadata or {}).get("zarr_orch") or {})

    @property
    def log_file(self) -> str | None:
        """The run log metadata.json names, located in this directory (None if none)."""
        location = log_location(Location.parse(self.out_dir, self.storage_options), self.metadata)
        return location.url if location is not None else None

    def product(self, name: str) -> ProductSummary:
        """The product called `name`: its relative path, stem, file name, dataset or URL."""
        for summary in self.products:
            stem = summary.name[: -len(".zarr")] if summary.name.endswith(".zarr") else None
            if name in (summary.name, summary.url, summary.file_name, stem):
                return summary
        for summary in self.products:
            if name == summary.dataset:
                return summary
        names = ", ".join(p.name for p in self.products) or "none"
        raise ProductError(f"no product {name!r} in {self.out_dir}; products: {names}")

    def open(self, name: str, **kwargs: Any) -> xr.Dataset:
        """`open_product` of the product called `name` (see `product`)."""
        summary = self.product(name)
        return open_product(summary.url, self.storage_options or None, **kwargs)

    def tile_status(self, name: str, **kwargs: Any) -> xr.DataArray:
        """`tile_status` of the product called `name` (failures from this run's metadata)."""
        summary = self.product(name)
        kwargs.setdefault("metadata", self.metadata)
        return tile_status(summary.url, self.storage_options or None, **kwargs)

    def table(self) -> Any:
        """The products as a pandas DataFrame, one row per product."""
        import pandas as pd

        rows = []
        for p in self.products:
            rows.append(
                {
                    "product": p.name,
                    "kind": p.kind,
                    "dataset": p.dataset,
                    "tags": ", ".join(p.tags),
                    "done": p.tiles_done,
                    "failed": p.tiles_failed,
                    "total": p.tiles_total,
                    "state": p.state,
                    "last_update": p.last_update,
                    "error": p.error,
                }
            )
        columns = [
            "product",
            "kind",
            "dataset",
            "tags",
            "done",
            "failed",
            "total",
            "state",
            "last_update",
            "error",
        ]
        return pd.DataFrame(rows, columns=columns).set_index("product")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: out_dir, run summary (id, times, stats) and products."""
        run = self.run
        return {
            "out_dir": self.out_dir,
            "run_id": run.get("run_id"),
            "started": run.get("started"),
            "updated": run.get("updated"),
            "stats": run.get("stats"),
            "complete": bool(self.products) and all(p.complete for p in self.products),
            "products": [p.to_dict() for p in self.products],
        }

    def _repr_html_(self) -> str:
        run = self.run
        head = (
            f"<p><b>zarr_orch run</b> {self.out_dir} &mdash; run id {run.get('run_id')}, "
            f"updated {run.get('updated')}</p>"
        )
        return head + self.table()._repr_html_()

    def __str__(self) -> str:
        return f"run {self.out_dir}\n{self.table().to_string()}"


def _subdirectories(location: Location) -> list[str]:
    """Names of the directories directly under `location` (sorted)."""
    try:
        entries = location.fs.ls(location.fs_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = []
    for entry in entries:
        if entry.get("type") == "directory":
            names.append(posixpath.basename(str(entry["name"]).rstrip("/")))
    return sorted(n for n in names if n)


def open_run(out_dir: PathLike, storage_options: dict[str, Any] | None = None) -> RunInfo:
    """Describe a run's output directory: metadata.json and every product's progress.

    Products are those listed in metadata.json plus the ``*.zarr`` directories found in
    `out_dir` and one sub-directory down (``intermediate/`` and the like). A product that
    cannot be read is listed with its ``error``. Raises `ProductError` when `out_dir` does
    not exist, is itself a product, or holds neither metadata.json nor any product.
    """
    location = Location.parse(out_dir, storage_options)
    if not location.exists():
        raise ProductError(f"{location.url} does not exist")
    if _is_group(location):
        raise ProductError(
            f"{location.url} is a Zarr group, not a run directory: use tile_status or "
            "open_product on it (or open_run on its parent)"
        )
    metadata = read_json(location.join(METADATA_FILE))
    candidates: list[tuple[str, Location]] = []
    scanned: list[tuple[str, Location]] = []
    for name in _subdirectories(location):
        child = location.join(name)
        if name.lower().endswith(".zarr"):
            scanned.append((name, child))
        elif not name.startswith((".", "_")):
            for sub in _subdirectories(child):
                if sub.lower().endswith(".zarr"):
                    scanned.append((f"{name}/{sub}", child.join(sub)))
    by_url = {loc.url: (name, loc) for name, loc in scanned}
    seen: set[str] = set()
    # listed products resolve in this directory (relative paths, or old absolute URLs that
    # point into the out_dir the run was written to): a moved or copied run is self-contained
    for name, loc in listed_products(location, metadata):
        if loc.url in by_url:
            name = by_url[loc.url][0]
        if loc.url not in seen:
            candidates.append((name, loc))
            seen.add(loc.url)
    for name, loc in scanned:
        if loc.url not in seen:
            candidates.append((name, loc))
            seen.add(loc.url)
    if metadata is None and not candidates:
        raise ProductError(
            f"no zarr_orch run at {location.url}: no {METADATA_FILE} and no .zarr products"
        )
    products = [summarize_product(loc, name=name, metadata=metadata) for name, loc in candidates]
    return RunInfo(location.url, metadata, products, dict(storage_options or {}))


def is_product(path_or_url: PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """True when `path_or_url` is a Zarr group (a product, or something posing as one)."""
    return _is_group(Location.parse(path_or_url, storage_options))


def _is_group(location: Location) -> bool:
    """True when a Zarr v3 ``zarr.json`` sits at `location` (any failure: False)."""
    try:
        return bool(location.fs.exists(posixpath.join(location.fs_path, "zarr.json")))
    except Exception:
        return False


__all__ = [
    "DONE",
    "FAILED",
    "MISSING",
    "STATUSES",
    "ProductSummary",
    "RunInfo",
    "is_product",
    "open_run",
    "status_map",
    "summarize_product",
    "tile_status",
]
