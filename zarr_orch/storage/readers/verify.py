"""Integrity check of products: re-read every recorded tile and compare it with its record.

A completion record (`zarr_orch.storage.format.records`) holds, per tag, the CRC32 of the cast
core data the writer stored. `verify_product` re-reads each recorded tile's chunk of each
tag and recomputes that CRC exactly as the writer did (the decoded region of the tile, C
order; an edge tile's region is smaller than the chunk shape, and a tile zarr did not store
because it was all nodata decodes as the fill value, which must still match). It reports,
per tile and tag:

- ``mismatch``: the chunk decodes but its data is not what was recorded,
- ``missing chunk``: the chunk is absent although the record says data was written (absent
  is fine only when the region, read as fill value, matches the record: all nodata),
- ``undecodable``: zarr raises while decoding the chunk (truncated, garbled),
- ``missing array`` / ``missing tile group``: the tag's array or a points/dict tile's
  sub-group is gone or unreadable,
- ``malformed record``: a record chunk of the wrong size, without its done flag, outside
  the tile grid, a stray key, or a records array whose metadata is wrong.

`repair=True` deletes the records of the bad tiles, so the next run (with ``resume``)
recomputes exactly those tiles and rewrites their chunks whole. Checking streams: records
and tile data are read in batches (concurrent reads through zarr's async API, at most
`BATCH_BYTES` of decoded data held at once), never the whole product. `verify_run` checks
every product of a run directory (``intermediate/`` too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.core.sync import sync

from zarr_orch import constants as cst
from zarr_orch.commands import cli_command, shell_join
from zarr_orch.errors import ProductError
from zarr_orch.storage.core.lease import Lease
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.run_dir import listed_products
from zarr_orch.storage.core.zarr_io import delete_key, get_many, list_keys, local_root
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.product import read_product_info, tile_group_name
from zarr_orch.storage.readers.verify_windowed import windowed_problems

logger = logging.getLogger(__name__)

MISMATCH = "mismatch"
MISSING_CHUNK = "missing chunk"
UNDECODABLE = "undecodable"
MISSING_ARRAY = "missing array"
MISSING_GROUP = "missing tile group"
MALFORMED = "malformed record"
#: a windowed product whose last merge was cut by a crash (the next run rolls it back)
UNFINISHED_MERGE = "unfinished merge"
UNREADABLE = "unreadable product"
#: every problem kind, as the first words of `BadTile.problem`
PROBLEM_KINDS = (
    MISMATCH,
    MISSING_CHUNK,
    UNDECODABLE,
    MISSING_ARRAY,
    MISSING_GROUP,
    MALFORMED,
    UNREADABLE,
    UNFINISHED_MERGE,
)

#: records (and at most as many tiles) read per batch: one concurrent round of GETs
BATCH = 256
#: decoded bytes of tile data held at once: batches of big tiles are smaller
BATCH_BYTES = 64 * 2**20
_COORDINATES = frozenset({cst.ROW, cst.COL, cst.BAND, "x", "y", "spatial_ref"})
_RECORDS_NAME = re.compile(r"^tiles_[0-9a-f]{10}$")
METADATA_FILE = "metadata.json"


class BadTile(NamedTuple):
    """One problem: the product URL, the tile (None for product-level problems), the tag
    ("" when the problem is not about one tag) and the problem, starting with its kind."""

    product: str
    row: int | None
    col: int | None
    tag: str
    problem: str

    @property
    def kind(self) -> str:
        """The problem kind (one of `PROBLEM_KINDS`)."""
        return self.problem.split(":", 1)[0]


@dataclass
class VerifyReport:
    """What a verification found: products checked, records checked, bad tiles, repairs."""

    products: list[str] = field(default_factory=list)
    checked: int = 0
    bad: list[BadTile] = field(default_factory=list)
    repaired: list[tuple[str, int, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: what was verified (a run directory or one product): the hint names it
    target: str = ""

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.bad

    def extend(self, other: VerifyReport) -> None:
        """Add another report's findings to this one (a run = its products)."""
        self.products += other.products
        self.checked += other.checked
        self.bad += other.bad
        self.repaired += other.repaired
        self.skipped += other.skipped

    def __str__(self) -> str:
        lines = [
            f"verified {self.checked} tile record(s) in {len(self.products)} product(s) in "
            f"{self.seconds:.1f} s: " + ("all good" if self.ok else f"{len(self.bad)} problem(s)")
        ]
        for bad in self.bad:
            where = "product" if bad.row is None else f"tile (row={bad.row}, col={bad.col})"
            tag = f" tag {bad.tag!r}" if bad.tag else ""
            lines.append(f"  {bad.product} {where}{tag}: {bad.problem}")
        for url, why in self.skipped:
            lines.append(f"  skipped {url}: {why}")
        if self.repaired:
            lines.append(
                f"repaired: forgot the records of {len(self.repaired)} tile(s); rerun the "
                "pipeline (resume on) to recompute exactly those tiles"
            )
        elif not self.ok:
            command = f"{cli_command()} verify --repair"
            if self.target:
                command += f" {shell_join(self.target)}"
            lines.append(
                f"run again with repair ({command}) to forget the records "
                "of these tiles, then rerun the pipeline to recompute them"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (for ``zarr-orch verify --json`` and scripts)."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "products": list(self.products),
            "bad": [dict(b._asdict(), kind=b.kind) for b in self.bad],
            "repaired": [{"product": p, "row": r, "col": c} for p, r, c in self.repaired],
            "skipped": [{"product": p, "reason": why} for p, why in self.skipped],
            "seconds": round(self.seconds, 3),
        }


