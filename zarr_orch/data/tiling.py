"""Tiling grids: build them, convert windows/overlaps, check chunk alignment.

A tiling grid is an ``[nb_rows, nb_cols, 4]`` array whose cell ``[i, j]`` is the
half-open window ``[row_min, row_max, col_min, col_max]`` of tile ``(i, j)``, as in
CNES CARS. Overlap arrays have the same shape and hold ``[up, down, left, right]``
margins in pixels. Pure numpy, no I/O.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import MisalignedGridError, TilingError

logger = logging.getLogger(__name__)

_WINDOW_KEYS = (cst.ROW_MIN, cst.ROW_MAX, cst.COL_MIN, cst.COL_MAX)
_OVERLAP_KEYS = (cst.UP, cst.DOWN, cst.LEFT, cst.RIGHT)

_GRID_ADVICE = (
    "Use a grid from generate_tiling_grid/create_grid with a constant tile size "
    "starting on a chunk boundary; tiles may only be smaller at the last row/column, "
    "where they must end at the array extent."
)


def _is_integer(value: Any) -> bool:
    """True for Python/numpy integers (bool excluded)."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def _check_real(name: str, value: Any) -> float:
    """Return ``value`` as a finite float or raise TilingError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TilingError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise TilingError(f"{name} must be finite, got {value!r}")
    return float(value)


def _as_python_number(value: Any) -> int | float:
    """Convert a scalar to ``int`` when it is integral, else to ``float``."""
    if _is_integer(value):
        return int(value)
    fvalue = float(value)
    if math.isfinite(fvalue) and fvalue.is_integer():
        return int(fvalue)
    return fvalue


def _axis_bounds(
    start: int | float, stop: int | float, split: int | float, integer: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``[start, stop)`` in steps of ``split``; the last piece is clipped to ``stop``."""
    count = math.ceil((stop - start) / split)
    dtype = np.int64 if integer else np.float64
    mins = start + np.arange(count, dtype=dtype) * np.asarray(split, dtype=dtype)
    # float rounding may produce an empty trailing piece: drop it
    while count > 1 and mins[count - 1] >= stop:
        count -= 1
        mins = mins[:count]
    maxs = np.minimum(mins + np.asarray(split, dtype=dtype), np.asarray(stop, dtype=dtype))
    return mins.astype(dtype), maxs.astype(dtype)


def generate_tiling_grid(
    row_min: float,
    col_min: float,
    row_max: float,
    col_max: float,
    row_split: float,
    col_split: float,
) -> np.ndarray:
    """Split ``[row_min, row_max) x [col_min, col_max)`` into ``row_split x col_split`` tiles.

    Returns an ``[nb_rows, nb_cols, 4]`` grid of ``[row_min, row_max, col_min, col_max]``
    with ``nb_rows = ceil((row_max - row_min) / row_split)`` and
    ``nb_cols = ceil((col_max - col_min) / col_split)``; the last row/column is clipped
    to the max. The grid is int64 when every input is an integer, float64 otherwise
    (terrain coordinates). Unlike CARS's ``create_grid``, row and column splits are
    never swapped, so non-square tiles are correct.
    """
    values = {
        "row_min": row_min,
        "col_min": col_min,
        "row_max": row_max,
        "col_max": col_max,
        "row_split": row_split,
        "col_split": col_split,
    }
    for name, value in values.items():
        _check_real(name, value)
    if row_split <= 0 or col_split <= 0:
        raise TilingError(
            f"tile size must be > 0, got row_split={row_split!r}, col_split={col_split!r}"
        )
    if row_max <= row_min:
        raise TilingError(f"empty row range: row_max ({row_max!r}) must be > row_min ({row_min!r})")
    if col_max <= col_min:
        raise TilingError(
            f"empty column range: col_max ({col_max!r}) must be > col_min ({col_min!r})"
        )

    integer = all(_is_integer(value) for value in values.values())
    if integer:
        row_min, col_min, row_max, col_max, row_split, col_split = (
            int(v) for v in (row_min, col_min, row_max, col_max, row_split, col_split)
        )
    rmins, rmaxs = _axis_bounds(row_min, row_max, row_split, integer)
    cmins, cmaxs = _axis_bounds(col_min, col_max, col_split, integer)

    dtype = np.int64 if integer else np.float64
    grid = np.empty((rmins.size, cmins.size, 4), dtype=dtype)
    grid[:, :, 0] = rmins[:, None]
    grid[:, :, 1] = rmaxs[:, None]
    grid[:, :, 2] = cmins[None, :]
    grid[:, :, 3] = cmaxs[None, :]
    return grid


