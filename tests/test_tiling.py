"""Tests of zarr_orch.data.tiling: grid generation, conversions, chunk alignment."""

import time

import numpy as np
import pytest

from zarr_orch.data.tiling import (
    create_grid,
    generate_tiling_grid,
    grid_extent,
    overlap_array_to_dict,
    overlap_dict_to_array,
    regular_chunk_shape,
    window_array_to_dict,
    window_dict_to_array,
)
from zarr_orch.errors import MisalignedGridError, TilingError, ZarrOrchError

# --- generate_tiling_grid -------------------------------------------------------


def test_generate_non_square_tiles_not_swapped():
    grid = generate_tiling_grid(0, 0, 1000, 1500, 256, 384)
    assert grid.shape == (4, 4, 4)
    assert grid.dtype == np.int64
    assert grid[0, 0].tolist() == [0, 256, 0, 384]
    assert grid[3, 3].tolist() == [768, 1000, 1152, 1500]
    heights = grid[:, 0, 1] - grid[:, 0, 0]
    widths = grid[0, :, 3] - grid[0, :, 2]
    assert heights.tolist() == [256, 256, 256, 232]
    assert widths.tolist() == [384, 384, 384, 348]
    # every tile in a grid row shares row bounds, every grid column shares col bounds
    assert (grid[:, :, 0] == grid[:, :1, 0]).all()
    assert (grid[:, :, 2] == grid[:1, :, 2]).all()


def test_generate_different_counts_per_axis():
    grid = generate_tiling_grid(0, 0, 100, 1000, 50, 100)
    assert grid.shape == (2, 10, 4)
    assert grid[1, 9].tolist() == [50, 100, 900, 1000]


def test_generate_with_offset_origin():
    grid = generate_tiling_grid(10, 20, 35, 41, 10, 7)
    assert grid.shape == (3, 3, 4)
    assert grid[:, 0, 0].tolist() == [10, 20, 30]
    assert grid[:, 0, 1].tolist() == [20, 30, 35]
    assert grid[0, :, 2].tolist() == [20, 27, 34]
    assert grid[0, :, 3].tolist() == [27, 34, 41]


def test_generate_single_tile_when_split_larger_than_extent():
    grid = generate_tiling_grid(0, 0, 10, 10, 100, 100)
    assert grid.tolist() == [[[0, 10, 0, 10]]]


def test_generate_exact_multiple_has_no_empty_tile():
    grid = generate_tiling_grid(0, 0, 512, 512, 256, 256)
    assert grid.shape == (2, 2, 4)
    assert grid[1, 1].tolist() == [256, 512, 256, 512]


def test_generate_float_inputs_give_float_grid():
    grid = generate_tiling_grid(100.0, 200.0, 150.5, 230.0, 20.0, 10)
    assert grid.dtype == np.float64
    assert grid.shape == (3, 3, 4)
    np.testing.assert_allclose(grid[2, 2], [140.0, 150.5, 220.0, 230.0])


def test_generate_numpy_integers_give_int_grid():
    grid = generate_tiling_grid(np.int32(0), 0, np.int64(10), 10, np.uint8(4), 5)
    assert grid.dtype == np.int64
    assert grid.shape == (3, 2, 4)


def test_generate_float_rounding_drops_empty_trailing_tile():
    # (1.0 - 0.7) / 0.1 == 3.0000000000000004 -> ceil gives 4, last one would be empty
    grid = generate_tiling_grid(0.7, 0.0, 1.0, 1.0, 0.1, 0.5)
    assert grid.shape[0] == 3
    assert (grid[:, :, 1] > grid[:, :, 0]).all()
    assert grid[-1, 0, 1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0, 10, 10, 0, 5), "tile size must be > 0"),
        ((0, 0, 10, 10, 5, -1), "tile size must be > 0"),
        ((0, 0, 0, 10, 5, 5), r"row_max \(0\) must be > row_min \(0\)"),
        ((0, 5, 10, 2, 5, 5), r"col_max \(2\) must be > col_min \(5\)"),
        ((0, 0, float("nan"), 10, 5, 5), "row_max must be finite"),
        ((0, 0, "10", 10, 5, 5), "row_max must be a real number"),
    ],
)
def test_generate_invalid_arguments(args, match):
    with pytest.raises(TilingError, match=match):
        generate_tiling_grid(*args)


