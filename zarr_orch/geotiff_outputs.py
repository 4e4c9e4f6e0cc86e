"""Registered GeoTIFF file names exist after their breakpoint, built from the Zarr products.

CARS applications register ``dsm.tif`` and read it back in the next step (or update it in
place). The Zarr product stays the primary store; once a breakpoint's tiles are all written,
every ``.tif``/``.tiff`` name it saved is written by
`zarr_orch.storage.writers.geotiff.write_geotiff` (tile by tile, bounded memory, temp name +
rename), with CARS's GeoTIFF options (``rio_band_description``, ``rio_tags``, ``nbits``) kept as
attributes of the tag array. A rerun whose tiles were all resumed writes the file again, so a
run killed between the Zarr product and its GeoTIFF completes it without recomputing a tile.
Conf key ``geotiff_outputs: false`` keeps runs Zarr-only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.errors import ConfigurationError
from zarr_orch.storage.core.handles import open_group
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.format.consolidated import consolidate
from zarr_orch.storage.format.product import ProductPlan

logger = logging.getLogger(__name__)

GEOTIFF_SUFFIXES = (".tif", ".tiff")
#: layout of rasterio's DefaultGTiffProfile, which CARS writes when a tile has no profile
COMPRESS = "lzw"
BLOCKSIZE = 256
#: GeoTIFFs written at once after a breakpoint (a core each on this class of machine)
EXPORT_THREADS = 2


def is_geotiff_name(file_name: Any) -> bool:
    """True for a file name CARS writes as a GeoTIFF (``.tif``/``.tiff``)."""
    return os.fspath(file_name).lower().endswith(GEOTIFF_SUFFIXES)


@dataclass(frozen=True)
class GeoTiffOptions:
    """CARS's GeoTIFF options of one saved tag, as given to ``add_to_save_lists``."""

    band_description: tuple[tuple[int, str], ...] | None = None
    rio_tags: tuple[tuple[Any, str], ...] | None = None
    nbits: int | None = None

    @classmethod
    def from_cars(cls, rio_band_description: Any, rio_tags: Any, nbits: Any) -> GeoTiffOptions:
        """Check CARS's ``[(band, text), ...]`` lists and ``nbits``; refuse malformed ones."""
        return cls(
            _pairs("rio_band_description", rio_band_description, band_index=True),
            _pairs("rio_tags", rio_tags, band_index=False),
            _nbits(nbits),
        )

    def attributes(self, bands: int) -> dict[str, Any]:
        """Tag-array attributes ``band_descriptions`` (a str per band), ``geotiff_tags``, ``nbits``.

        CARS calls ``set_band_description(band, text)`` per pair (bands not named stay empty)
        and ``update_tags(band=band, class_name=text)`` per tag pair, which sets the dataset
        tags ``band`` and ``class_name`` (the last pair wins); the same tags are kept here.
        """
        attrs: dict[str, Any] = {}
        if self.band_description:
            names = [""] * bands
            for band, text in self.band_description:
                if not 1 <= band <= bands:
                    raise ConfigurationError(
                        f"rio_band_description names band {band}, but the raster has {bands} "
                        "band(s) (bands count from 1)"
                    )
                names[band - 1] = text
            attrs["band_descriptions"] = names
        if self.rio_tags:
            band, text = self.rio_tags[-1]
            attrs["geotiff_tags"] = {"band": str(band), "class_name": text}
        if self.nbits is not None:
            attrs["nbits"] = self.nbits
        return attrs


def _pairs(name: str, value: Any, band_index: bool) -> tuple[tuple[Any, str], ...] | None:
    if value is None:
        return None
    try:
        pairs = tuple((first, str(second)) for first, second in value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{name} must be a list of (band, text) pairs, e.g. [(1, 'height')], got {value!r}"
        ) from None
    if band_index:
        for band, _text in pairs:
            if isinstance(band, bool) or not isinstance(band, int) or band < 1:
                raise ConfigurationError(
                    f"{name}: band numbers are integers >= 1 (GDAL counts from 1), got {band!r}"
                )
    return pairs


