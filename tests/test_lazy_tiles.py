"""Done replaced tiles come back lazily on a rerun: nothing is read until a tile is used.

A two-stage pipeline (stage 1 saved and replaced, a breakpoint, stage 2 consuming stage 1's
tiles) is run, then rerun: the rerun executes no task and reads no chunk of stage 1 until
a cell is used, and the cells are the Datasets the first run had. Missing stage-2 tiles
consume lazy stage-1 tiles in the worker; damage after the breakpoint is a clear error.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from zarr_orch import CarsDataset, Orchestrator, fill_dataset, update_saving_infos
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.errors import TaskFailedError
from zarr_orch.storage.format.records import META_GROUP
from zarr_orch.storage.format.tile_descriptions import decode_exact, encode_exact
from zarr_orch.storage.readers import tile_store
from zarr_orch.storage.readers.tile_store import StoredTileError
from zarr_orch.storage.readers.verify import verify_run

H, W, TILE, OVERLAP = 96, 128, 32, 2
CELLS = [(r, c) for r in range(H // TILE) for c in range(W // TILE)]
PROFILE = {
    "crs": "EPSG:32631",
    "height": H,
    "width": W,
    "transform": (10.0, 0.0, 600000.0, 0.0, -10.0, 4800000.0),
}


# -- task functions (module level: worker processes import them by name) ------------------------


def _count(counter: str, stage: str, row: int, col: int) -> None:
    """Drop one file per task execution, so tests count executions across processes."""
    Path(counter, f"{stage}_{row}_{col}_{os.getpid()}_{os.urandom(4).hex()}").touch()


def stage1_task(window, overlaps, saving_info, counter, options):
    """A float field with NaNs and a uint8 mask, with coords and attrs of several types."""
    row, col = saving_info["cars_ds_row"], saving_info["cars_ds_col"]
    _count(counter, "s1", row, col)
    rows = np.arange(window["row_min"] - overlaps["up"], window["row_max"] + overlaps["down"])
    cols = np.arange(window["col_min"] - overlaps["left"], window["col_max"] + overlaps["right"])
    r, c = rows[:, None].astype("float64"), cols[None, :].astype("float64")
    values = (np.sin(r / 9.0) * np.cos(c / 13.0) * 40 + (r * 31 + c * 17) % 23).astype("float32")
    values[(rows % 17 == 3)[:, None] & (cols % 13 == 5)[None, :]] = np.nan
    if [row, col] in options.get("inconsistent", []):
        # overlap margins that differ from the neighbours' cores (e.g. an edge effect)
        core = (slice(overlaps["up"], len(rows) - overlaps["down"]),)
        core += (slice(overlaps["left"], len(cols) - overlaps["right"]),)
        shifted = values + np.float32(0.5)
        shifted[core] = values[core]
        values = shifted
    mask = (np.nan_to_num(values) > 20).astype("uint8")
    tile = xr.Dataset(
        {"v": (("row", "col"), values), "m": (("row", "col"), mask)},
        coords={"row": rows.astype("float64"), "col": cols.astype("float64")},
    )
    attributes = {"scale": np.float32(0.5), "bands": ("a", "b"), "levels": [np.int64(1), 2]}
    if options.get("lossy"):
        attributes["when"] = datetime.date(2024, 1, 1)  # JSON cannot carry it back
    return fill_dataset(
        tile,
        saving_info=saving_info,
        window=window,
        overlaps=overlaps,
        profile=PROFILE,
        attributes=attributes,
    )


def stage2_task(tile1, saving_info, counter, fail_marker):
    """3x3 mean of stage 1's "v" (only that variable is used); fails while the marker exists."""
    row, col = saving_info["cars_ds_row"], saving_info["cars_ds_col"]
    _count(counter, "s2", row, col)
    if fail_marker and os.path.exists(fail_marker) and (row, col) in ((0, 1), (2, 3)):
        raise RuntimeError(f"stage 2 input of tile ({row}, {col}) is unavailable")
    ov, window = tile1.attrs["overlaps"], tile1.attrs["window"]
    pad = [
        (int(ov["up"] == 0), int(ov["down"] == 0)),
        (int(ov["left"] == 0), int(ov["right"] == 0)),
    ]
    data = np.pad(np.nan_to_num(tile1["v"].values), pad, mode="edge")
    h = window["row_max"] - window["row_min"]
    w = window["col_max"] - window["col_min"]
    top, left = ov["up"] - 1 + pad[0][0], ov["left"] - 1 + pad[1][0]
    acc = np.zeros((h, w))
    for dr in range(3):
        for dc in range(3):
            acc += data[top + dr : top + dr + h, left + dc : left + dc + w]
    out = xr.Dataset({"mean": (("row", "col"), (acc / 9).astype("float32"))})
    no_overlaps = {"up": 0, "down": 0, "left": 0, "right": 0}
    return fill_dataset(out, saving_info=saving_info, window=window, overlaps=no_overlaps)