def test_tiling_error_is_value_error():
    with pytest.raises(ValueError):
        generate_tiling_grid(0, 0, 10, 10, 0, 1)
    assert issubclass(MisalignedGridError, TilingError)
    assert issubclass(TilingError, ZarrOrchError)


# --- create_grid ------------------------------------------------------------------


def test_create_grid_non_square_and_overlaps():
    grid, overlaps = create_grid(1000, 1500, 256, 384, 10, 20)
    assert grid.shape == (4, 4, 4)
    assert overlaps.shape == (4, 4, 4)
    assert overlaps.dtype == np.int64
    assert grid[3, 3].tolist() == [768, 1000, 1152, 1500]
    assert overlaps[0, 0].tolist() == [0, 10, 0, 20]
    assert overlaps[1, 1].tolist() == [10, 10, 20, 20]
    assert overlaps[3, 3].tolist() == [10, 0, 20, 0]
    assert overlaps[0, 3].tolist() == [0, 10, 20, 0]
    # right overlap of every non-last column is the full overlap (CARS old bug: always 0)
    assert (overlaps[:, :-1, 3] == 20).all()
    assert (overlaps[:, -1, 3] == 0).all()
    assert (overlaps[-1, :, 1] == 0).all()


def test_create_grid_overlap_clipped_to_raster():
    # overlaps larger than tiles never go beyond the raster
    grid, overlaps = create_grid(30, 30, 10, 10, 15, 25)
    assert overlaps[1, 1].tolist() == [10, 10, 10, 10]
    assert overlaps[0, 1].tolist() == [0, 15, 10, 10]
    assert overlaps[2, 2].tolist() == [15, 0, 20, 0]
    expanded_min_row = grid[:, :, 0] - overlaps[:, :, 0]
    expanded_max_row = grid[:, :, 1] + overlaps[:, :, 1]
    expanded_min_col = grid[:, :, 2] - overlaps[:, :, 2]
    expanded_max_col = grid[:, :, 3] + overlaps[:, :, 3]
    assert expanded_min_row.min() >= 0 and expanded_min_col.min() >= 0
    assert expanded_max_row.max() <= 30 and expanded_max_col.max() <= 30


def test_create_grid_zero_overlap_default():
    grid, overlaps = create_grid(5, 7, 2, 3)
    assert grid.shape == (3, 3, 4)
    assert not overlaps.any()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 10, 5, 5, 0, 0), "raster size must be > 0"),
        ((10, 10, 5, 5, -1, 0), "overlaps must be >= 0"),
        ((10.0, 10, 5, 5, 0, 0), "nb_rows must be an integer"),
        ((10, 10, 0, 5, 0, 0), "tile size must be > 0"),
    ],
)
def test_create_grid_invalid(args, match):
    with pytest.raises(TilingError, match=match):
        create_grid(*args)


# --- window / overlap conversions --------------------------------------------------


def test_window_array_to_dict_python_ints():
    window = window_array_to_dict(np.array([1, 5, 2, 9], dtype=np.int64))
    assert window == {"row_min": 1, "row_max": 5, "col_min": 2, "col_max": 9}
    assert all(type(v) is int for v in window.values())


def test_window_array_to_dict_with_overlap_expands():
    window = window_array_to_dict([10, 20, 30, 40], overlap=np.array([1, 2, 3, 4]))
    assert window == {"row_min": 9, "row_max": 22, "col_min": 27, "col_max": 44}


def test_window_array_to_dict_float_values():
    window = window_array_to_dict(np.array([0.0, 2.5, 1.0, 3.0]))
    assert window == {"row_min": 0, "row_max": 2.5, "col_min": 1, "col_max": 3}
    assert type(window["row_min"]) is int
    assert type(window["row_max"]) is float


def test_window_array_to_dict_wrong_length():
    with pytest.raises(TilingError, match="exactly 4 values"):
        window_array_to_dict([1, 2, 3])
    with pytest.raises(TilingError, match="got a dict"):
        window_array_to_dict({"row_min": 0})


def test_window_dict_roundtrip():
    arr = np.array([3, 7, 11, 13])
    back = window_dict_to_array(window_array_to_dict(arr))
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, arr)


def test_window_dict_to_array_errors():
    with pytest.raises(TilingError, match="window is None"):
        window_dict_to_array(None)
    with pytest.raises(TilingError, match=r"missing keys \['col_max'\]"):
        window_dict_to_array({"row_min": 0, "row_max": 1, "col_min": 0})