def _nbits(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
        raise ConfigurationError(f"nbits must be an integer from 1 to 32 or None, got {value!r}")
    return int(value)


class GeoTiffOutputs:
    """GeoTIFF options registered for the current breakpoint, and the export after it."""

    def __init__(self, out_location: Location, enabled: bool) -> None:
        self.out_location = out_location
        self.enabled = enabled
        self._options: dict[tuple[int, str, str], GeoTiffOptions] = {}
        self.seconds = 0.0
        self._lock = threading.Lock()

    def register(self, key: int, file_name: Any, tag: str, options: GeoTiffOptions) -> None:
        """Remember the GeoTIFF options of tag `tag` of dataset `key` saved to `file_name`."""
        if options != GeoTiffOptions():
            self._options[(key, os.fspath(file_name), tag)] = options

    def clear(self) -> None:
        """Forget the registrations (registries are reset after each breakpoint)."""
        self._options.clear()

    def annotate(self, key: int, file_name: str, plan: ProductPlan) -> None:
        """Store the registered GeoTIFF options as attributes of the product's tag arrays."""
        wanted = {
            tag: self._options[(key, file_name, tag)]
            for tag in plan.tag_names
            if (key, file_name, tag) in self._options
        }
        if not wanted or plan.kind != cst.CARS_DS_TYPE_ARRAY:
            return
        group = open_group(plan.location, "r+")
        changed = False
        for tag, options in wanted.items():
            if tag not in group:  # optional data no tile produced
                continue
            array = group[tag]
            bands = int(array.shape[0]) if array.ndim == 3 else 1
            attrs = options.attributes(bands)
            if any(array.attrs.get(name) != value for name, value in attrs.items()):
                array.attrs.update(attrs)
                changed = True
        if changed:
            # the breakpoint consolidated the metadata before this: readers that use it
            # (zarr.open_group, xarray, GDAL) would not see the new attributes
            consolidate(plan.location)

    def export(self, products: Sequence[tuple[int, str, ProductPlan, bool]]) -> list[str]:
        """Write the GeoTIFF of every (dataset key, file name, plan, any tile done) entry
        with a GeoTIFF name.

        Returns the destinations written. As CARS, nothing is written when no tile was done;
        tags of optional data no tile produced are skipped. Files are written on
        `EXPORT_THREADS` threads (GDAL's compression and zarr's decoding release the GIL);
        a name registered twice is written once, from the last entry (CARS overwrites it).
        """
        jobs: dict[str, tuple[ProductPlan, str, Location]] = {}
        for key, file_name, plan, any_done in products:
            self.annotate(key, file_name, plan)
            if not self.enabled or not is_geotiff_name(file_name):
                continue
            if not any_done:
                logger.warning("%s: no tile was computed, no GeoTIFF written", file_name)
                continue
            if plan.kind != cst.CARS_DS_TYPE_ARRAY:
                logger.warning(
                    "%s is registered as a GeoTIFF but %s holds %s: only rasters become "
                    "GeoTIFFs (the data is in %s)",
                    file_name,
                    plan.dataset_name,
                    plan.kind,
                    plan.location.url,
                )
                continue
            dest = Location.parse(file_name, base=self.out_location)
            present = [t for t in plan.tag_names if t in open_group(plan.location, "r")]
            if not present:
                logger.info("%s: no tile produced its data; no GeoTIFF written", file_name)
                continue
            if len(present) > 1:
                logger.warning(
                    "%s is registered for tags %s; a GeoTIFF holds one: writing %r (CARS "
                    "overwrites the file with each tag)",
                    file_name,
                    ", ".join(present),
                    present[-1],
                )
            jobs.pop(dest.url, None)  # the last registration of a name wins, as in CARS
            jobs[dest.url] = (plan, present[-1], dest)
        if len(jobs) <= 1:
            return [self._write(*job) for job in jobs.values()]
        with ThreadPoolExecutor(
            max_workers=EXPORT_THREADS, thread_name_prefix="zarr_orch-geotiff"
        ) as pool:
            futures = [pool.submit(self._write, *job) for job in jobs.values()]
            wait(futures)  # every file has ended before the first failure is raised
        return [future.result() for future in futures]

    def _write(self, plan: ProductPlan, tag: str, dest: Location) -> str:
        from zarr_orch.storage.writers.geotiff import write_geotiff

        start = time.perf_counter()
        report = write_geotiff(
            plan.location,
            tag,
            dest.url,
            storage_options=plan.location.storage_options or None,
            dest_storage_options=dest.storage_options or None,
            cog=False,
            compress=COMPRESS,
            blocksize=BLOCKSIZE,
            overviews="none",
        )
        seconds = time.perf_counter() - start
        with self._lock:
            self.seconds += seconds
        logger.info(
            "wrote %s from %s (tag %s, %d x %d, %d band(s)) in %.2f s",
            report.dest,
            plan.location.url,
            tag,
            report.shape[2],
            report.shape[1],
            report.shape[0],
            seconds,
        )
        return report.dest
