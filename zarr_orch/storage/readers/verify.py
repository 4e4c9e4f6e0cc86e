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
recomputes exactly those tiles and rewrites their chunks whole. Temp files a killed writer
left in a local product (`zarr_orch.storage.core.atomic_files`) are listed too, as litter,
not damage; repair deletes those older than a minute (the next run removes them anyway).
Checking streams: records and tile data are read in batches (concurrent reads through
zarr's async API, at most `BATCH_BYTES` of decoded data held at once), never the whole
product. `verify_run` checks every product of a run directory (``intermediate/`` too).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from typing import Any

from zarr_orch.errors import ProductError
from zarr_orch.storage.core.atomic_files import STALE_AFTER, find_temp_files, remove_temp_files
from zarr_orch.storage.core.lease import Lease
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.run_dir import listed_products
from zarr_orch.storage.format.product import read_product_info
from zarr_orch.storage.readers.verify_checks import ProductChecker
from zarr_orch.storage.readers.verify_report import UNREADABLE, BadTile, VerifyReport

logger = logging.getLogger(__name__)


METADATA_FILE = "metadata.json"


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
    checker = ProductChecker(location, info)
    report = checker.run()
    if location.is_local:  # object stores write with one PUT: no temp files
        report.temp_files = find_temp_files(location.url)
    if repair:
        checker.repair(report)
        report.removed_temp_files, report.kept_temp_files = remove_temp_files(
            report.temp_files, STALE_AFTER
        )
    report.target = location.url
    report.seconds = time.perf_counter() - start
    logger.info(
        "verified %s: %d records, %d problem(s), %d temp file(s) left by killed writers",
        location.url,
        report.checked,
        len(report.bad),
        len(report.temp_files),
    )
    return report


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
