"""Datasets without final_function whose tiles follow no chunk grid (CARS's dsm_merging,
sensors_subsampling): merged by the main process, equal to CARS's saver in every mode.

- a tiling grid in terrain metres is no chunk grid: windowed from the start;
- a pixel grid whose tiles carry other windows (a subsampled raster on a full-resolution
  grid) is found at the first tile and switched to windowed, once, for good;
- a dataset mixing both kinds of tiles is refused, tile by tile, with what to change.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest
import zarr
from windowed_tasks import TAGS, profile, windowed_tile

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator
from zarr_orch.data.tiling import generate_tiling_grid
from zarr_orch.storage.readers.verify import verify_product

MODES = ["sequential", "multiprocessing"]


def conf(mode: str) -> dict[str, Any]:
    """No retries (failures are the point of some tests); 2 workers in multiprocessing."""
    base = {"mode": mode, "progress": False, "max_retries": 0}
    return {**base, "nb_workers": 2} if mode == "multiprocessing" else base


def pasted(windows: list[dict[str, int] | None], height: int, width: int) -> dict[str, Any]:
    """CARS's sequential saver: each tile's values pasted at its window, in tile order."""
    arrays = {t: np.full((height, width), nd, dtype=dt) for t, (dt, nd) in TAGS.items()}
    prof = profile(height, width)
    for index, window in enumerate(windows):
        info = {"cars_ds_key": 0, "cars_ds_row": 0, "cars_ds_col": index}
        tile = windowed_tile(index, info, prof, window=window)
        w = window or {"row_min": 0, "row_max": height, "col_min": 0, "col_max": width}
        box = (slice(w["row_min"], w["row_max"]), slice(w["col_min"], w["col_max"]))
        for tag, (dtype, _) in TAGS.items():
            arrays[tag][box] = tile[tag].values.astype(dtype)
    return arrays


def register(
    orch: Orchestrator,
    grid: np.ndarray,
    windows: list[dict[str, int] | None],
    height: int,
    width: int,
    name: str = "layered.zarr",
) -> CarsDataset:
    """One dataset on `grid` (cells in row-major order) whose tile i has window i."""
    cds = CarsDataset("arrays", name="layered")
    cds.tiling_grid = grid
    for tag, (dtype, nodata) in TAGS.items():
        orch.add_to_save_lists(name, tag, cds, dtype=dtype, nodata=nodata)
    [info] = orch.get_saving_infos([cds])
    cols = grid.shape[1]
    for index, window in enumerate(windows):
        row, col = divmod(index, cols)
        cds[row, col] = orch.cluster.create_task(windowed_tile)(
            index,
            zo.update_saving_infos(info, row=row, col=col),
            profile(height, width),
            0.0,
            window,
        )
    return cds


def stored(path: Any) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {tag: group[tag][...] for tag in TAGS}


def assert_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for tag in TAGS:
        np.testing.assert_array_equal(got[tag], want[tag], err_msg=tag)


def half_resolution(rows: int, cols: int, side: int) -> list[dict[str, int]]:
    """Windows of a raster subsampled by 2 on a full-resolution grid of side x side cells."""
    half = side // 2
    return [
        {
            "row_min": r * half,
            "row_max": (r + 1) * half,
            "col_min": c * half,
            "col_max": (c + 1) * half,
        }
        for r in range(rows)
        for c in range(cols)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_grid_in_terrain_metres_is_merged_like_cars(out_dir, mode):
    """dsm_merging's grid: terrain metres, not pixels; each task computes its pixel window."""
    height, width = 48, 80
    grid = generate_tiling_grid(4800000.0 - 24.0, 600000.0, 4800000.0, 600040.0, 12.0, 20.0)
    assert grid.dtype.kind == "f" and grid.shape[:2] == (2, 2)
    windows = [
        {"row_min": r * 24, "row_max": (r + 1) * 24, "col_min": c * 40, "col_max": (c + 1) * 40}
        for r in range(2)
        for c in range(2)
    ]
    with Orchestrator(conf(mode), out_dir=out_dir) as orch:
        register(orch, grid, windows, height, width)
        orch.breakpoint()
    assert_arrays(stored(out_dir / "layered.zarr"), pasted(windows, height, width))
    info = zarr.open_group(str(out_dir / "layered.zarr"), mode="r").attrs["zarr_orch"]
    assert info["windowed"] is True
    assert verify_product(str(out_dir / "layered.zarr")).ok