def test_window_dict_to_array_float():
    arr = window_dict_to_array({"row_min": 0.5, "row_max": 1, "col_min": 0, "col_max": 2})
    assert arr.dtype == np.float64
    assert arr.tolist() == [0.5, 1.0, 0.0, 2.0]


def test_overlap_conversions():
    ov = overlap_array_to_dict(np.array([1, 2, 3, 4], dtype=np.int32))
    assert ov == {"up": 1, "down": 2, "left": 3, "right": 4}
    assert all(type(v) is int for v in ov.values())
    np.testing.assert_array_equal(overlap_dict_to_array(ov), [1, 2, 3, 4])
    assert overlap_dict_to_array(ov).dtype == np.int64


def test_overlap_dict_to_array_none_is_zeros():
    arr = overlap_dict_to_array(None)
    assert arr.tolist() == [0, 0, 0, 0]
    assert arr.dtype == np.int64


def test_overlap_dict_to_array_missing_key():
    with pytest.raises(TilingError, match=r"overlap dict is missing keys \['right'\]"):
        overlap_dict_to_array({"up": 0, "down": 0, "left": 0})


# --- grid_extent ------------------------------------------------------------------


def test_grid_extent():
    grid = generate_tiling_grid(0, 0, 1000, 1500, 256, 384)
    assert grid_extent(grid) == (1000, 1500)
    assert all(type(v) is int for v in grid_extent(grid))
    assert grid_extent(np.array([[[0.0, 2.5, 0.0, 3.0]]])) == (3, 3)


def test_grid_extent_bad_shape():
    with pytest.raises(TilingError, match=r"shape \[nb_rows, nb_cols, 4\]"):
        grid_extent(np.zeros((2, 2, 3)))


# --- regular_chunk_shape ------------------------------------------------------------


def test_regular_chunk_shape_non_square():
    grid = generate_tiling_grid(0, 0, 1000, 1500, 256, 384)
    assert regular_chunk_shape(grid) == (256, 384)
    assert regular_chunk_shape(grid, extent=(1000, 1500)) == (256, 384)
    shape = regular_chunk_shape(grid)
    assert all(type(v) is int for v in shape)


def test_regular_chunk_shape_float_integral_grid_ok():
    grid = generate_tiling_grid(0, 0, 100, 100, 30, 30).astype(np.float64)
    assert regular_chunk_shape(grid) == (30, 30)


def test_regular_chunk_shape_single_tile_and_offset_subregion():
    assert regular_chunk_shape(np.array([[[0, 7, 0, 9]]])) == (7, 9)
    # a sub-region starting on a chunk boundary is allowed
    grid = generate_tiling_grid(256, 512, 768, 1024, 256, 256)
    assert regular_chunk_shape(grid, extent=(1000, 2000)) == (256, 256)


def test_regular_chunk_shape_origin_not_multiple():
    grid = generate_tiling_grid(10, 0, 100, 100, 30, 30)
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid)
    msg = str(err.value)
    assert "tile (row=0, col=0)" in msg
    assert "row_min is not a multiple of the chunk height 30" in msg
    assert "Expected chunk shape (30, 30)" in msg
    assert "generate_tiling_grid" in msg


def test_regular_chunk_shape_smaller_middle_tile_names_tile():
    grid = generate_tiling_grid(0, 0, 100, 100, 25, 25)
    # shrink grid column 2 by moving its boundary with column 3
    grid[:, 2, 3] -= 5
    grid[:, 3, 2] -= 5
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid)
    msg = str(err.value)
    assert "tile (row=0, col=2)" in msg
    assert "width 20 != chunk width 25" in msg
    assert "only the last column may be smaller" in msg
    assert "row_min=0, row_max=25, col_min=50, col_max=70" in msg


def test_regular_chunk_shape_smaller_last_row_must_reach_extent():
    grid = generate_tiling_grid(0, 0, 90, 100, 25, 50)
    assert regular_chunk_shape(grid) == (25, 50)
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid, extent=(100, 100))
    msg = str(err.value)
    assert "tile (row=3, col=0)" in msg
    assert "smaller last-row tile (height 15)" in msg
    assert "array height 100" in msg


def test_regular_chunk_shape_smaller_last_col_must_reach_extent():
    grid = generate_tiling_grid(0, 0, 100, 90, 50, 25)
    with pytest.raises(MisalignedGridError, match=r"tile \(row=0, col=3\).*last-column"):
        regular_chunk_shape(grid, extent=(100, 100))


