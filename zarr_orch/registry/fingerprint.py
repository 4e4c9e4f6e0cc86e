"""Product fingerprints: what defines a product's content, to decide if a rerun may resume.

A fingerprint hashes the array schemas (dtype, nodata, chunks, extent, codec, dims), the
tiling grid and overlaps, the tags and an optional user key for what the library cannot
see (the tile function's code and parameters). The components are stored next to the
digest, so a mismatch can say exactly what changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from zarr_orch.storage.format.product import ProductPlan


def _array_digest(array: Any) -> str | None:
    if array is None:
        return None
    values = np.ascontiguousarray(np.asarray(array, dtype="float64"))
    return hashlib.sha1(values.tobytes() + str(values.shape).encode()).hexdigest()[:16]


def fingerprint_components(plan: ProductPlan, cars_ds: Any, run_key: str | None) -> dict:
    """The JSON-safe components that define one dataset's content in one product."""
    dataset_key = (getattr(cars_ds, "attributes", None) or {}).get("run_key")
    return {
        "kind": plan.kind,
        "tags": [
            [t.name, str(np.dtype(t.dtype)) if t.dtype else "as computed", t.nodata]
            for t in plan.tags
        ],
        "tile_size": list(plan.chunks),
        "extent": list(plan.extent),
        "tile_grid_shape": list(plan.grid_shape),
        "tiling_grid": _array_digest(cars_ds.tiling_grid),
        "overlaps": _array_digest(cars_ds.overlaps),
        "codec": plan.codec,
        "checksum": plan.checksum,
        "save_by_pair": plan.save_by_pair,
        # only windowed products carry the key: older grid-aligned products keep resuming
        **({"windowed": True} if plan.windowed else {}),
        "run_key": run_key,
        "dataset_run_key": dataset_key,
    }


def digest(components: dict) -> str:
    """Stable short hash of fingerprint components."""
    text = json.dumps(components, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]