# -- one product ----------------------------------------------------------------------------------


def verify_product(
    url: str | Location,
    storage_options: dict[str, Any] | None = None,
    repair: bool = False,
) -> VerifyReport:
    """Check every recorded tile of the product at `url` against its completion record.

    Raises `ProductError` when `url` is not a readable zarr_orch product. With `repair`,
    the records of bad tiles (and malformed records) are deleted afterwards.
    """
    start = time.perf_counter()
    location = Location.parse(url, storage_options)
    info = read_product_info(location)
    checker = _ProductChecker(location, info)
    report = checker.run()
    if repair:
        checker.repair(report)
    report.target = location.url
    report.seconds = time.perf_counter() - start
    logger.info(
        "verified %s: %d records, %d problem(s)", location.url, report.checked, len(report.bad)
    )
    return report


class _Record(NamedTuple):
    row: int
    col: int
    crcs: tuple[int, ...]


class _ProductChecker:
    """Checks the tiles of one product, one batch of records at a time."""

    def __init__(self, location: Location, info: dict[str, Any]) -> None:
        self.location = location
        self.url = location.url
        self.info = info
        self.kind = info.get("kind", cst.CARS_DS_TYPE_ARRAY)
        self.store = location.zarr_store(read_only=True)
        self.group = zarr.open_group(self.store, mode="r", zarr_format=3, use_consolidated=False)
        self.grid_shape = tuple(int(v) for v in info.get("tile_grid_shape") or ())
        origin = info.get("grid_origin") or [0, 0]
        tile = info.get("tile_size") or [1, 1]
        self.offset = (
            int(origin[0]) // max(1, int(tile[0])),
            int(origin[1]) // max(1, int(tile[1])),
        )
        self._arrays: dict[str, Any] = {}
        #: records to delete on repair: {records name: {(row, col)}}, plus raw stray keys
        self.forget: dict[str, set[tuple[int, int]]] = {}
        self.stray_keys: list[str] = []

    # -- driver -----------------------------------------------------------------------------------
    def run(self) -> VerifyReport:
        report = VerifyReport(products=[self.url])
        if self.info.get("windowed"):
            return self._run_windowed(report)
        for name in self._records_names(report):
            tags = self._records_layout(name, report)
            if tags is None:
                continue
            for batch in _batches(self._records(name, tags, report), self._batch_size(tags)):
                for record, problems in zip(
                    batch, self._check_batch(name, tags, batch), strict=True
                ):
                    report.checked += 1
                    for tag, problem in problems:
                        self._bad(report, name, record.row, record.col, tag, problem)
        return report

    def _run_windowed(self, report: VerifyReport) -> VerifyReport:
        """Windowed products: chunks decode, no merge pending (records are not per chunk)."""
        tags = list(self.info.get("tags") or {})
        for tag, problem in windowed_problems(self.group, self.store, tags):
            kind = UNDECODABLE if tag else UNFINISHED_MERGE
            if tag:
                problem += (
                    "; its pixels merge several tiles, so it cannot be redone tile by tile: "
                    "rebuild the product with resume: false"
                )
            report.bad.append(BadTile(self.url, None, None, tag, f"{kind}: {problem}"))
        for name in self._records_names(report):
            report.checked += len(rec.done_tiles(self.store, name))
        return report

    def _batch_size(self, tags: tuple[str, ...]) -> int:
        """Tiles read at once: as many as fit `BATCH_BYTES` of decoded chunks (1..BATCH)."""
        if self.kind != cst.CARS_DS_TYPE_ARRAY:
            return BATCH
        names = (
            tags if tags != ("*",) else [n for n in self._member_arrays() if n not in _COORDINATES]
        )
        nbytes = 0
        for tag in names:
            array = self._array(tag)
            if not isinstance(array, Exception):
                nbytes += int(np.prod(array.chunks)) * np.dtype(array.dtype).itemsize
        return max(1, min(BATCH, BATCH_BYTES // max(1, nbytes)))

    def _member_arrays(self) -> list[str]:
        try:
            return sorted(self.group.array_keys())
        except Exception:  # reported per tile when the arrays are read
            return []

    def _bad(
        self,
        report: VerifyReport,
        name: str,
        row: int | None,
        col: int | None,
        tag: str,
        problem: str,
    ) -> None:
        report.bad.append(BadTile(self.url, row, col, tag, problem))
        if row is not None and col is not None:
            self.forget.setdefault(name, set()).add((row, col))

    def repair(self, report: VerifyReport) -> None:
        """Delete the records of every bad tile (and stray record keys): they will rerun."""
        if not self.forget and not self.stray_keys:
            return
        store = self.location.zarr_store()
        for name, tiles in sorted(self.forget.items()):
            try:
                records = rec.open_records(store, name, mode="r+")
            except FileNotFoundError:  # a malformed or missing records array: nothing to forget
                continue
            rec.forget_tiles(records, sorted(tiles))
            report.repaired.extend((self.url, row, col) for row, col in sorted(tiles))
        for key in self.stray_keys:
            delete_key(store, key)
        logger.warning(
            "%s: forgot the records of %d tile(s) (and %d stray key(s)); a rerun recomputes them",
            self.url,
            len(report.repaired),
            len(self.stray_keys),
        )

    # -- records ----------------------------------------------------------------------------------
    def _records_names(self, report: VerifyReport) -> list[str]:
        """Records arrays the product declares, plus any other found in its meta group."""
        names = [n for n in self.info.get("records") or [] if isinstance(n, str)]
        try:
            self.group[rec.META_GROUP]
            found = [n for n in rec.find_records(self.store) if _RECORDS_NAME.match(n)]
        except KeyError:
            found = []
            if names:
                self._bad(
                    report,
                    "",
                    None,
                    None,
                    "",
                    f"{MALFORMED}: the {rec.META_GROUP} group holding the records is gone",
                )
        except Exception as exc:
            found = []
            self._bad(
                report,
                "",
                None,
                None,
                "",
                f"{MALFORMED}: the {rec.META_GROUP} group "
                f"cannot be read ({type(exc).__name__}: {exc})",
            )
        return list(dict.fromkeys([*names, *sorted(found)]))

    def _records_layout(self, name: str, report: VerifyReport) -> tuple[str, ...] | None:
        """The tags of records array `name`, or None (reported) when its metadata is wrong."""
        path = f"{rec.META_GROUP}/{name}"
        try:
            array = rec.open_records(self.store, name)
        except FileNotFoundError:
            self._bad(
                report,
                name,
                None,
                None,
                "",
                f"{MALFORMED}: records array {path} is declared but missing",
            )
            return None
        except Exception as exc:
            self._bad(
                report,
                name,
                None,
                None,
                "",
                f"{MALFORMED}: records array {path} cannot be opened ({type(exc).__name__}: {exc})",
            )
            return None
        tags = array.attrs.get("tags")
        fields = array.attrs.get("fields")
        why = None
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            why = f"its tags attribute is {tags!r}"
        elif fields != [*rec.BASE_FIELDS, *(f"crc32:{t}" for t in tags)]:
            why = f"its fields attribute {fields!r} does not match its tags {tags!r}"
        elif np.dtype(array.dtype) != np.dtype("uint64") or array.ndim != 3:
            why = f"it is {array.ndim}-D {array.dtype}, not 3-D uint64"
        elif array.chunks[2] != len(fields) or array.shape[2] != len(fields):
            why = f"its shape {array.shape} / chunks {array.chunks} do not hold whole records"
        elif isinstance(array, zarr.Array) and array.metadata.codecs[1:]:
            why = f"its records are encoded with {array.metadata.codecs[1:]}, not stored raw"
        elif self.grid_shape and tuple(array.shape[:2]) != self.grid_shape:
            why = (
                f"it covers {tuple(array.shape[:2])} tiles but the product's tile grid is "
                f"{self.grid_shape}"
            )
        if why:
            self._bad(report, name, None, None, "", f"{MALFORMED}: records array {path}: {why}")
            return None
        return tuple(tags)

    def _records(self, name: str, tags: tuple[str, ...], report: VerifyReport) -> Iterator[_Record]:
        """Valid records of array `name`, block by block; malformed ones are reported."""
        prefix = f"{rec.META_GROUP}/{name}/c/"
        nfields = len(rec.BASE_FIELDS) + len(tags)
        array = rec.open_records(self.store, name)
        block_rows, block_cols = int(array.chunks[0]), int(array.chunks[1])
        blocks: list[tuple[int, int]] = []
        for key in list_keys(self.store, prefix):
            parts = key[len(prefix) :].split("/")
            try:
                bi, bj, last = (int(p) for p in parts)
            except ValueError:
                last = -1
            if len(parts) != 3 or last != 0:
                report.checked += 1
                self._bad(
                    report, name, None, None, "", f"{MALFORMED}: stray key {key} among the records"
                )
                self.stray_keys.append(key)
                continue
            blocks.append((bi, bj))
        blocks.sort()
        size = block_rows * block_cols * nfields * 8
        for batch in _batches(blocks, 64):
            raws = get_many(self.store, [rec.block_key(name, bi, bj) for bi, bj in batch])
            for (bi, bj), raw in zip(batch, raws, strict=True):
                key = rec.block_key(name, bi, bj)
                problem = None
                if self.grid_shape and not (
                    0 <= bi * block_rows < self.grid_shape[0]
                    and 0 <= bj * block_cols < self.grid_shape[1]
                ):
                    problem = f"records block {key} lies outside the {self.grid_shape} tile grid"
                elif raw is not None and len(raw) != size:
                    problem = f"records block {key} has {len(raw)} bytes instead of {size}"
                if problem is not None:
                    report.checked += 1
                    self._bad(report, name, None, None, "", f"{MALFORMED}: {problem}")
                    self.stray_keys.append(key)  # repair drops it: its tiles rerun
                    continue
                if raw is None:  # vanished while being checked
                    continue
                values = np.frombuffer(raw, dtype="<u8").reshape(block_rows, block_cols, nfields)
                for a, b in zip(*np.nonzero(values.any(axis=2)), strict=True):
                    row, col = bi * block_rows + int(a), bj * block_cols + int(b)
                    record = values[a, b]
                    problem = None
                    if self.grid_shape and not (
                        row < self.grid_shape[0] and col < self.grid_shape[1]
                    ):
                        problem = f"tile outside the {self.grid_shape} tile grid"
                    elif int(record[0]) != 1:
                        problem = f"done flag is {int(record[0])}, not 1"
                    if problem is not None:
                        report.checked += 1
                        self._bad(report, name, row, col, "", f"{MALFORMED}: {problem}")
                        continue
                    yield _Record(row, col, tuple(int(v) for v in record[len(rec.BASE_FIELDS) :]))

    # -- tiles ------------------------------------------------------------------------------------
    def _check_batch(
        self, name: str, tags: tuple[str, ...], batch: list[_Record]
    ) -> list[list[tuple[str, str]]]:
        """[(tag, problem)] of each record of `batch`."""
        if self.kind == cst.CARS_DS_TYPE_ARRAY:
            if tags == ("*",):
                return self._check_all_variables(name, batch)
            return self._check_arrays(tags, batch)
        return [self._check_subgroup(record) for record in batch]

    def _array(self, tag: str) -> Any:
        """The tag's array, or an Exception saying why it cannot be opened (cached)."""
        if tag not in self._arrays:
            try:
                array = self.group[tag]
                if not isinstance(array, zarr.Array):
                    array = KeyError(f"{tag} is a group, not an array")
            except Exception as exc:
                array = exc
            self._arrays[tag] = array
        return self._arrays[tag]

    def _region(self, array: Any, record: _Record) -> tuple[tuple[Any, ...], str]:
        """The index of the tile's region in `array` and its chunk's store key."""
        ch, cw = array.chunks[-2:]
        height, width = array.shape[-2:]
        i, j = record.row + self.offset[0], record.col + self.offset[1]
        r0, c0 = i * ch, j * cw
        if r0 >= height or c0 >= width:
            raise IndexError(f"chunk ({i}, {j}) is outside the {height}x{width} array")
        index = (slice(r0, min(r0 + ch, height)), slice(c0, min(c0 + cw, width)))
        coords = (i, j) if array.ndim == 2 else (*(0,) * (array.ndim - 2), i, j)
        key = array.metadata.encode_chunk_key(coords)
        path = array.store_path.path
        return ((Ellipsis, *index), f"{path}/{key}" if path else key)

    def _read_many(self, tag: str, records: list[_Record]) -> list[_Read]:
        """Tile regions of `tag` for `records`, read concurrently in one event-loop round
        (zarr's per-call overhead, not decoding, dominates small reads one by one)."""
        array = self._array(tag)
        if isinstance(array, Exception):
            kind = MISSING_ARRAY if isinstance(array, KeyError) else UNDECODABLE
            problem = f"{kind}: array {tag!r} cannot be opened ({array})"
            return [_Read(None, "", False, problem) for _ in records]
        regions: list[tuple[Any, str] | str] = []
        for record in records:
            try:
                regions.append(self._region(array, record))
            except IndexError as exc:
                regions.append(f"{MALFORMED}: {exc}")
        async_array = array._async_array
        root = local_root(self.store)

        async def one(region: tuple[Any, str] | str) -> _Read:
            if isinstance(region, str):
                return _Read(None, "", False, region)
            index, key = region
            if root is not None:
                stored = os.path.isfile(os.path.join(root, key))
            else:
                stored = bool(await self.store.exists(key))
            try:
                values = np.ascontiguousarray(await async_array.getitem(index))
            except Exception as exc:
                return _Read(
                    None,
                    key,
                    stored,
                    f"{UNDECODABLE}: chunk {key} cannot be decoded "
                    f"({type(exc).__name__}: {_short(exc)})",
                )
            return _Read(values, key, stored, None)

        async def all_of() -> list[_Read]:
            return list(await asyncio.gather(*(one(r) for r in regions)))

        return sync(all_of())

    def _check_arrays(
        self, tags: tuple[str, ...], batch: list[_Record]
    ) -> list[list[tuple[str, str]]]:
        problems: list[list[tuple[str, str]]] = [[] for _ in batch]
        for position, tag in enumerate(tags):
            wanted = [k for k, r in enumerate(batch) if r.crcs[position] != 0]
            # crc 0: the tile had no such tag (optional / missing), nothing was written
            reads = self._read_many(tag, [batch[k] for k in wanted])
            for k, read in zip(wanted, reads, strict=True):
                problem = _crc_problem(read, batch[k].crcs[position])
                if problem:
                    problems[k].append((tag, problem))
        return problems

    def _check_all_variables(self, name: str, batch: list[_Record]) -> list[list[tuple[str, str]]]:
        """Intermediate products: one CRC over the CRCs of the tile's raster variables, in
        the tile's variable order, read from the tile description the writer stores before
        the record (``<records>_tiles``, see `zarr_orch.storage.readers.tile_store`)."""
        problems: list[list[tuple[str, str]]] = [[] for _ in batch]
        names: list[list[str] | None] = []
        for k, record in enumerate(batch):
            try:
                text = self.group[f"{rec.META_GROUP}/{name}_tiles"][record.row, record.col]
                desc = json.loads(str(text)) if text else None
            except Exception as exc:
                problems[k].append(
                    (
                        "*",
                        f"{MALFORMED}: the tile description cannot be read "
                        f"({type(exc).__name__}: {_short(exc)})",
                    )
                )
                names.append(None)
                continue
            if not desc:
                problems[k].append(("*", f"{MALFORMED}: recorded tile has no tile description"))
                names.append(None)
                continue
            names.append(
                [
                    n
                    for n, e in (desc.get("variables") or {}).items()
                    if e.get("saved") and len(e.get("dims") or ()) in (2, 3)
                ]
            )
        reads: dict[tuple[str, int], _Read] = {}
        for var in dict.fromkeys(v for vs in names if vs for v in vs):
            users = [k for k, vs in enumerate(names) if vs and var in vs]
            for k, read in zip(users, self._read_many(var, [batch[k] for k in users]), strict=True):
                reads[(var, k)] = read
        for k, record in enumerate(batch):
            if names[k] is None:
                continue
            tile_reads = [(var, reads[(var, k)]) for var in names[k]]
            broken = [(var, r.problem) for var, r in tile_reads if r.problem or r.values is None]
            if broken:
                var, problem = broken[0]
                problems[k].append((var, problem or f"{UNDECODABLE}: {var}"))
                continue
            crcs = np.array([rec.checksum(r.values) for _, r in tile_reads], dtype="<u8")
            if rec.checksum(crcs) == record.crcs[0]:
                continue
            absent = [r.key for _, r in tile_reads if not r.stored]
            if absent:
                problems[k].append(
                    (
                        "*",
                        f"{MISSING_CHUNK}: {', '.join(absent)} absent and the "
                        "tile does not match its record",
                    )
                )
            else:
                problems[k].append(
                    (
                        "*",
                        f"{MISMATCH}: the variables {', '.join(names[k])} do not match the record",
                    )
                )
        return problems

    def _check_subgroup(self, record: _Record) -> list[tuple[str, str]]:
        """Points/dict tiles: the sub-group exists and reads; points columns match the CRC."""
        name = tile_group_name(record.row, record.col)
        try:
            tile_group = self.group[name]
        except KeyError:
            return [("", f"{MISSING_GROUP}: {name} is absent but the tile is recorded")]
        except Exception as exc:
            return [("", f"{UNDECODABLE}: {name} cannot be opened ({type(exc).__name__})")]
        if self.kind == cst.CARS_DS_TYPE_DICT:
            if "data" not in tile_group.attrs:
                return [("", f"{MISSING_GROUP}: {name} has no data attribute")]
            return []
        try:
            parts = [tile_group]
            if "pairs" in tile_group.attrs:
                parts = [tile_group[p] for p in tile_group.attrs["pairs"]]
        except Exception as exc:
            return [
                (
                    "",
                    f"{MISSING_GROUP}: a pair sub-group of {name} cannot be opened "
                    f"({type(exc).__name__}: {_short(exc)})",
                )
            ]
        crcs = []
        for part in parts:
            for column in part.attrs.get("columns", []):
                try:
                    values = np.asarray(part[str(column)][:])
                except Exception as exc:
                    return [
                        (
                            str(column),
                            f"{UNDECODABLE}: {name} column {column!r} cannot be "
                            f"read ({type(exc).__name__}: {_short(exc)})",
                        )
                    ]
                if values.dtype.kind not in "USTOV":  # the writer checksums numeric columns
                    crcs.append(rec.checksum(values))
        expected = record.crcs[0] if record.crcs else 0
        if (crcs[0] if crcs else 0) != expected:
            return [("", f"{MISMATCH}: the points of {name} do not match the record")]
        return []


class _Read(NamedTuple):
    """One tag of one tile as read back: values, chunk key, whether the chunk is stored."""

    values: np.ndarray | None
    key: str
    stored: bool
    problem: str | None


def _crc_problem(read: _Read, crc: int) -> str | None:
    """What is wrong with one tag of one tile given its recorded CRC (None: nothing)."""
    if read.problem is not None or read.values is None:
        return read.problem or f"{UNDECODABLE}: {read.key}"
    got = rec.checksum(read.values)
    if got == crc:
        return None
    if not read.stored:
        if _fill_variant_matches(read.values, crc):
            return None
        return (
            f"{MISSING_CHUNK}: {read.key} is absent but the record says data was written "
            "(it does not read back as all nodata)"
        )
    return (
        f"{MISMATCH}: chunk {read.key} reads back with crc32 {got:#010x}, the record says "
        f"{crc:#010x}"
    )


def _fill_variant_matches(values: np.ndarray, crc: int) -> bool:
    """True when an absent all-NaN chunk was written as x86's negative NaN (before the
    writer made NaNs canonical): zarr skipped it as equal to the NaN fill value."""
    if values.dtype.kind != "f" or not np.isnan(values).all():
        return False
    return rec.checksum(np.full(values.shape, -np.nan, dtype=values.dtype)) == crc


# -- a run directory --------------------------------------------------------------------------


def verify_run(
    out_dir: str | Location,
    storage_options: dict[str, Any] | None = None,
    repair: bool = False,
) -> VerifyReport:
    """Verify every product of a run: ``*.zarr`` in `out_dir` and one level down
    (``intermediate/``), plus those its metadata.json lists elsewhere (absolute file names).

    `out_dir` may also be one product. With `repair`, the out_dir lease is taken first so
    that no run writes while records are deleted (a live run makes this raise LeaseError).
    """
    start = time.perf_counter()
    location = Location.parse(out_dir, storage_options)
    if not location.exists():
        raise ProductError(f"{location.url} does not exist")
    if location.fs.exists(posixpath.join(location.fs_path, "zarr.json")):  # one product
        return verify_product(location, repair=repair)
    lease = None
    if repair:
        lease = Lease(location, f"verify-{uuid.uuid4().hex[:8]}")
        lease.acquire()
    try:
        report = VerifyReport()
        for product in find_products(location):
            try:
                report.extend(verify_product(product, repair=repair))
            except ProductError as exc:
                text = str(exc)
                if "not a zarr_orch product" in text:
                    report.skipped.append((product.url, text))
                else:
                    report.products.append(product.url)
                    report.bad.append(BadTile(product.url, None, None, "", f"{UNREADABLE}: {text}"))
    finally:
        if lease is not None:
            lease.release()
    report.target = location.url
    report.seconds = time.perf_counter() - start
    return report


def find_products(location: Location) -> list[Location]:
    """``*.zarr`` directories in `location` and one level down, plus the products its
    metadata.json lists outside it (each once, in a stable order)."""
    found: dict[str, Location] = {}
    for name in _subdirectories(location):
        child = location.join(name)
        if name.lower().endswith(".zarr"):
            found.setdefault(child.url, child)
        elif not name.startswith((".", "_")):
            for sub in _subdirectories(child):
                if sub.lower().endswith(".zarr"):
                    found.setdefault(child.join(sub).url, child.join(sub))
    for _name, other in listed_products(location, _read_metadata(location)):
        if other.url not in found and other.exists():
            found[other.url] = other
    return list(found.values())


def _read_metadata(location: Location) -> dict[str, Any] | None:
    """The run's metadata.json (None when absent or unreadable: the products are still
    checked). Its product entries resolve in `location`, never where the run was written."""
    try:
        meta = json.loads(location.join(METADATA_FILE).read_text())
    except Exception:  # a damaged metadata.json must not stop the check of the products
        return None
    return meta if isinstance(meta, dict) else None


def _subdirectories(location: Location) -> list[str]:
    """Names of the directories directly under `location` (sorted)."""
    try:
        entries = location.fs.ls(location.fs_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [
        posixpath.basename(str(e["name"]).rstrip("/"))
        for e in entries
        if e.get("type") == "directory"
    ]
    return sorted(n for n in names if n)


# -- helpers ------------------------------------------------------------------------------------


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
