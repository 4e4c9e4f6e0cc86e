"""The checks of one product: re-read each recorded tile, in batches, and compare its CRCs.

`ProductChecker` streams records and tile data (at most `BATCH_BYTES` of decoded data held
at once) and, on repair, deletes the records of the tiles found bad.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.core.sync import sync

from zarr_orch import constants as cst
from zarr_orch.storage.core.atomic_files import is_temp_name
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.zarr_io import delete_key, get_many, list_keys, local_root
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.product import tile_group_name
from zarr_orch.storage.readers.verify_report import (
    MALFORMED,
    MISMATCH,
    MISSING_ARRAY,
    MISSING_CHUNK,
    MISSING_GROUP,
    UNDECODABLE,
    UNFINISHED_MERGE,
    BadTile,
    VerifyReport,
)
from zarr_orch.storage.readers.verify_windowed import windowed_problems

logger = logging.getLogger(__name__)

#: records (and at most as many tiles) read per batch: one concurrent round of GETs
BATCH = 256


#: decoded bytes of tile data held at once: batches of big tiles are smaller
BATCH_BYTES = 64 * 2**20


_COORDINATES = frozenset({cst.ROW, cst.COL, cst.BAND, "x", "y", "spatial_ref"})


_RECORDS_NAME = re.compile(r"^tiles_[0-9a-f]{10}$")


class _Record(NamedTuple):
    row: int
    col: int
    crcs: tuple[int, ...]


class ProductChecker:
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
            if is_temp_name(key):  # listed with the product's other temp files, not a record
                continue
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