# -- the pipeline ----------------------------------------------------------------------------


def pipeline(out, mode, counter, fail_marker=None, hook=None, **options):
    """Run both stages; return stage 1's CarsDataset. `hook(s1)` runs between the stages."""
    Path(counter).mkdir(parents=True, exist_ok=True)
    conf = {"mode": mode, "max_retries": 0, "progress": False}
    if mode != "sequential":
        conf["nb_workers"] = 2
    with Orchestrator(conf, out_dir=str(out)) as orch:
        s1 = CarsDataset("arrays", name="stage1")
        s1.create_grid(W, H, TILE, TILE, OVERLAP, OVERLAP)
        orch.add_to_save_lists("stage1.tif", "v", s1, dtype="float32", nodata=-9999)
        orch.add_to_save_lists("stage1.tif", "m", s1, dtype="uint8", nodata=255)
        orch.add_to_replace_lists(s1)
        [info1] = orch.get_saving_infos([s1])
        task1 = orch.cluster.create_task(stage1_task)
        for r, c in CELLS:
            s1[r, c] = task1(
                window_array_to_dict(s1.tiling_grid[r, c]),
                overlap_array_to_dict(s1.overlaps[r, c]),
                update_saving_infos(info1, row=r, col=c),
                str(counter),
                options,
            )
        orch.breakpoint()
        if hook is not None:
            hook(s1)
        s2 = CarsDataset("arrays", name="stage2")
        s2.create_empty_copy(s1)
        orch.add_to_save_lists("stage2.tif", "mean", s2, dtype="float32", nodata=-9999)
        [info2] = orch.get_saving_infos([s2])
        task2 = orch.cluster.create_task(stage2_task)
        for r, c in CELLS:
            s2[r, c] = task2(
                s1[r, c], update_saving_infos(info2, row=r, col=c), str(counter), fail_marker
            )
        orch.breakpoint()
    return s1


def executed(counter: Path) -> dict[str, int]:
    """How many stage-1 and stage-2 tasks ran."""
    names = [p.name for p in Path(counter).iterdir()] if Path(counter).exists() else []
    return {stage: sum(n.startswith(stage + "_") for n in names) for stage in ("s1", "s2")}


def products(out: Path) -> dict[str, tuple[str, bytes]]:
    """Every data array of both products, as (dtype, raw bytes): byte-exact comparisons."""
    arrays = {}
    for name in ("stage1.zarr", "stage2.zarr"):
        group = zarr.open_group(str(out / name), mode="r")
        for key in sorted(group.array_keys()):
            values = group[key][...]
            arrays[f"{name}/{key}"] = (str(values.dtype), values.tobytes())
    return arrays


def snapshot(s1: CarsDataset) -> dict[tuple[int, int], xr.Dataset]:
    return {(r, c): s1[r, c].copy(deep=True) for r, c in CELLS}


def descriptions(out: Path) -> zarr.Array:
    meta = zarr.open_group(str(out / "stage1.zarr"), mode="r+")[META_GROUP]
    [name] = [n for n in meta.array_keys() if n.endswith("_tiles")]
    return meta[name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict]:
    """Products and stage-1 cells of one uninterrupted sequential run."""
    base = tmp_path_factory.mktemp("reference")
    cells = {}
    pipeline(base / "out", "sequential", base / "count", hook=lambda s1: cells.update(snapshot(s1)))
    return products(base / "out"), cells


@pytest.fixture(autouse=True)
def _reset_reads():
    tile_store.READS.clear()


