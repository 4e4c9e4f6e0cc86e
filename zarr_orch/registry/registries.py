"""The three registries of a breakpoint: datasets to save, to replace, to compute.

Registering only records intent (cheap, main process); `zarr_orch.registry.plan` turns the
saver entries into product plans when the breakpoint runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import ConfigurationError
from zarr_orch.storage.core.location import RESERVED_NAMES
from zarr_orch.storage.format.encoding import check_nodata, normalize_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveEntry:
    """One `add_to_save_lists` call: a tag of a dataset saved into a file name."""

    file_name: str
    tag: str
    dtype: str
    nodata: Any
    optional: bool
    by_pair: bool


class TrackedDataset:
    """A registered CarsDataset with its id and the name used in messages."""

    __slots__ = ("cars_ds", "key", "name")

    def __init__(self, cars_ds: Any, key: int, name: str) -> None:
        self.cars_ds = cars_ds
        self.key = key
        self.name = name


class Registries:
    """Save / replace / compute registrations of the current breakpoint."""

    def __init__(self) -> None:
        self.datasets: dict[int, TrackedDataset] = {}
        self.save_entries: dict[int, list[SaveEntry]] = {}
        self.replace_keys: set[int] = set()
        self.compute_keys: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.datasets)

    def track(self, cars_ds: Any, key: int, name: str | None) -> TrackedDataset:
        """Remember `cars_ds` under `key` (a later non-None name wins)."""
        _check_dataset(cars_ds)
        tracked = self.datasets.get(key)
        label = name or getattr(cars_ds, "name", None) or f"dataset_{key}"
        if label == "unknown":
            label = f"dataset_{key}"
        if tracked is None:
            tracked = TrackedDataset(cars_ds, key, label)
            self.datasets[key] = tracked
        elif name:
            tracked.name = name
        return tracked

    def add_save(
        self,
        cars_ds: Any,
        key: int,
        name: str | None,
        file_name: str,
        tag: str,
        dtype: Any,
        nodata: Any,
        optional: bool,
        by_pair: bool,
    ) -> SaveEntry:
        """Validate and record one saved tag; conflicting re-registrations are refused."""
        if not isinstance(tag, str) or not tag or "/" in tag or tag.startswith(("_", ".")):
            raise ConfigurationError(
                f"tag {tag!r} is not a valid name: use a non-empty string without '/' that does "
                "not start with '_' or '.'"
            )
        if tag in (cst.ROW, cst.COL, cst.BAND, "spatial_ref"):
            raise ConfigurationError(f"tag {tag!r} is reserved for coordinates; rename it")
        if tag in RESERVED_NAMES:
            raise ConfigurationError(
                f"tag {tag!r} is a reserved Zarr name (it would overwrite the product's own "
                "metadata); rename it"
            )
        if not isinstance(file_name, str | bytes) and not hasattr(file_name, "__fspath__"):
            raise ConfigurationError(f"file_name must be a path or URL, got {file_name!r}")
        file_name = str(file_name)
        if not file_name.strip():
            raise ConfigurationError("file_name is empty: name the product to write")
        dataset_type = cars_ds.dataset_type
        if dataset_type == cst.CARS_DS_TYPE_ARRAY:
            np_dtype = normalize_dtype(dtype)
            nodata = check_nodata(np_dtype, nodata)
            dtype_str = np_dtype.str
        else:
            dtype_str = np.dtype(dtype).str if dtype is not None else "<f4"
        entry = SaveEntry(file_name, tag, dtype_str, nodata, bool(optional), bool(by_pair))
        tracked = self.track(cars_ds, key, name)
        entries = self.save_entries.setdefault(key, [])
        for other in entries:
            if other.file_name == entry.file_name and other.tag == entry.tag:
                if other != entry:
                    raise ConfigurationError(
                        f"tag {tag!r} of {tracked.name} is already registered for {file_name!r} "
                        f"with dtype {np.dtype(other.dtype)} and nodata {other.nodata}; it "
                        f"cannot also be saved with dtype {np.dtype(entry.dtype)} and nodata "
                        f"{entry.nodata}"
                    )
                return other
        entries.append(entry)
        return entry

    def add_replace(self, cars_ds: Any, key: int, name: str | None) -> None:
        """Tiles of `cars_ds` come back into it after the breakpoint."""
        self.track(cars_ds, key, name)
        self.replace_keys.add(key)

    def add_compute(self, cars_ds: Any, key: int, name: str | None) -> None:
        """Tiles of `cars_ds` are computed for their side effects only."""
        self.track(cars_ds, key, name)
        self.compute_keys.add(key)

    def ordered(self) -> list[TrackedDataset]:
        """Saved, then replaced, then computed datasets, each once (CARS's order)."""
        keys = list(self.save_entries)
        keys += [k for k in self.datasets if k in self.replace_keys and k not in keys]
        keys += [k for k in self.datasets if k not in keys]
        return [self.datasets[k] for k in keys]


def _check_dataset(cars_ds: Any) -> None:
    if not hasattr(cars_ds, "tiles") or not hasattr(cars_ds, "dataset_type"):
        raise ConfigurationError(
            f"expected a CarsDataset, got {type(cars_ds).__name__}; create one with "
            "zarr_orch.CarsDataset(dataset_type)"
        )
    if cars_ds.tiles is None:
        raise ConfigurationError(
            f"{cars_ds!r} has no tiling grid yet: set cars_ds.tiling_grid before registering it"
        )
