"""zarr_orch: CARS-style tiled raster orchestration that streams every tile into Zarr chunks.

Public names are imported lazily (on first attribute access), so worker processes and the
command line only pay for what they use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CarsDataset": "zarr_orch.data.cars_dataset",
    "CarsDict": "zarr_orch.data.cars_dataset",
    "fill_dataframe": "zarr_orch.data.cars_dataset",
    "fill_dataset": "zarr_orch.data.cars_dataset",
    "fill_dict": "zarr_orch.data.cars_dataset",
    "get_attributes": "zarr_orch.data.cars_dataset",
    "get_overlaps_dataset": "zarr_orch.data.cars_dataset",
    "get_profile_rasterio": "zarr_orch.data.cars_dataset",
    "get_window_dataset": "zarr_orch.data.cars_dataset",
    "generate_rasterio_window": "zarr_orch.data.cars_files",
    "run_save_points": "zarr_orch.data.cars_files",
    "create_grid": "zarr_orch.data.tiling",
    "generate_tiling_grid": "zarr_orch.data.tiling",
    "ConfigurationError": "zarr_orch.errors",
    "MisalignedGridError": "zarr_orch.errors",
    "ProductError": "zarr_orch.errors",
    "TaskFailedError": "zarr_orch.errors",
    "TileError": "zarr_orch.errors",
    "ZarrOrchError": "zarr_orch.errors",
    "Orchestrator": "zarr_orch.orchestrator",
    "flatten_object": "zarr_orch.cars_compat",
    "get_disparity_range_cropped": "zarr_orch.cars_compat",
    "merge_dicts": "zarr_orch.cars_compat",
    "update_saving_infos": "zarr_orch.cars_compat",
    "Callback": "zarr_orch.progress",
    "open_product": "zarr_orch.reading",
    "read_dicts": "zarr_orch.storage.readers.points",
    "read_points": "zarr_orch.storage.readers.points",
    "open_run": "zarr_orch.status",
    "tile_status": "zarr_orch.status",
    "status_map": "zarr_orch.status",
    "RunInfo": "zarr_orch.status",
    "ProductSummary": "zarr_orch.status",
    "quicklook": "zarr_orch.quicklook",
    "write_geotiff": "zarr_orch.storage.writers.geotiff",
    "GeoTiffReport": "zarr_orch.storage.writers.geotiff",
    "MissingDependencyError": "zarr_orch.quicklook",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zarr_orch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
