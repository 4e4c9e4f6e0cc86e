"""CARS 1.3's file-level helpers of ``cars_dataset``: rasterio windows and descriptors, tile
files, and the point-cloud CSV files tasks write themselves (`run_save_points`).

zarr_orch saves registered data into Zarr products; these helpers are for application code
that writes files directly, as CARS's does, so it runs unchanged once its imports change.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import ConfigurationError

logger = logging.getLogger(__name__)

POINT_CLOUD_FORMATS = ("csv",)


def generate_rasterio_window(window: Mapping[str, Any] | None) -> Any:
    """The rasterio Window of a ``{row_min, row_max, col_min, col_max}`` dict (None: None)."""
    if window is None:
        return None
    from rasterio.windows import Window

    return Window.from_slices(
        (window["row_min"], window["row_max"]), (window["col_min"], window["col_max"])
    )


def _yaml_dump(content: Any, path: str) -> None:
    from zarr_orch.data.documents import dump_document

    with open(path, "w", encoding="utf8") as stream:
        stream.write(dump_document(content, "yaml"))


def _point_file_name(dataframe: Any, file_name: str, overwrite_file_name: bool) -> str:
    """CARS's naming: ``<dir>/<xmin>_<ymax>`` from attributes, else ``<dir>/<col>_<row>``."""
    if not overwrite_file_name:
        return file_name
    attrs = dataframe.attrs
    attributes = attrs.get(cst.ATTRIBUTES) or {}
    directory = os.path.dirname(file_name)
    if "xmin" in attributes:
        return os.path.join(directory, f"{attributes['xmin']}_{attributes['ymax']}")
    info = attrs.get(cst.SAVING_INFO)
    if info is not None:
        return os.path.join(directory, f"{info[cst.CARS_DS_COL]}_{info[cst.CARS_DS_ROW]}")
    return file_name


def save_dataframe(
    dataframe: Any, file_name: str, overwrite: bool = True, point_cloud_format: str = "csv"
) -> None:
    """Write a point tile as ``file_name.csv`` plus ``file_name_attrs.yaml`` (CARS's layout).

    Without `overwrite`, an existing CSV is extended with the new points.
    """
    import pandas as pd

    if point_cloud_format not in POINT_CLOUD_FORMATS:
        raise ConfigurationError(
            f"point cloud format {point_cloud_format!r} is not written by zarr_orch's "
            "run_save_points; use 'csv' (or save the points with add_to_save_lists)"
        )
    _yaml_dump(dataframe.attrs, file_name + "_attrs.yaml")
    if "csv" not in os.path.splitext(file_name)[1]:
        file_name += ".csv"
    if not overwrite and os.path.exists(file_name):
        existing = pd.read_csv(file_name)
        dataframe = pd.concat([existing, dataframe], ignore_index=True, sort=False)
    dataframe.to_csv(file_name, index=False)


def run_save_points(
    future_result: Any,
    file_name: str,
    overwrite: bool = False,
    save_by_pair: bool = False,
    point_cloud_format: str = "csv",
    overwrite_file_name: bool = True,
    nbits: int | None = None,
) -> None:
    """Save a point tile to CSV files as CARS's ``run_save_points`` does (`nbits` unused).

    `save_by_pair` writes one directory per source pair (``attributes.source_pc_names``,
    points split by their ``global_id`` column).
    """
    del nbits  # CARS ignores it too
    name = _point_file_name(future_result, os.fspath(file_name), overwrite_file_name)
    if not save_by_pair:
        save_dataframe(future_result, name, overwrite, point_cloud_format)
        return
    names = future_result.attrs[cst.ATTRIBUTES]["source_pc_names"]
    for pair in sorted(set(np.asarray(future_result["global_id"]).flat)):
        directory = os.path.join(os.path.dirname(name), names[int(pair)])
        os.makedirs(directory, exist_ok=True)
        subset = future_result.loc[future_result["global_id"] == pair]
        save_dataframe(
            subset, os.path.join(directory, os.path.basename(name)), overwrite, point_cloud_format
        )


class CarsFilesMixin:
    """`CarsDataset` methods of CARS 1.3 that read and write files directly."""

    dataset_type: str
    tiling_grid: Any

    def save_single_tile(self, tile: Any, tile_path_name: str) -> None:
        """Save one tile to a file (pickle, as zarr_orch's saved CarsDatasets hold them)."""
        with open(tile_path_name, "wb") as stream:
            pickle.dump(tile, stream, protocol=pickle.HIGHEST_PROTOCOL)

    def load_single_tile(self, tile_path_name: str) -> Any:
        """Load a tile written by `save_single_tile` (unpickles: trusted files only)."""
        with open(tile_path_name, "rb") as stream:
            return pickle.load(stream)

    def generate_descriptor(
        self,
        future_result: Any,
        file_name: str,
        tag: str | None = None,
        dtype: Any = None,
        nodata: Any = None,
        rio_tags: Any = None,
        rio_band_description: Any = None,
        nbits: int | None = None,
    ) -> Any:
        """An open rasterio dataset ("w+") for `tag` of the tiles, profiled as CARS does."""
        import rasterio
        from rasterio.profiles import DefaultGTiffProfile

        profile = dict(future_result.attrs.get(cst.PROFILE) or {})
        values = future_result[tag].values
        count = values.shape[0] if values.ndim > 2 else 1
        profile["count"] = count
        if "width" not in profile or "height" not in profile:
            grid = np.asarray(self.tiling_grid)
            profile = dict(DefaultGTiffProfile(count=count))
            profile["height"] = int(np.max(grid[:, :, 1]))
            profile["width"] = int(np.max(grid[:, :, 3]))
        profile["dtype"] = dtype
        if nodata is not None:
            profile["nodata"] = nodata
        if nbits is not None:
            profile["nbits"] = nbits
        descriptor = rasterio.open(file_name, "w+", **profile, BIGTIFF="IF_SAFER")
        for band, text in rio_tags or ():
            descriptor.update_tags(band=band, class_name=str(text))
        for band, text in rio_band_description or ():
            descriptor.set_band_description(band, str(text))
        return descriptor

    def run_save(self, future_result: Any, file_name: str, **kwargs: Any) -> None:
        """Write a tile: arrays into ``kwargs['descriptor']`` at its window, points to CSV."""
        if self.dataset_type == cst.CARS_DS_TYPE_POINTS:
            run_save_points(future_result, file_name, **kwargs)
            return
        if self.dataset_type != cst.CARS_DS_TYPE_ARRAY:
            raise ConfigurationError(f"run_save cannot save {self.dataset_type!r} datasets")
        tag, descriptor = kwargs["tag"], kwargs["descriptor"]
        window = future_result.attrs.get(cst.WINDOW)
        overlaps = future_result.attrs.get(cst.OVERLAPS) or {}
        up, down = overlaps.get("up", 0), overlaps.get("down", 0)
        left, right = overlaps.get("left", 0), overlaps.get("right", 0)
        data = future_result[tag].values
        rows, cols = data.shape[-2], data.shape[-1]
        data = data[..., up : rows - down, left : cols - right]
        if data.ndim == 2:
            data = data[np.newaxis]
        descriptor.write(data, window=generate_rasterio_window(window))
