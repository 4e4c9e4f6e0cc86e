"""Stable ids for CarsDatasets, matched by object identity, without keeping datasets alive."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

from zarr_orch.errors import ConfigurationError


class IdGenerator:
    """Gives each CarsDataset one id for the orchestrator's lifetime (the `cars_ds_key`).

    Asking before or after registration, or from several registries, gives the same id.
    Datasets are held weakly: a dataset the application dropped is not kept in memory.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._ids: dict[int, int] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}

    def get_id(self, cars_ds: Any) -> int:
        """The id of `cars_ds`, allocating a new one on first sight."""
        marker = id(cars_ds)
        ref = self._refs.get(marker)
        if ref is not None and ref() is cars_ds:
            return self._ids[marker]
        try:
            new_ref = weakref.ref(cars_ds, lambda _ref, m=marker: self._forget(m, _ref))
        except TypeError:  # dicts, lists, None...: not a CarsDataset
            raise ConfigurationError(
                f"expected a CarsDataset, got {type(cars_ds).__name__}; create one with "
                "zarr_orch.CarsDataset(dataset_type)"
            ) from None
        key = next(self._counter)
        self._ids[marker] = key
        self._refs[marker] = new_ref
        return key

    def _forget(self, marker: int, ref: weakref.ref[Any]) -> None:
        if self._refs.get(marker) is ref:
            del self._refs[marker]
            del self._ids[marker]

    def find(self, cars_ds: Any) -> int | None:
        """The id of `cars_ds` if it has one, else None."""
        marker = id(cars_ds)
        ref = self._refs.get(marker)
        return self._ids[marker] if ref is not None and ref() is cars_ds else None
