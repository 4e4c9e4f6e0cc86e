"""CARS-compatible data model: ``CarsDataset`` (a 2-D grid of tiles) and ``CarsDict``.

Mirrors ``cars/data_structures/cars_dataset.py`` (names, signatures, tile ``.attrs``
contract) without its known bugs: splits are never swapped, overlaps are int64 and
clipped at the border, and saving refuses delayed tiles instead of pickling them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from zarr_orch import constants as cst
from zarr_orch.constants import (
    ATTRIBUTES,
    CARS_DS_TYPE_ARRAY,
    CARS_DS_TYPE_DICT,
    CARS_DS_TYPE_POINTS,
    DATASET_TYPES,
    OVERLAPS,
    PROFILE,
    SAVING_INFO,
    WINDOW,
)
from zarr_orch.data import tiling
from zarr_orch.data.cars_files import (  # noqa: F401  (CARS 1.3 names of this module)
    CarsFilesMixin,
    generate_rasterio_window,
    run_save_points,
)
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.errors import ConfigurationError, ProductError, TileError, TilingError

logger = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTES_FILE",
    "CARS_DS_TYPE_ARRAY",
    "CARS_DS_TYPE_DICT",
    "CARS_DS_TYPE_POINTS",
    "GRID_FILE",
    "META_FILE",
    "OVERLAP_FILE",
    "TILES_INFO_FILE",
    "CarsDataset",
    "CarsDict",
    "create_none",
    "fill_dataframe",
    "fill_dataset",
    "fill_dict",
    "get_attributes",
    "get_attributes_dataframe",
    "get_overlaps_dataset",
    "get_profile_rasterio",
    "get_saving_info",
    "get_window_dataset",
    "is_concrete_tile",
    "load_dict",
    "save_dict",
    "tile_file_name",
]

# --- on-disk layout of a saved CarsDataset -----------------------------------
TILES_INFO_FILE = "tiles_info.json"
ATTRIBUTES_FILE = "attributes.json"
GRID_FILE = "grid.npy"
OVERLAP_FILE = "overlaps.npy"
META_FILE = "meta.json"
#: version of the directory layout written by ``save_cars_dataset``
FORMAT_VERSION = 1
_TILE_FILE_RE = re.compile(r"^tile_(\d+)_(\d+)\.pkl$")


class CarsDict:
    """Dict payload with ``.attrs``, so dict tiles can carry saving info like other tiles."""

    def __init__(self, dict_data: dict, attributes: dict | None = None) -> None:
        self.data = dict_data
        self.attrs = attributes if attributes is not None else {}

    def __repr__(self) -> str:
        keys = list(self.data) if isinstance(self.data, Mapping) else type(self.data).__name__
        return f"CarsDict(data keys={keys}, attrs keys={list(self.attrs)})"


def is_concrete_tile(obj: Any) -> bool:
    """True when ``obj`` is computed data (xr.Dataset, pd.DataFrame or CarsDict)."""
    return isinstance(obj, (xr.Dataset, pd.DataFrame, CarsDict))


def create_none(nb_row: int, nb_col: int) -> list[list[None]]:
    """Return a ``nb_row x nb_col`` 2-D list of None (independent rows)."""
    return [[None] * nb_col for _ in range(nb_row)]


def tile_file_name(row: int, col: int) -> str:
    """File name of tile ``(row, col)`` inside a saved CarsDataset directory."""
    return f"tile_{row}_{col}.pkl"


class _NumpyJSONEncoder(json.JSONEncoder):
    """JSON encoder that also accepts numpy scalars/arrays and paths."""

    def default(self, o: Any) -> Any:
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=repr)
        return super().default(o)


def save_dict(dictionary: Mapping[str, Any], file_path: str | os.PathLike) -> None:
    """Write ``dictionary`` as JSON (numpy-safe); tuples become lists, keys become strings."""
    try:
        text = json.dumps(dictionary, indent=2, cls=_NumpyJSONEncoder)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot save {os.fspath(file_path)!r} as JSON: {exc}") from exc
    Path(file_path).write_text(text, encoding="utf8")


def load_dict(file_path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON dict written by :func:`save_dict`."""
    with open(file_path, encoding="utf8") as stream:
        return json.load(stream)