@pytest.mark.parametrize("mode", MODES)
def test_subsampled_windows_on_a_pixel_grid_switch_to_the_main_process(out_dir, mode, caplog):
    """sensors_subsampling's layout: a chunk grid of 32 px whose tiles are 16 px windows of
    the half-resolution raster. Found at the first tile, merged by the main process."""
    caplog.set_level(logging.INFO, logger="zarr_orch")
    grid = generate_tiling_grid(0, 0, 96, 128, 32, 32)  # 3 x 4 cells of the full raster
    windows = half_resolution(3, 4, 32)
    with Orchestrator(conf(mode), out_dir=out_dir) as orch:
        register(orch, grid, windows, 48, 64)
        orch.breakpoint()
    assert_arrays(stored(out_dir / "layered.zarr"), pasted(windows, 48, 64))
    info = zarr.open_group(str(out_dir / "layered.zarr"), mode="r").attrs["zarr_orch"]
    assert info["windowed"] is True
    [fingerprint] = info["fingerprints"].values()
    assert fingerprint["components"]["windowed"] is True
    assert verify_product(str(out_dir / "layered.zarr")).ok
    assert any("merged by the main process" in r.getMessage() for r in caplog.records)
    first = stored(out_dir / "layered.zarr")
    # the rerun knows the product is windowed: everything resumed, nothing merged twice
    with Orchestrator(conf(mode), out_dir=out_dir) as orch:
        register(orch, grid, windows, 48, 64)
        orch.breakpoint()
    stats = json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert (stats["tiles"], stats["resumed"]) == (0, 12)
    assert_arrays(stored(out_dir / "layered.zarr"), first)


def failing_after(index: int, saving_info: dict, prof: dict, window: Any, fail_from: int) -> Any:
    """windowed_tile over `window`, failing from tile `fail_from` on (an interrupted run)."""
    if index >= fail_from:
        raise ValueError(f"tile {index} fails")
    return windowed_tile(index, saving_info, prof, window=window)


def test_a_switched_dataset_resumes_its_missing_tiles_only(out_dir):
    """Killed half-way (here: tiles failing), the rerun merges in the main process from the
    start (the product says windowed) and computes only the missing tiles."""
    grid = generate_tiling_grid(0, 0, 64, 128, 32, 32)  # 2 x 4
    windows = half_resolution(2, 4, 32)

    def run(fail_from: int) -> None:
        with Orchestrator(conf("sequential"), out_dir=out_dir) as orch:
            cds = CarsDataset("arrays", name="layered")
            cds.tiling_grid = grid
            for tag, (dtype, nodata) in TAGS.items():
                orch.add_to_save_lists("layered.zarr", tag, cds, dtype=dtype, nodata=nodata)
            [info] = orch.get_saving_infos([cds])
            for index, window in enumerate(windows):
                row, col = divmod(index, 4)
                cds[row, col] = orch.cluster.create_task(failing_after)(
                    index,
                    zo.update_saving_infos(info, row=row, col=col),
                    profile(32, 64),
                    window,
                    fail_from,
                )
            orch.breakpoint()

    with pytest.raises(zo.TaskFailedError):
        run(fail_from=5)
    run(fail_from=1 << 20)
    stats = json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert (stats["tiles"], stats["resumed"]) == (3, 5)
    assert_arrays(stored(out_dir / "layered.zarr"), pasted(windows, 32, 64))


def test_tiles_mixing_both_layouts_are_refused(out_dir):
    """Tile 0 is one chunk of the grid (written by its worker); tile 1 carries a window of
    its own: refused with what to change, tile 0 kept, nothing else written."""
    grid = generate_tiling_grid(0, 0, 32, 64, 32, 32)  # 1 x 2 cells
    windows = [
        {"row_min": 0, "row_max": 32, "col_min": 0, "col_max": 32},  # its chunk
        {"row_min": 0, "row_max": 16, "col_min": 40, "col_max": 56},  # not a chunk
    ]
    with Orchestrator(conf("sequential"), out_dir=out_dir) as orch:
        register(orch, grid, windows, 32, 64)
        with pytest.raises(zo.TaskFailedError) as err:
            orch.breakpoint()
    text = str(err.value)
    assert "task for tile (row=0, col=1) of layered failed" in text
    assert "must all follow its tiling grid or all carry windows of their own" in text
    assert "1 tile(s) finished and are kept on disk" in text
    want = pasted(windows[:1], 32, 64)
    want["val"] = np.where(np.isnan(want["val"]), TAGS["val"][1], want["val"])  # grid path
    assert_arrays(stored(out_dir / "layered.zarr"), want)
    info = zarr.open_group(str(out_dir / "layered.zarr"), mode="r").attrs["zarr_orch"]
    assert info["windowed"] is False  # still a grid product: verify checks its chunks
    assert verify_product(str(out_dir / "layered.zarr")).ok


def test_a_window_outside_the_raster_still_fails_its_tile(out_dir):
    """Being merged by the main process does not relax the checks: a window past the
    raster fails its tile, the others are kept."""
    grid = generate_tiling_grid(0, 0, 64, 64, 32, 32)  # 2 x 2
    windows = half_resolution(2, 2, 32)
    windows[3] = {"row_min": 16, "row_max": 40, "col_min": 16, "col_max": 32}
    with Orchestrator(conf("sequential"), out_dir=out_dir) as orch:
        register(orch, grid, windows, 32, 32)
        with pytest.raises(zo.TaskFailedError) as err:
            orch.breakpoint()
    text = str(err.value)
    assert "tile (row=1, col=1) of layered" in text and "outside the 32x32 raster" in text
    assert_arrays(stored(out_dir / "layered.zarr"), pasted(windows[:3], 32, 32))