def assert_same_tile(got: xr.Dataset, want: xr.Dataset) -> None:
    assert isinstance(got, xr.Dataset)
    assert got.identical(want)
    assert got.attrs == want.attrs  # nested types too (tuples stay tuples)
    for name in want.data_vars:
        assert got[name].dtype == want[name].dtype
        assert got[name].values.tobytes() == want[name].values.tobytes()


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sequential", "multiprocessing"])
def test_rerun_of_finished_job_executes_and_reads_nothing(tmp_path, mode, reference):
    want_products, want_cells = reference
    out = tmp_path / "out"
    pipeline(out, mode, tmp_path / "c1")
    assert executed(tmp_path / "c1") == {"s1": len(CELLS), "s2": len(CELLS)}
    tile_store.READS.clear()

    seen: dict = {}

    def look(s1):
        seen["reads_at_breakpoint"] = dict(tile_store.READS)
        seen["pickled"] = len(pickle.dumps(s1[1, 1]))
        seen["s1"] = s1

    pipeline(out, mode, tmp_path / "c2", hook=look)
    assert executed(tmp_path / "c2") == {"s1": 0, "s2": 0}
    assert seen["reads_at_breakpoint"] == {}  # decided from descriptions: no chunk read
    assert tile_store.READS["lazy"] == 0 and tile_store.READS["eager"] == 0
    assert seen["pickled"] < 4096  # a reference to the store, not the tile's data
    assert products(out) == want_products

    s1 = seen["s1"]
    first = s1[1, 2]
    assert first.attrs["profile"]["transform"] == PROFILE["transform"]  # attrs need no read
    assert tile_store.READS["lazy"] == 0
    assert_same_tile(first, want_cells[(1, 2)])
    assert tile_store.READS["lazy"] == 2  # its two variables, once each
    assert_same_tile(first, want_cells[(1, 2)])
    assert tile_store.READS["lazy"] == 2  # read once, then kept
    for r, line in enumerate(s1.tiles):  # iterating the cells gives the same Datasets
        for c, tile in enumerate(line):
            assert_same_tile(tile, want_cells[(r, c)])
    # a lazy tile behaves like an in-memory one, in-place changes included
    tile = s1[0, 0]
    tile["v"].values[0, 0] = 123.0
    assert tile["v"].values[0, 0] == 123.0


@pytest.mark.parametrize("mode", ["sequential", "multiprocessing"])
def test_missing_stage2_tiles_consume_lazy_stage1_tiles(tmp_path, mode, reference):
    want_products, _ = reference
    out, marker = tmp_path / "out", tmp_path / "FAIL"
    marker.touch()
    with pytest.raises(TaskFailedError, match="stage 2 input"):
        pipeline(out, mode, tmp_path / "c1", fail_marker=str(marker))
    marker.unlink()
    tile_store.READS.clear()
    pipeline(out, mode, tmp_path / "c2", fail_marker=str(marker))
    assert executed(tmp_path / "c2") == {"s1": 0, "s2": 2}
    if mode == "sequential":  # read in this process: only "v" of the two tiles used
        assert tile_store.READS == {"lazy": 2}
    else:  # read by the workers that ran stage 2
        assert tile_store.READS["lazy"] == 0
    assert products(out) == want_products


def test_damaged_chunk_after_breakpoint_raises_a_clear_error(tmp_path, reference):
    out = tmp_path / "out"
    pipeline(out, "sequential", tmp_path / "c1")
    errors = []

    def damage(s1):
        array = zarr.open_array(str(out / "stage1.zarr" / "v"), mode="r+")
        array[TILE + 5, TILE + 5] = 1e6  # a valid chunk with the wrong values
        chunk = out / "stage1.zarr" / "m" / "c" / "2" / "3"
        chunk.write_bytes(b"\x00garbage" * 16)  # an undecodable chunk
        for cell, var in (((1, 1), "v"), ((2, 3), "m")):
            with pytest.raises(StoredTileError) as info:
                _ = s1[cell][var].values
            errors.append(str(info.value))
        _ = s1[0, 0]["v"].values  # untouched tiles still load

    pipeline(out, "sequential", tmp_path / "c2", hook=damage)
    assert len(errors) == 2
    product = str(out / "stage1.zarr")
    for error, (r, c) in zip(errors, [(1, 1), (2, 3)], strict=True):
        assert f"tile (row={r}, col={c}) of stage1" in error
        assert product in error
        assert f"zarr-orch verify --repair {product}" in error


def test_damage_seen_by_a_worker_fails_the_task_and_repair_recovers(tmp_path, reference):
    want_products, _ = reference
    out, marker = tmp_path / "out", tmp_path / "FAIL"
    marker.touch()
    with pytest.raises(TaskFailedError):
        pipeline(out, "multiprocessing", tmp_path / "c1", fail_marker=str(marker))
    marker.unlink()

    def damage(s1):
        array = zarr.open_array(str(out / "stage1.zarr" / "v"), mode="r+")
        array[5, TILE + 5] = 1e6  # core of stage-1 tile (0, 1), used by stage 2's (0, 1)

    with pytest.raises(TaskFailedError) as info:
        pipeline(out, "multiprocessing", tmp_path / "c2", fail_marker=str(marker), hook=damage)
    assert "tile (row=0, col=1) of stage1" in str(info.value)
    assert "zarr-orch verify --repair" in str(info.value)
    report = verify_run(str(out), repair=True)
    assert not report.ok
    pipeline(out, "multiprocessing", tmp_path / "c3")
    assert executed(tmp_path / "c3") == {"s1": 1, "s2": 1}
    assert products(out) == want_products


