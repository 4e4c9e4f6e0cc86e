"""zarr_orch: CARS-style tiled raster orchestration that streams every tile into Zarr chunks."""

__version__ = "0.1.0"

from zarr_orch.data.cars_dataset import (
    CarsDataset,
    CarsDict,
    fill_dataframe,
    fill_dataset,
    fill_dict,
    get_attributes,
    get_overlaps_dataset,
    get_profile_rasterio,
    get_window_dataset,
)
from zarr_orch.data.tiling import create_grid, generate_tiling_grid
from zarr_orch.errors import (
    ConfigurationError,
    MisalignedGridError,
    ProductError,
    TaskFailedError,
    TileError,
    ZarrOrchError,
)
from zarr_orch.orchestrator import Orchestrator, flatten_object, update_saving_infos
from zarr_orch.reading import open_product
from zarr_orch.storage.points import read_dicts, read_points

__all__ = [
    "CarsDataset",
    "CarsDict",
    "ConfigurationError",
    "MisalignedGridError",
    "Orchestrator",
    "ProductError",
    "TaskFailedError",
    "TileError",
    "ZarrOrchError",
    "__version__",
    "create_grid",
    "fill_dataframe",
    "fill_dataset",
    "fill_dict",
    "flatten_object",
    "generate_tiling_grid",
    "get_attributes",
    "get_overlaps_dataset",
    "get_profile_rasterio",
    "get_window_dataset",
    "open_product",
    "read_dicts",
    "read_points",
    "update_saving_infos",
]