def _check_index(value: Any, size: int, axis: str, shape: tuple[int, int]) -> int:
    """Validate one tile index (negatives allowed) and return it normalised."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{axis} index must be an integer, got {value!r} ({type(value).__name__})")
    index = int(value)
    if not -size <= index < size:
        raise IndexError(f"{axis} index {index} out of range for a CarsDataset of shape {shape}")
    return index % size


class CarsDataset(CarsFilesMixin):
    """2-D grid of tiles (xr.Dataset, pd.DataFrame or CarsDict) with its tiling grid.

    ``tiles[row][col]`` holds None (no work), a delayed object or a concrete tile (a tile
    a rerun serves from the store is an xr.Dataset whose values are read on first use);
    ``tiling_grid`` and ``overlaps`` are ``[N, M, 4]`` arrays (see ``zarr_orch.data.tiling``).
    ``tiles_info`` is persisted by :meth:`save_cars_dataset`, and so is ``attributes``
    (unlike CARS, which drops it).
    """

    def __init__(
        self,
        dataset_type: str,
        load_from_disk: str | os.PathLike | None = None,
        name: str = "unknown",
    ) -> None:
        if dataset_type not in DATASET_TYPES:
            raise ConfigurationError(
                f"wrong dataset type {dataset_type!r}: expected one of "
                f"{', '.join(repr(t) for t in DATASET_TYPES)}"
            )
        self.dataset_type = dataset_type
        self.tiles: list[list[Any]] | None = None
        self.tiles_info: dict[str, Any] = {}
        self._tiling_grid: np.ndarray | None = None
        self._overlaps: np.ndarray | None = None
        self.attributes: dict[str, Any] = {}
        self.name = name
        #: callable(orchestrator, tile) -> tile, run in the main process on arrival
        self.final_function = None

        if load_from_disk is not None:
            self.load_cars_dataset_from_disk(load_from_disk)

    # --- grid ----------------------------------------------------------------
    @property
    def tiling_grid(self) -> np.ndarray | None:
        """``[N, M, 4]`` windows ``[row_min, row_max, col_min, col_max]`` (None until set)."""
        return self._tiling_grid

    @tiling_grid.setter
    def tiling_grid(self, new_grid: np.ndarray) -> None:
        """Set the grid; like CARS, reset overlaps to zeros and every tile to None."""
        if new_grid is None:
            raise TilingError("tiling_grid cannot be set to None")
        grid = np.asarray(new_grid)
        if grid.ndim != 3 or grid.shape[2] != 4:
            raise TilingError(
                f"tiling grid must have shape [nb_rows, nb_cols, 4], got shape {grid.shape}"
            )
        self._tiling_grid = grid
        self._overlaps = np.zeros(grid.shape, dtype=np.int64)
        self.generate_none_tiles()

    @property
    def overlaps(self) -> np.ndarray | None:
        """``[N, M, 4]`` margins ``[up, down, left, right]`` in pixels (None until a grid)."""
        return self._overlaps

    @overlaps.setter
    def overlaps(self, new_overlaps: np.ndarray | None) -> None:
        """Set overlaps; their shape must match the tiling grid when one is set."""
        if new_overlaps is None:
            self._overlaps = None
            return
        arr = np.asarray(new_overlaps)
        if self._tiling_grid is not None and arr.shape != self._tiling_grid.shape:
            raise TilingError(
                f"overlaps shape {arr.shape} does not match tiling grid shape "
                f"{self._tiling_grid.shape}"
            )
        if self._tiling_grid is None and (arr.ndim != 3 or arr.shape[2] != 4):
            raise TilingError(f"overlaps must have shape [nb_rows, nb_cols, 4], got {arr.shape}")
        self._overlaps = arr

    def _require_grid(self) -> np.ndarray:
        """Return the grid or raise a TilingError telling how to set one."""
        if self._tiling_grid is None:
            raise TilingError(
                f"CarsDataset {self.name!r} has no tiling grid yet: set cds.tiling_grid "
                "or call cds.create_grid(...) / cds.create_empty_copy(other) first"
            )
        return self._tiling_grid

    @property
    def shape(self) -> tuple[int, int]:
        """``(nb_rows, nb_cols)`` of the tiling grid."""
        grid = self._require_grid()
        return int(grid.shape[0]), int(grid.shape[1])

    def generate_none_tiles(self) -> None:
        """Reset ``tiles`` to a grid-shaped 2-D list of None."""
        nb_rows, nb_cols = self.shape
        self.tiles = create_none(nb_rows, nb_cols)

    # --- item access ---------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        """``cds[row, col]`` -> tile; ``cds[row]`` or ``cds[(row,)]`` -> list of a whole row."""
        shape = self.shape
        if isinstance(key, (tuple, list)):
            if len(key) == 2:
                row = _check_index(key[0], shape[0], "row", shape)
                col = _check_index(key[1], shape[1], "col", shape)
                return self.tiles[row][col]
            if len(key) == 1:
                return self.tiles[_check_index(key[0], shape[0], "row", shape)]
            raise IndexError(f"expected 1 or 2 indices (row[, col]), got {len(key)}: {key!r}")
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return self.tiles[_check_index(key, shape[0], "row", shape)]
        raise TypeError(
            f"CarsDataset indices must be (row, col), (row,) or row integers, "
            f"got {type(key).__name__}"
        )

    def __setitem__(self, key: Any, newvalue: Any) -> None:
        """``cds[row, col] = tile``; only a (row, col) pair is accepted."""
        if not isinstance(key, (tuple, list)):
            raise TypeError(
                f"CarsDataset assignment needs a (row, col) index, got {type(key).__name__}"
            )
        if len(key) != 2:
            raise IndexError(f"CarsDataset assignment needs exactly 2 indices, got {key!r}")
        shape = self.shape
        row = _check_index(key[0], shape[0], "row", shape)
        col = _check_index(key[1], shape[1], "col", shape)
        self.tiles[row][col] = newvalue

    def __repr__(self) -> str:
        """Summary only (type, name, shape, tiles set): never the tile contents."""
        if self._tiling_grid is None:
            return f"CarsDataset(type={self.dataset_type!r}, name={self.name!r}, shape=None)"
        nb_set = sum(tile is not None for row in self.tiles for tile in row)
        nb_rows, nb_cols = self.shape
        return (
            f"CarsDataset(type={self.dataset_type!r}, name={self.name!r}, "
            f"shape=({nb_rows}, {nb_cols}), tiles_set={nb_set}/{nb_rows * nb_cols})"
        )

    __str__ = __repr__

    # --- windows & grids -----------------------------------------------------
    def get_window_as_dict(
        self, row: int, col: int, from_terrain: bool = False, resolution: float = 1
    ) -> dict[str, int]:
        """Pixel window of tile ``(row, col)`` relative to the grid origin (CARS semantics).

        With ``from_terrain`` the grid holds terrain coordinates (grid rows along x, grid
        cols along y): output rows come from y reversed (``col_max - y``, north up), output
        cols from x. Values are divided by ``resolution`` and rounded.
        """
        grid = self._require_grid()
        shape = self.shape
        row = _check_index(row, shape[0], "row", shape)
        col = _check_index(col, shape[1], "col", shape)
        if resolution is None or not resolution > 0:
            raise TilingError(f"resolution must be > 0, got {resolution!r}")

        row_min = np.min(grid[:, :, 0])
        col_min = np.min(grid[:, :, 2])
        col_max = np.max(grid[:, :, 3])
        win = np.asarray(grid[row, col, :], dtype=np.float64)
        if from_terrain:
            # row -> y axis: reversed by convention
            window = np.array(
                [col_max - win[3], col_max - win[2], win[0] - row_min, win[1] - row_min]
            )
        else:
            window = np.array(
                [win[0] - row_min, win[1] - row_min, win[2] - col_min, win[3] - col_min]
            )
        window = np.round(window / resolution)
        return {
            cst.ROW_MIN: int(window[0]),
            cst.ROW_MAX: int(window[1]),
            cst.COL_MIN: int(window[2]),
            cst.COL_MAX: int(window[3]),
        }

    def create_grid(
        self,
        nb_col: int,
        nb_row: int,
        row_split: int,
        col_split: int,
        row_overlap: int,
        col_overlap: int,
    ) -> None:
        """Tile ``[0, nb_row) x [0, nb_col)`` in ``row_split x col_split`` tiles (CARS order).

        Unlike CARS, the number of tile rows uses ``row_split`` and the number of tile
        columns ``col_split``; overlaps are clipped at the raster border.
        """
        grid, overlaps = tiling.create_grid(
            nb_row, nb_col, row_split, col_split, row_overlap, col_overlap
        )
        self.tiling_grid = grid
        self.overlaps = overlaps

    def create_empty_copy(self, cars_ds: CarsDataset) -> None:
        """Copy ``tiles_info``, grid and overlaps of ``cars_ds``; tiles become None.

        Like CARS, ``attributes`` are not copied: copy them explicitly if needed.
        """
        grid = cars_ds._require_grid()
        self.tiles_info = copy.deepcopy(cars_ds.tiles_info)
        self.tiling_grid = np.array(grid, copy=True)
        if cars_ds.overlaps is not None:
            self.overlaps = np.array(cars_ds.overlaps, copy=True)

    # --- persistence ---------------------------------------------------------
    def save_cars_dataset(self, directory: str | os.PathLike) -> None:
        """Save grid, overlaps, tiles_info, attributes, meta and concrete tiles to ``directory``.

        Layout: ``grid.npy``, ``overlaps.npy``, ``tiles_info.json``, ``attributes.json``,
        ``meta.json`` and one ``tile_{row}_{col}.pkl`` per non-None tile (lazy tiles are read
        first). Raises TileError (before writing anything) if a tile is not concrete.
        """
        grid = self._require_grid()
        nb_rows, nb_cols = self.shape
        saved: list[list[int]] = []
        for row in range(nb_rows):
            for col in range(nb_cols):
                tile = self.tiles[row][col]
                if tile is None:
                    continue
                if not is_concrete_tile(tile):
                    raise TileError(
                        f"cannot save CarsDataset {self.name!r}: tile (row={row}, col={col}) "
                        f"is a {type(tile).__module__}.{type(tile).__qualname__}, not a "
                        "concrete tile (xr.Dataset, pd.DataFrame or CarsDict); compute it "
                        "first (e.g. orchestrator.breakpoint()) or set it to None"
                    )
                saved.append([row, col])

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / GRID_FILE, np.asarray(grid), allow_pickle=False)
        overlaps = self.overlaps if self.overlaps is not None else np.zeros(grid.shape, np.int64)
        np.save(path / OVERLAP_FILE, np.asarray(overlaps), allow_pickle=False)
        save_dict(self.tiles_info, path / TILES_INFO_FILE)
        save_dict(self.attributes, path / ATTRIBUTES_FILE)

        # remove tiles left over by a previous save into the same directory
        wanted = {tile_file_name(row, col) for row, col in saved}
        for stale in path.glob("tile_*_*.pkl"):
            if _TILE_FILE_RE.match(stale.name) and stale.name not in wanted:
                stale.unlink()
        for row, col in saved:
            tile = self.tiles[row][col]
            if isinstance(tile, xr.Dataset):
                # tiles served lazily from a product are read (and checked) here, so the
                # saved directory holds their data, not a reference to the product
                tile = tile.load()
            with open(path / tile_file_name(row, col), "wb") as stream:
                pickle.dump(tile, stream, protocol=pickle.HIGHEST_PROTOCOL)

        # meta last: a directory without it is an interrupted save
        save_dict(
            {
                "format_version": FORMAT_VERSION,
                "dataset_type": self.dataset_type,
                "name": self.name,
                "shape": [nb_rows, nb_cols],
                "tiles": saved,
            },
            path / META_FILE,
        )
        logger.debug(
            "saved CarsDataset %r (%d x %d, %d tiles) to %s",
            self.name,
            nb_rows,
            nb_cols,
            len(saved),
            path,
        )

    def load_cars_dataset_from_disk(self, directory: str | os.PathLike) -> None:
        """Restore a dataset written by :meth:`save_cars_dataset` (unpickles: trusted dirs only).

        The saved name replaces the default ``"unknown"`` but not an explicit name.
        """
        path = Path(directory)
        if not path.is_dir():
            raise ProductError(f"cannot load CarsDataset: {os.fspath(path)!r} is not a directory")
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise ProductError(
                f"cannot load CarsDataset from {os.fspath(path)!r}: {META_FILE} is missing "
                "(not a saved CarsDataset, or the save was interrupted)"
            )
        meta = load_dict(meta_file)
        saved_type = meta.get("dataset_type")
        if saved_type != self.dataset_type:
            raise ProductError(
                f"{os.fspath(path)!r} holds a {saved_type!r} CarsDataset, "
                f"but a {self.dataset_type!r} one was requested"
            )
        for needed in (GRID_FILE, OVERLAP_FILE):
            if not (path / needed).is_file():
                raise ProductError(
                    f"cannot load CarsDataset from {os.fspath(path)!r}: {needed} is missing"
                )

        self.tiling_grid = np.load(path / GRID_FILE, allow_pickle=False)
        self.overlaps = np.load(path / OVERLAP_FILE, allow_pickle=False)
        tiles_info_file = path / TILES_INFO_FILE
        attributes_file = path / ATTRIBUTES_FILE
        self.tiles_info = load_dict(tiles_info_file) if tiles_info_file.is_file() else {}
        self.attributes = load_dict(attributes_file) if attributes_file.is_file() else {}
        if self.name == "unknown" and meta.get("name") is not None:
            self.name = meta["name"]

        for row, col in meta.get("tiles", []):
            tile_path = path / tile_file_name(row, col)
            if not tile_path.is_file():
                raise ProductError(
                    f"cannot load CarsDataset from {os.fspath(path)!r}: tile file "
                    f"{tile_path.name} listed in {META_FILE} is missing"
                )
            with open(tile_path, "rb") as stream:
                self.tiles[row][col] = pickle.load(stream)
        logger.debug("loaded CarsDataset %r from %s", self.name, path)


# --- tile attrs helpers --------------------------------------------------------
def _attrs_of(obj: Any, helper: str) -> dict:
    """Return ``obj.attrs`` or raise a TypeError explaining how to get one."""
    attrs = getattr(obj, "attrs", None)
    if attrs is None:
        hint = " wrap plain dicts in CarsDict(data)" if isinstance(obj, dict) else ""
        raise TypeError(
            f"{helper}: object of type {type(obj).__name__} has no .attrs dict to carry tile "
            f"metadata;{hint or ' use an xr.Dataset, pd.DataFrame or CarsDict'}"
        )
    return attrs


def _as_window_dict(window: Any) -> dict:
    """Window given as dict (kept) or as array (converted)."""
    if isinstance(window, Mapping):
        return dict(window)
    return window_array_to_dict(window)


def _as_overlap_dict(overlaps: Any) -> dict:
    """Overlaps given as dict (kept) or as array (converted)."""
    if isinstance(overlaps, Mapping):
        return dict(overlaps)
    return overlap_array_to_dict(overlaps)


def fill_dataset(
    dataset: Any,
    saving_info: dict | None = None,
    window: Any = None,
    profile: dict | None = None,
    attributes: dict | None = None,
    overlaps: Any = None,
) -> Any:
    """Store tile metadata in ``dataset.attrs`` (only the arguments given); return it.

    ``window``/``overlaps`` may be dicts or ``[4]`` arrays (converted to dicts).
    """
    attrs = _attrs_of(dataset, "fill_dataset")
    if attributes is not None:
        attrs[ATTRIBUTES] = attributes
    if saving_info is not None:
        attrs[SAVING_INFO] = saving_info
    if window is not None:
        attrs[WINDOW] = _as_window_dict(window)
    if overlaps is not None:
        attrs[OVERLAPS] = _as_overlap_dict(overlaps)
    if profile is not None:
        attrs[PROFILE] = profile
    return dataset


def fill_dataframe(
    dataframe: Any, saving_info: dict | None = None, attributes: dict | None = None
) -> Any:
    """Store saving info and attributes in ``dataframe.attrs``; return it."""
    attrs = _attrs_of(dataframe, "fill_dataframe")
    if attributes is not None:
        attrs[ATTRIBUTES] = attributes
    if saving_info is not None:
        attrs[SAVING_INFO] = saving_info
    return dataframe


def fill_dict(
    data_dict: Any, saving_info: dict | None = None, attributes: dict | None = None
) -> Any:
    """Store saving info and attributes in a CarsDict's ``.attrs``; return it.

    Plain dicts are refused (CARS accepted them, but they cannot be routed).
    """
    attrs = _attrs_of(data_dict, "fill_dict")
    if attributes is not None:
        attrs[ATTRIBUTES] = attributes
    if saving_info is not None:
        attrs[SAVING_INFO] = saving_info
    return data_dict


def _get_attr(obj: Any, key: str) -> Any:
    """``obj.attrs[key]`` or None when absent (or when obj has no attrs)."""
    attrs = getattr(obj, "attrs", None)
    if not isinstance(attrs, Mapping):
        return None
    return attrs.get(key)


def get_window_dataset(dataset: Any) -> dict | None:
    """Core window dict of a tile, or None."""
    return _get_attr(dataset, WINDOW)


def get_overlaps_dataset(dataset: Any) -> dict | None:
    """Overlaps dict of a tile, or None."""
    return _get_attr(dataset, OVERLAPS)


def get_profile_rasterio(dataset: Any) -> dict | None:
    """Full-raster profile of a tile, or None."""
    return _get_attr(dataset, PROFILE)


def get_attributes(dataset: Any) -> dict | None:
    """Free attributes dict of a tile, or None."""
    return _get_attr(dataset, ATTRIBUTES)


#: CARS name of :func:`get_attributes` for point tiles
get_attributes_dataframe = get_attributes


def get_saving_info(obj: Any) -> dict | None:
    """Saving info (routing key) of a tile, or None."""
    return _get_attr(obj, SAVING_INFO)
