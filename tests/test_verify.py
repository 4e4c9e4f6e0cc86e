"""Integrity checks: `verify_product` / `verify_run` find damaged tiles, and repair makes the
next run recompute exactly those tiles.

Damage is done by hand on disk (deleted, truncated, flipped chunks, garbled records), the way
a bad disk, an interrupted copy or a careless user would leave a product.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from app_tasks import (
    array_tile,
    arrays_dataset,
    constant_tile,
    dict_tile,
    full_field,
    points_tile,
    profile_for,
    schedule,
    schedule_cells,
)
from fault_tasks import negative_nan_tile

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator, generate_tiling_grid
from zarr_orch.storage.core.lease import LeaseError
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.readers.verify import verify_product, verify_run
from zarr_orch.storage.readers.verify_report import (
    MALFORMED,
    MISMATCH,
    MISSING_CHUNK,
    MISSING_GROUP,
    UNDECODABLE,
    VerifyReport,
)

H, W, TILE = 60, 90, (32, 48)  # 2x2 tiles, the last row and column are edge tiles
SEQ = {"mode": "sequential", "max_retries": 0, "progress": False}


def write(
    out_dir: Path,
    func=array_tile,
    *args,
    tags=("hgt",),
    name="ds",
    codec="zstd",
    nodata=-9999,
    **conf,
) -> Orchestrator:
    """Run the reference pipeline: tags of `func` tiles into out_dir/ds.zarr (float32)."""
    with Orchestrator(dict(SEQ, codec=codec, **conf), out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name=name)
        for tag in tags:
            orch.add_to_save_lists("ds.tif", tag, cds, dtype="float32", nodata=nodata)
        schedule(orch, cds, func, *(args or (profile_for(H, W),)))
    return orch


def product(out_dir: Path) -> Path:
    return out_dir / "ds.zarr"


def records_dir(out_dir: Path) -> Path:
    group = zarr.open_group(str(product(out_dir)), mode="r")
    return product(out_dir) / rec.META_GROUP / group.attrs["zarr_orch"]["records"][0]


def read_block(out_dir: Path) -> np.ndarray:
    """The one records block of the 2x2-tile product (tile row, tile col, field)."""
    raw = (records_dir(out_dir) / "c" / "0" / "0" / "0").read_bytes()
    return np.frombuffer(raw, dtype="<u8").reshape(2, 2, -1).copy()


def write_block(out_dir: Path, values: np.ndarray) -> None:
    (records_dir(out_dir) / "c" / "0" / "0" / "0").write_bytes(values.astype("<u8").tobytes())


def stored(out_dir: Path, tag: str = "hgt") -> np.ndarray:
    return zarr.open_group(str(product(out_dir)), mode="r")[tag][...]


def kinds(report: VerifyReport) -> list[tuple[int | None, int | None, str, str]]:
    return sorted(((b.row, b.col, b.tag, b.kind) for b in report.bad), key=repr)


# -- clean products -----------------------------------------------------------------------------


def test_clean_product_with_edge_tiles_3d_tag_and_unstored_nodata_tile(out_dir):
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        orch.add_to_save_lists("ds.tif", "bands", cds, dtype="int16", nodata=-1)
        orch.add_to_save_lists("ds.tif", "absent", cds, optional_data=True)
        schedule(orch, cds, array_tile, profile_for(H, W), bands=3)
        nodata = CarsDataset("arrays", name="empty")
        nodata.tiling_grid = cds.tiling_grid
        nodata.overlaps = cds.overlaps
        orch.add_to_save_lists("empty.tif", "hgt", nodata, dtype="uint8", nodata=7)
        schedule(orch, nodata, constant_tile, profile_for(H, W), 7.0)
    assert not os.path.exists(out_dir / "empty.zarr" / "hgt" / "c" / "0" / "0")  # all nodata
    report = verify_product(product(out_dir))
    assert report.ok and report.checked == 4 and report.bad == []
    assert "verified 4 tile record(s) in 1 product(s)" in str(report) and "all good" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True
    run = verify_run(out_dir)
    assert run.ok and run.checked == 8 and len(run.products) == 2


def test_all_nan_tiles_of_negative_nan_verify_clean(out_dir):
    """x86 computes 0/0 as a negative NaN; zarr stores no chunk for an all-NaN tile and
    reads it back as the canonical NaN, so the writer canonicalises NaNs before its CRC."""
    write(out_dir, negative_nan_tile, profile_for(H, W), nodata=float("nan"))
    assert not any((product(out_dir) / "hgt").rglob("c/*/*"))  # nothing stored: all fill
    report = verify_product(product(out_dir))
    assert report.ok, str(report)
    assert report.checked == 4


def test_record_of_an_older_writer_with_negative_nan_is_accepted(out_dir):
    write(out_dir, negative_nan_tile, profile_for(H, W), nodata=float("nan"))
    negative = np.full((32, 48), -np.nan, dtype="float32")
    raw = rec.record_bytes(negative.nbytes, [rec.checksum(negative)])
    block = read_block(out_dir)
    block[0, 0] = np.frombuffer(raw, dtype="<u8")
    write_block(out_dir, block)
    assert verify_product(product(out_dir)).ok


def test_points_and_dict_products_verify_clean_and_find_missing_tile_groups(out_dir):
    grid = generate_tiling_grid(0, 0, 2, 3, 1, 1)
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        points = CarsDataset("points", name="pc")
        points.tiling_grid = grid
        orch.add_to_save_lists("points.laz", "points", points, cars_ds_name="pc")
        schedule_cells(orch, points, points_tile, 5)
        pairs = CarsDataset("points", name="pairs")
        pairs.tiling_grid = grid
        orch.add_to_save_lists("pairs.laz", "points", pairs, save_points_cloud_by_pair=True)
        schedule_cells(orch, pairs, points_tile, 5, ["a", "b"])
        dicts = CarsDataset("dict", name="dc")
        dicts.tiling_grid = grid
        orch.add_to_save_lists("dicts", "dict", dicts)
        schedule_cells(orch, dicts, dict_tile, 2.0)
    report = verify_run(out_dir)
    assert report.ok, str(report)
    assert report.checked == 18 and len(report.products) == 3
    shutil.rmtree(out_dir / "points.zarr" / "tile_1_2")
    shutil.rmtree(out_dir / "dicts.zarr" / "tile_0_1")
    x = zarr.open_array(str(out_dir / "pairs.zarr" / "tile_0_0" / "a" / "x"), mode="r+")
    x[0] = 12345.0  # points data changed after their record
    report = verify_run(out_dir)
    assert sorted((Path(b.product).name, b.row, b.col, b.kind) for b in report.bad) == [
        ("dicts.zarr", 0, 1, MISSING_GROUP),
        ("pairs.zarr", 0, 0, MISMATCH),
        ("points.zarr", 1, 2, MISSING_GROUP),
    ]
    report = verify_run(out_dir, repair=True)
    assert len(report.repaired) == 3
    frame = zo.read_points(str(out_dir / "points.zarr"))
    assert len(frame) == 5 * 5  # the forgotten tile is no longer read back
    assert (1, 2) not in rec.done_tiles(
        zarr.storage.LocalStore(str(out_dir / "points.zarr")),
        zarr.open_group(str(out_dir / "points.zarr"), mode="r").attrs["zarr_orch"]["records"][0],
    )


def test_grid_not_starting_at_pixel_zero(out_dir):
    """Tile (0, 0) may start on any chunk boundary: tile (r, c) is then chunk (r+1, c+1)."""
    height, width = H + 32, W + 48
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = CarsDataset("arrays", name="ds")
        grid = np.array(arrays_dataset(H, W, TILE).tiling_grid)
        grid[..., :2] += 32
        grid[..., 2:] += 48
        cds.tiling_grid = grid
        cds.overlaps = np.zeros_like(grid)
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(height, width))
    assert zarr.open_group(str(product(out_dir)), mode="r").attrs["zarr_orch"]["grid_origin"] == [
        32,
        48,
    ]
    assert verify_product(product(out_dir)).ok
    os.remove(product(out_dir) / "hgt" / "c" / "1" / "1")  # chunk (1, 1) is tile (0, 0)
    assert kinds(verify_product(product(out_dir))) == [(0, 0, "hgt", MISSING_CHUNK)]


# -- damaged chunks ----------------------------------------------------------------------------


def test_deleted_chunk_is_found_repaired_and_recomputed_alone(out_dir):
    write(out_dir)
    os.remove(product(out_dir) / "hgt" / "c" / "1" / "0")
    report = verify_product(product(out_dir))
    assert not report.ok and report.checked == 4
    assert kinds(report) == [(1, 0, "hgt", MISSING_CHUNK)]
    assert "hgt/c/1/0 is absent but the record says data was written" in report.bad[0].problem
    assert "zarr-orch verify --repair" in str(report)
    # a plain rerun trusts the records: the damage stays until the records are repaired
    assert write(out_dir)._stats["tiles"] == 0
    report = verify_product(product(out_dir), repair=True)
    assert report.repaired == [(str(product(out_dir)), 1, 0)]
    assert read_block(out_dir)[:, :, 0].tolist() == [[1, 1], [0, 1]]  # only (1, 0) forgotten
    orch = write(out_dir)
    assert orch._stats["tiles"] == 1 and orch._stats["resumed"] == 3
    assert verify_product(product(out_dir)).ok
    np.testing.assert_array_equal(stored(out_dir), full_field(H, W))


@pytest.mark.parametrize("cell", [(0, 0), (1, 1)], ids=["full_tile", "edge_tile"])
def test_truncated_chunk_is_undecodable_and_repaired(out_dir, cell):
    write(out_dir)
    chunk = product(out_dir) / "hgt" / "c" / str(cell[0]) / str(cell[1])
    chunk.write_bytes(chunk.read_bytes()[:20])
    report = verify_product(product(out_dir), repair=True)
    assert kinds(report) == [(*cell, "hgt", UNDECODABLE)]
    assert "cannot be decoded" in report.bad[0].problem
    assert write(out_dir)._stats["tiles"] == 1
    assert verify_product(product(out_dir)).ok
    np.testing.assert_array_equal(stored(out_dir), full_field(H, W))


def test_flipped_byte_of_an_uncompressed_chunk_is_a_mismatch(out_dir):
    write(out_dir, codec="none", checksum=False)  # no crc32c codec: only the record knows
    chunk = product(out_dir) / "hgt" / "c" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x40
    chunk.write_bytes(bytes(data))
    report = verify_product(product(out_dir))
    assert kinds(report) == [(0, 1, "hgt", MISMATCH)]
    assert "reads back with crc32 0x" in report.bad[0].problem
    assert "the record says 0x" in report.bad[0].problem


def test_flipped_byte_is_caught_by_the_chunk_checksum_on_any_read(out_dir):
    write(out_dir, codec="none", checksum=True)  # the crc32c codec is opt-in (format 2)
    chunk = product(out_dir) / "hgt" / "c" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x40
    chunk.write_bytes(bytes(data))
    assert kinds(verify_product(product(out_dir))) == [(0, 1, "hgt", UNDECODABLE)]
    with pytest.raises(Exception, match="checksum"):  # a plain zarr read fails loudly too
        zarr.open_group(str(product(out_dir)), mode="r")["hgt"][...]


def test_flipped_byte_of_a_compressed_chunk_is_found(out_dir):
    write(out_dir)
    chunk = product(out_dir) / "hgt" / "c" / "1" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    [bad] = verify_product(product(out_dir)).bad
    assert (bad.row, bad.col, bad.tag) == (1, 1, "hgt")
    assert bad.kind in (MISMATCH, UNDECODABLE)  # zstd frames carry no checksum here


def test_only_the_damaged_tag_is_reported(out_dir):
    write(out_dir, array_tile, profile_for(H, W), ("a", "b"), tags=("a", "b"))
    os.remove(product(out_dir) / "b" / "c" / "0" / "0")
    assert kinds(verify_product(product(out_dir))) == [(0, 0, "b", MISSING_CHUNK)]


def test_intermediate_products_are_verified(out_dir):
    with Orchestrator(dict(SEQ, save_intermediate=True), out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="stage1")
        orch.add_to_replace_lists(cds)
        schedule(orch, cds, array_tile, profile_for(H, W), ("hgt", "msk"))
    inter = out_dir / "intermediate" / "stage1.zarr"
    report = verify_run(out_dir)
    assert report.ok and report.products == [str(inter)] and report.checked == 4
    zarr.open_array(str(inter / "msk"), mode="r+")[40, 50] = 1.5
    [bad] = verify_run(out_dir).bad
    assert (bad.row, bad.col, bad.tag, bad.kind) == (1, 1, "*", MISMATCH)
    assert "hgt, msk" in bad.problem


# -- damaged records -----------------------------------------------------------------------------


def test_malformed_records_are_reported_and_forgotten(out_dir):
    write(out_dir)
    records = records_dir(out_dir) / "c"
    block = read_block(out_dir)
    block[0, 0, 0] = 7  # a flag no writer sets
    block[0, 1, 0] = 0  # done flag cleared, the rest of the record kept
    write_block(out_dir, block)
    (records / "7" / "0").mkdir(parents=True)  # a block outside the 2x2 grid
    (records / "7" / "0" / "0").write_bytes((records / "0" / "0" / "0").read_bytes())
    (records / "junk").mkdir()
    (records / "junk" / "0").write_bytes(b"?")  # stray key
    report = verify_product(product(out_dir))
    problems = sorted((b.row, b.col, b.problem) for b in report.bad if b.row is not None)
    assert problems == [
        (0, 0, f"{MALFORMED}: done flag is 7, not 1"),
        (0, 1, f"{MALFORMED}: done flag is 0, not 1"),
    ]
    outside, stray = sorted(b.problem for b in report.bad if b.row is None)
    assert outside.startswith(f"{MALFORMED}: records block") and "c/7/0/0 lies outside" in outside
    assert stray.startswith(f"{MALFORMED}: stray key") and "junk/0" in stray
    assert report.checked == 6  # 2 bad records + 2 good ones + 2 bad keys
    verify_product(product(out_dir), repair=True)
    assert not (records / "junk" / "0").exists() and not (records / "7" / "0" / "0").exists()
    assert read_block(out_dir)[:, :, 0].tolist() == [[0, 0], [1, 1]]
    assert write(out_dir)._stats["tiles"] == 2  # (0, 0) and (0, 1) recomputed
    assert verify_product(product(out_dir)).ok


def test_a_truncated_records_block_is_dropped_and_its_tiles_recomputed(out_dir):
    write(out_dir)
    (records_dir(out_dir) / "c" / "0" / "0" / "0").write_bytes(b"\x01\x02")
    report = verify_product(product(out_dir))
    [bad] = report.bad
    assert bad.row is None and bad.kind == MALFORMED
    assert "c/0/0/0 has 2 bytes instead of 128" in bad.problem
    verify_product(product(out_dir), repair=True)
    assert not (records_dir(out_dir) / "c" / "0" / "0" / "0").exists()
    assert write(out_dir)._stats["tiles"] == 4
    assert verify_product(product(out_dir)).ok
    np.testing.assert_array_equal(stored(out_dir), full_field(H, W))


def test_garbled_records_metadata_is_a_product_level_problem(out_dir):
    write(out_dir)
    meta = records_dir(out_dir) / "records.json"  # format 2: records are plain objects
    content = json.loads(meta.read_text())
    content["fields"] = ["done"]
    meta.write_text(json.dumps(content))
    [bad] = verify_product(product(out_dir)).bad
    assert bad.row is None and bad.kind == MALFORMED
    assert "does not match its tags ['hgt']" in bad.problem


# -- runs ----------------------------------------------------------------------------------------


def test_verify_run_finds_products_outside_out_dir_and_skips_foreign_groups(out_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "abs.tif"
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="abs")
        orch.add_to_save_lists(str(elsewhere), "hgt", cds)
        schedule(orch, cds, array_tile, profile_for(H, W))
    zarr.open_group(str(out_dir / "foreign.zarr"), mode="w", zarr_format=3)
    report = verify_run(out_dir)
    assert report.ok and report.products == [str(tmp_path / "elsewhere" / "abs.zarr")]
    assert [Path(u).name for u, _ in report.skipped] == ["foreign.zarr"]
    (out_dir / "metadata.json").write_text("{not json")
    assert verify_run(out_dir).products == []  # unlisted and outside: nothing to find


def test_verify_run_with_repair_refuses_while_a_run_holds_out_dir(out_dir):
    write(out_dir)
    with Orchestrator(SEQ, out_dir=out_dir):
        assert verify_run(out_dir).ok  # reading is always allowed
        with pytest.raises(LeaseError, match="is in use by run"):
            verify_run(out_dir, repair=True)
    assert verify_run(out_dir, repair=True).ok
    assert not (out_dir / ".zarr_orch.lease.json").exists()


def test_verify_of_something_that_is_not_a_product(tmp_path):
    with pytest.raises(zo.ProductError, match="does not exist"):
        verify_product(tmp_path / "nothing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    with pytest.raises(zo.ProductError, match="not a zarr_orch product"):
        verify_product(tmp_path / "plain.zarr")
    with pytest.raises(zo.ProductError, match="does not exist"):
        verify_run(tmp_path / "missing")


def test_unreadable_product_in_a_run_is_a_problem(out_dir):
    write(out_dir)
    (product(out_dir) / "zarr.json").write_text("{garbage")
    report = verify_run(out_dir)
    [bad] = report.bad
    assert bad.kind == "unreadable product" and "not a Zarr v3 group" in bad.problem


def test_report_to_dict_and_text(out_dir):
    write(out_dir)
    os.remove(product(out_dir) / "hgt" / "c" / "0" / "0")
    report = verify_product(product(out_dir), repair=True)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["checked"] == 4
    assert data["bad"][0]["kind"] == MISSING_CHUNK and data["bad"][0]["row"] == 0
    assert data["repaired"] == [{"product": str(product(out_dir)), "row": 0, "col": 0}]
    text = str(report)
    assert "1 problem(s)" in text and "tile (row=0, col=0) tag 'hgt': missing chunk" in text
    assert "forgot the records of 1 tile(s)" in text


def test_edited_tile_values_in_place_are_a_mismatch(out_dir):
    write(out_dir)
    ds = xr.open_zarr(str(product(out_dir)), consolidated=False)
    assert ds["hgt"].shape == (H, W)
    zarr.open_array(str(product(out_dir) / "hgt"), mode="r+")[5, 5] = 0.0
    assert kinds(verify_product(product(out_dir))) == [(0, 0, "hgt", MISMATCH)]