def test_tiles_whose_overlaps_differ_from_neighbours_are_recomputed(tmp_path):
    out = tmp_path / "out"
    cells = {}
    pipeline(
        out,
        "sequential",
        tmp_path / "c1",
        hook=lambda s1: cells.update(snapshot(s1)),
        inconsistent=[[1, 1]],
    )
    tile_store.READS.clear()
    seen = {}

    def look(s1):
        seen["reads"] = dict(tile_store.READS)
        seen["counts"] = executed(tmp_path / "c2")
        for cell in CELLS:
            assert_same_tile(s1[cell], cells[cell])

    pipeline(out, "sequential", tmp_path / "c2", hook=look, inconsistent=[[1, 1]])
    assert seen["reads"] == {}  # known from the descriptions, without reading any chunk
    assert seen["counts"] == {"s1": 1, "s2": 0}


def test_tiles_described_without_pieces_are_rebuilt_at_the_breakpoint(tmp_path, reference):
    _, want_cells = reference
    out = tmp_path / "out"
    pipeline(out, "sequential", tmp_path / "c1")
    array = descriptions(out)
    for r, c in CELLS:  # as an older writer left them
        desc = json.loads(str(array[r, c]))
        for entry in desc["variables"].values():
            entry.pop("pieces")
        array[r, c] = json.dumps(desc)
    tile_store.READS.clear()
    seen = {}

    def look(s1):
        seen["reads"] = dict(tile_store.READS)
        for cell in CELLS:
            assert_same_tile(s1[cell], want_cells[cell])

    pipeline(out, "sequential", tmp_path / "c2", hook=look)
    assert seen["reads"] == {"eager": len(CELLS)}
    assert executed(tmp_path / "c2") == {"s1": 0, "s2": 0}


def test_tiles_whose_attrs_json_cannot_carry_are_recomputed(tmp_path):
    out = tmp_path / "out"
    pipeline(out, "sequential", tmp_path / "c1", lossy=True)
    pipeline(out, "sequential", tmp_path / "c2", lossy=True)
    assert executed(tmp_path / "c2") == {"s1": len(CELLS), "s2": 0}


def test_saving_a_lazy_dataset_stores_its_data(tmp_path, reference):
    _, want_cells = reference
    out = tmp_path / "out"
    pipeline(out, "sequential", tmp_path / "c1")
    saved = tmp_path / "saved"
    pipeline(out, "sequential", tmp_path / "c2", hook=lambda s1: s1.save_cars_dataset(saved))
    (out / "stage1.zarr").rename(tmp_path / "moved.zarr")  # the saved tiles need no product
    loaded = CarsDataset("arrays", load_from_disk=saved)
    for cell in CELLS:
        assert_same_tile(loaded[cell], want_cells[cell])


def test_a_pickled_lazy_tile_loads_where_it_is_unpickled(tmp_path, reference):
    _, want_cells = reference
    out = tmp_path / "out"
    pipeline(out, "sequential", tmp_path / "c1")
    copies = []
    pipeline(out, "sequential", tmp_path / "c2", hook=lambda s1: copies.append(s1[2, 1]))
    clone = pickle.loads(pickle.dumps(copies[0]))
    assert tile_store.READS["lazy"] == 0
    assert_same_tile(clone, want_cells[(2, 1)])
    assert_same_tile(copies[0], want_cells[(2, 1)])


@pytest.mark.parametrize(
    "value",
    [
        {"a": (1, 2.5, "x"), "b": [np.int16(3), np.float32(0.1)], "c": None},
        {"__tuple__": 1, "__scalar__": 2, "dtype": "<f4"},  # look like our tags: kept as is
        {(1, 2): "tuple key", 3: [True, np.bool_(False)]},
        {"arr": np.arange(6, dtype="uint16").reshape(2, 3), "nan": float("nan")},
    ],
)
def test_attrs_come_back_with_their_types(value):
    back = decode_exact(json.loads(json.dumps(encode_exact(value))))
    assert repr(back) == repr(value)
    assert [type(v) for v in back.values()] == [type(v) for v in value.values()]