def test_regular_chunk_shape_beyond_extent():
    grid = generate_tiling_grid(0, 0, 100, 100, 50, 50)
    with pytest.raises(MisalignedGridError, match=r"tile \(row=1, col=0\).*beyond the array"):
        regular_chunk_shape(grid, extent=(80, 100))


def test_regular_chunk_shape_gap_between_rows():
    grid = generate_tiling_grid(0, 0, 100, 100, 25, 25)
    grid[2:, :, 0:2] += 25  # rows 2..3 shifted down: gap after row 1
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid)
    assert "tile (row=2, col=0)" in str(err.value)
    assert "rows must be contiguous" in str(err.value)


def test_regular_chunk_shape_unshared_row_bounds():
    grid = generate_tiling_grid(0, 0, 100, 100, 25, 25)
    grid[1, 2, 1] = 45
    with pytest.raises(MisalignedGridError, match=r"tile \(row=1, col=2\).*share row_min/row_max"):
        regular_chunk_shape(grid)


def _cars_swapped_grid(nb_row, nb_col, row_split, col_split):
    """Grid as built by CARS's buggy CarsDataset.create_grid (splits swapped)."""
    nb_col_splits = -(-nb_col // row_split)
    nb_row_splits = -(-nb_row // col_split)
    grid = np.zeros((nb_row_splits, nb_col_splits, 4), dtype=np.int64)
    for i in range(nb_row_splits):
        for j in range(nb_col_splits):
            grid[i, j] = [
                row_split * i,
                min(nb_row, (i + 1) * row_split),
                col_split * j,
                min(nb_col, (j + 1) * col_split),
            ]
    return grid


def test_regular_chunk_shape_cars_swapped_grid_detected():
    grid = _cars_swapped_grid(1000, 1500, 256, 384)
    assert grid.shape == (3, 6, 4)  # CARS bug: should be (4, 4)
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid, extent=(1000, 1500))
    msg = str(err.value)
    assert "tile (row=0, col=3)" in msg
    assert "width 348 != chunk width 384" in msg
    assert "Expected chunk shape (256, 384)" in msg
    assert "array of extent (1000, 1500)" in msg


def test_regular_chunk_shape_non_integral():
    grid = generate_tiling_grid(0.0, 0.0, 10.0, 10.0, 2.5, 5.0)
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid)
    assert "tile (row=0, col=0)" in str(err.value)
    assert "non-integral" in str(err.value)


def test_regular_chunk_shape_empty_first_tile():
    grid = np.array([[[0, 0, 0, 10]]])
    with pytest.raises(MisalignedGridError, match="empty window"):
        regular_chunk_shape(grid)


def test_regular_chunk_shape_bad_extent():
    grid = generate_tiling_grid(0, 0, 10, 10, 5, 5)
    with pytest.raises(TilingError, match="extent must be"):
        regular_chunk_shape(grid, extent=(10,))
    with pytest.raises(TilingError, match="extent must be"):
        regular_chunk_shape(grid, extent=(10.5, 10))


def test_regular_chunk_shape_bad_grid_shape():
    with pytest.raises(TilingError, match="shape"):
        regular_chunk_shape(np.zeros((4, 4)))
    with pytest.raises(TilingError, match="no tile"):
        regular_chunk_shape(np.zeros((0, 3, 4)))


def test_regular_chunk_shape_reports_first_bad_tile_in_row_major_order():
    grid = generate_tiling_grid(0, 0, 1000, 1000, 100, 100)
    grid[7, 3:, 1] += 1
    grid[4, 8, 3] -= 1
    with pytest.raises(MisalignedGridError) as err:
        regular_chunk_shape(grid)
    assert "tile (row=4, col=8)" in str(err.value)


def test_regular_chunk_shape_is_vectorised_on_large_grids():
    grid = generate_tiling_grid(0, 0, 400 * 64, 250 * 64 - 10, 64, 64)
    assert grid.shape[0] * grid.shape[1] == 100_000
    start = time.perf_counter()
    assert regular_chunk_shape(grid) == (64, 64)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    grid[-1, -1, 2] += 1
    with pytest.raises(MisalignedGridError, match=r"tile \(row=399, col=249\)"):
        regular_chunk_shape(grid)