def create_grid(
    nb_rows: int,
    nb_cols: int,
    row_split: int,
    col_split: int,
    row_overlap: int = 0,
    col_overlap: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile a ``nb_rows x nb_cols`` raster; return ``(grid, overlaps)``, both ``[N, M, 4]``.

    ``overlaps`` is int64 ``[up, down, left, right]``, clipped so that a tile plus its
    margins never leaves the raster (``up = min(row_overlap, row_min)``,
    ``down = min(row_overlap, nb_rows - row_max)``, same for columns).
    """
    for name, value in (
        ("nb_rows", nb_rows),
        ("nb_cols", nb_cols),
        ("row_split", row_split),
        ("col_split", col_split),
        ("row_overlap", row_overlap),
        ("col_overlap", col_overlap),
    ):
        if not _is_integer(value):
            raise TilingError(f"{name} must be an integer, got {value!r}")
    if nb_rows <= 0 or nb_cols <= 0:
        raise TilingError(f"raster size must be > 0, got nb_rows={nb_rows}, nb_cols={nb_cols}")
    if row_overlap < 0 or col_overlap < 0:
        raise TilingError(
            f"overlaps must be >= 0, got row_overlap={row_overlap}, col_overlap={col_overlap}"
        )

    grid = generate_tiling_grid(0, 0, int(nb_rows), int(nb_cols), int(row_split), int(col_split))
    overlaps = np.empty(grid.shape, dtype=np.int64)
    overlaps[:, :, 0] = np.minimum(int(row_overlap), grid[:, :, 0])
    overlaps[:, :, 1] = np.minimum(int(row_overlap), int(nb_rows) - grid[:, :, 1])
    overlaps[:, :, 2] = np.minimum(int(col_overlap), grid[:, :, 2])
    overlaps[:, :, 3] = np.minimum(int(col_overlap), int(nb_cols) - grid[:, :, 3])
    return grid, overlaps


def _four_values(name: str, values: Any) -> list[Any]:
    """Return the 4 entries of a window/overlap array, or raise TilingError."""
    if isinstance(values, Mapping):
        raise TilingError(
            f"{name} must be an array [4], got a dict; use the *_dict_to_array helper"
        )
    flat = np.asarray(values).reshape(-1) if values is not None else None
    if flat is None or flat.size != 4:
        raise TilingError(f"{name} must have exactly 4 values, got {values!r}")
    return flat.tolist()


def window_array_to_dict(
    window: Sequence[float] | np.ndarray, overlap: Sequence[float] | np.ndarray | None = None
) -> dict[str, int | float]:
    """Convert ``[row_min, row_max, col_min, col_max]`` into a window dict.

    With ``overlap`` (``[up, down, left, right]``) the window is expanded by the margins,
    as in CARS. Values are Python ints when integral, floats otherwise.
    """
    values = _four_values("window", window)
    if overlap is not None:
        up, down, left, right = _four_values("overlap", overlap)
        values = [values[0] - up, values[1] + down, values[2] - left, values[3] + right]
    return {key: _as_python_number(value) for key, value in zip(_WINDOW_KEYS, values, strict=True)}


def _dict_to_array(name: str, mapping: Mapping[str, Any], keys: tuple[str, ...]) -> np.ndarray:
    """Read ``keys`` from ``mapping`` into an int64 (or float64 if non-integral) array."""
    if not isinstance(mapping, Mapping):
        raise TilingError(f"{name} must be a dict with keys {list(keys)}, got {mapping!r}")
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise TilingError(f"{name} dict is missing keys {missing} (expected {list(keys)})")
    values = [_as_python_number(_check_real(f"{name}[{key!r}]", mapping[key])) for key in keys]
    if all(isinstance(value, int) for value in values):
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=np.float64)


def window_dict_to_array(window: Mapping[str, Any]) -> np.ndarray:
    """Convert a window dict into ``[row_min, row_max, col_min, col_max]``.

    Raises TilingError for ``None`` (a tile without window cannot be placed).
    """
    if window is None:
        raise TilingError(
            "window is None: the tile carries no window; set it with fill_dataset(window=...)"
        )
    return _dict_to_array("window", window, _WINDOW_KEYS)


def overlap_array_to_dict(overlap: Sequence[float] | np.ndarray) -> dict[str, int | float]:
    """Convert ``[up, down, left, right]`` into ``{"up", "down", "left", "right"}``."""
    values = _four_values("overlap", overlap)
    return {key: _as_python_number(value) for key, value in zip(_OVERLAP_KEYS, values, strict=True)}


def overlap_dict_to_array(overlap: Mapping[str, Any] | None) -> np.ndarray:
    """Convert an overlaps dict into ``[up, down, left, right]``; ``None`` means no margin."""
    if overlap is None:
        return np.zeros(4, dtype=np.int64)
    return _dict_to_array("overlap", overlap, _OVERLAP_KEYS)


def _check_grid_array(grid: Any) -> np.ndarray:
    """Return ``grid`` as a non-empty ``[N, M, 4]`` ndarray or raise TilingError."""
    arr = np.asarray(grid)
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise TilingError(
            f"tiling grid must have shape [nb_rows, nb_cols, 4], got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise TilingError(f"tiling grid has no tile (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TilingError(f"tiling grid must be numeric, got dtype {arr.dtype}")
    return arr


def grid_extent(grid: np.ndarray) -> tuple[int, int]:
    """Return ``(height, width)`` covered by ``grid``: the max row_max and max col_max.

    Non-integral maxima are rounded up so that the extent always contains the grid.
    """
    arr = _check_grid_array(grid)
    return math.ceil(float(np.max(arr[:, :, 1]))), math.ceil(float(np.max(arr[:, :, 3])))


def _first_bad(mask: np.ndarray) -> tuple[int, int] | None:
    """Row-major index of the first True cell of a 2-D mask, or None."""
    if not mask.any():
        return None
    flat = int(np.argmax(mask.reshape(-1)))
    return flat // mask.shape[1], flat % mask.shape[1]


def _window_text(grid: np.ndarray, row: int, col: int) -> str:
    """Human-readable window of tile ``(row, col)``."""
    values = window_array_to_dict(grid[row, col])
    return "{" + ", ".join(f"{k}={v}" for k, v in values.items()) + "}"


def regular_chunk_shape(grid: np.ndarray, extent: tuple[int, int] | None = None) -> tuple[int, int]:
    """Check that ``grid`` is a regular chunk grid and return ``(tile_height, tile_width)``.

    The chunk shape is the size of tile (0, 0). Every tile must start on a multiple of it,
    have exactly that size (only the last row/column may be smaller, and then it must end
    at ``extent``), stay inside ``extent``, be contiguous with its neighbours and share its
    row/column bounds with the whole grid row/column. ``extent`` is the array
    ``(height, width)``; it defaults to :func:`grid_extent`. Vectorised: O(tiles).
    Raises MisalignedGridError naming the first offending tile (row-major order).
    """
    arr = _check_grid_array(grid)
    nb_rows, nb_cols = arr.shape[:2]

    if not np.issubdtype(arr.dtype, np.integer):
        finite = np.isfinite(arr).all(axis=2)
        integral = finite & (np.mod(np.where(np.isfinite(arr), arr, 0), 1) == 0).all(axis=2)
        bad = _first_bad(~integral)
        if bad is not None:
            row, col = bad
            raise MisalignedGridError(
                f"tiling grid is not a pixel grid: tile (row={row}, col={col}) has window "
                f"{arr[row, col].tolist()} with non-integral values; chunk-aligned writes "
                "need integer pixel windows (convert terrain coordinates to pixels first)."
            )
    g = arr.astype(np.int64)

    height = int(g[0, 0, 1] - g[0, 0, 0])
    width = int(g[0, 0, 3] - g[0, 0, 2])
    if height <= 0 or width <= 0:
        raise MisalignedGridError(
            f"tile (row=0, col=0) has an empty window {_window_text(g, 0, 0)}: "
            f"cannot derive a chunk shape from it. {_GRID_ADVICE}"
        )

    if extent is None:
        ext_h, ext_w = grid_extent(g)
    else:
        if len(extent) != 2 or not all(_is_integer(v) and v > 0 for v in extent):
            raise TilingError(f"extent must be (height, width) positive integers, got {extent!r}")
        ext_h, ext_w = int(extent[0]), int(extent[1])

    r0, r1, c0, c1 = g[:, :, 0], g[:, :, 1], g[:, :, 2], g[:, :, 3]
    heights = r1 - r0
    widths = c1 - c0
    is_last_row = np.zeros((nb_rows, nb_cols), dtype=bool)
    is_last_row[-1, :] = True
    is_last_col = np.zeros((nb_rows, nb_cols), dtype=bool)
    is_last_col[:, -1] = True

    def _not_contiguous(lo: np.ndarray, hi: np.ndarray, axis: int) -> np.ndarray:
        mask = np.zeros(lo.shape, dtype=bool)
        if axis == 0:
            mask[1:, :] = lo[1:, :] != hi[:-1, :]
        else:
            mask[:, 1:] = lo[:, 1:] != hi[:, :-1]
        return mask

    chunk = f"({height}, {width})"
    # (mask, reason) in priority order; the reason text is built only for the reported tile
    rules: list[tuple[np.ndarray, str]] = [
        (
            (r0 != r0[:, :1]) | (r1 != r1[:, :1]),
            "does not share row_min/row_max with tile (row={row}, col=0) of the same grid row",
        ),
        (
            (c0 != c0[:1, :]) | (c1 != c1[:1, :]),
            "does not share col_min/col_max with tile (row=0, col={col}) of the same grid column",
        ),
        (
            _not_contiguous(r0, r1, 0),
            "does not start where the tile above ends (rows must be contiguous)",
        ),
        (
            _not_contiguous(c0, c1, 1),
            "does not start where the tile on its left ends (columns must be contiguous)",
        ),
        (r0 % height != 0, f"row_min is not a multiple of the chunk height {height}"),
        (c0 % width != 0, f"col_min is not a multiple of the chunk width {width}"),
        (
            (heights <= 0) | (heights > height),
            f"has height {{h}} outside (0, {height}]",
        ),
        (
            (widths <= 0) | (widths > width),
            f"has width {{w}} outside (0, {width}]",
        ),
        (
            ~is_last_row & (heights != height),
            f"has height {{h}} != chunk height {height} (only the last row may be smaller)",
        ),
        (
            ~is_last_col & (widths != width),
            f"has width {{w}} != chunk width {width} (only the last column may be smaller)",
        ),
        (r1 > ext_h, f"ends at row_max={{r1}} beyond the array height {ext_h}"),
        (c1 > ext_w, f"ends at col_max={{c1}} beyond the array width {ext_w}"),
        (
            is_last_row & (heights < height) & (r1 != ext_h),
            f"is a smaller last-row tile (height {{h}}) that does not end at the array "
            f"height {ext_h}",
        ),
        (
            is_last_col & (widths < width) & (c1 != ext_w),
            f"is a smaller last-column tile (width {{w}}) that does not end at the array "
            f"width {ext_w}",
        ),
    ]

    any_bad = np.zeros((nb_rows, nb_cols), dtype=bool)
    for mask, _ in rules:
        any_bad |= mask
    bad = _first_bad(any_bad)
    if bad is None:
        logger.debug("grid %s is a regular chunk grid of chunk shape %s", g.shape[:2], chunk)
        return height, width

    row, col = bad
    reason = next(text for mask, text in rules if mask[row, col])
    reason = reason.format(
        row=row,
        col=col,
        h=int(heights[row, col]),
        w=int(widths[row, col]),
        r1=int(r1[row, col]),
        c1=int(c1[row, col]),
    )
    nb_bad = int(any_bad.sum())
    raise MisalignedGridError(
        f"tiling grid is not a regular chunk grid: tile (row={row}, col={col}) with window "
        f"{_window_text(g, row, col)} {reason}. Expected chunk shape {chunk} (size of tile "
        f"(0, 0)) over an array of extent ({ext_h}, {ext_w}); {nb_bad} of "
        f"{nb_rows * nb_cols} tiles are misaligned. {_GRID_ADVICE}"
    )
