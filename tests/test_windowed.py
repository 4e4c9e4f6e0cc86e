"""Windowed products: tiles carrying their own (overlapping) windows, merged by final_function.

A numpy saver with CARS's semantics (the core written at the window, get_data reading the
window back once any tile was saved) is the reference; the product must equal it exactly,
in every mode, whatever chunks the windows span.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zarr
from tmpfs_mounts import remount, tmpfs
from windowed_tasks import (
    HEIGHT,
    TAGS,
    WIDTH,
    failing_final,
    merge_final,
    profile,
    window_of,
    windowed_dataset,
    windowed_tile,
)

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator
from zarr_orch.data.tiling import generate_tiling_grid
from zarr_orch.errors import StorageError
from zarr_orch.storage.core.zarr_io import get_bytes, list_keys, set_bytes
from zarr_orch.storage.format.journal import MANIFEST, UNDO, MergeJournal
from zarr_orch.storage.readers.verify import verify_product


class NumpySaver:
    """Reference: CARS's saver over whole numpy rasters (the tile's core at its window)."""

    def __init__(self, height: int = HEIGHT, width: int = WIDTH) -> None:
        self.arrays = {
            tag: np.full((height, width), nodata, dtype=dtype)
            for tag, (dtype, nodata) in TAGS.items()
        }
        self.saved = False

    def get_data(self, tag: str, tile: Any) -> tuple[Any, Any]:
        if not self.saved:
            return None, None
        w = tile.attrs["window"]
        box = (slice(w["row_min"], w["row_max"]), slice(w["col_min"], w["col_max"]))
        return self.arrays[tag][box].copy(), TAGS[tag][1]

    def save(self, tile: Any) -> None:
        w = tile.attrs["window"]
        box = (slice(w["row_min"], w["row_max"]), slice(w["col_min"], w["col_max"]))
        for tag, (dtype, _) in TAGS.items():
            self.arrays[tag][box] = tile[tag].values.astype(dtype)
        self.saved = True


def reference(tiles: int, final: Any = merge_final, upto: int | None = None) -> NumpySaver:
    """The arrays CARS's sequential orchestrator would write (tiles merged in order)."""
    saver = NumpySaver()
    for index in range(tiles if upto is None else upto):
        info = {"cars_ds_key": 0, "cars_ds_row": 0, "cars_ds_col": index}
        saver.save(final(saver, windowed_tile(index, info, profile())))
    return saver


def product_arrays(path: Any) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {tag: group[tag][...] for tag in TAGS}


def assert_equal_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for tag in TAGS:
        np.testing.assert_array_equal(got[tag], want[tag], err_msg=tag)


@pytest.mark.parametrize("mode", ["sequential", "multiprocessing"])
def test_overlapping_windows_merge_like_cars_in_every_mode(out_dir, mode):
    """Tiles merge in tile order whatever their arrival: multiprocessing == sequential."""
    tiles = 14
    conf = {"mode": mode, "progress": False, "max_retries": 0}
    with Orchestrator(conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, tiles)
        orch.breakpoint()
    assert_equal_arrays(product_arrays(out_dir / "merged.zarr"), reference(tiles).arrays)
    group = zarr.open_group(str(out_dir / "merged.zarr"), mode="r")
    assert group["val"].chunks == (32, 32)  # the profile's block size
    info = group.attrs["zarr_orch"]
    assert info["windowed"] is True
    assert not list_keys(group.store, "_zarr_orch/journal/")  # every merge committed
    meta = json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]
    assert meta["products"]["merged.tif"]["tiles_done"] == tiles


def test_chunk_grid_defaults_to_256_without_a_block_size(out_dir, seq_conf):
    prof = {k: v for k, v in profile(600, 700).items() if not k.startswith("block")}
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 3, prof=prof)
        orch.breakpoint()
    group = zarr.open_group(str(out_dir / "merged.zarr"), mode="r")
    assert group["val"].shape == (600, 700) and group["val"].chunks == (256, 256)


def test_get_data_reads_the_whole_window_across_chunks_and_tiles_of_this_breakpoint(
    out_dir, seq_conf
):
    seen: list[tuple[int, Any]] = []

    def spy(orchestrator: Any, tile: Any) -> Any:
        old, _ = orchestrator.get_data("count", tile)
        seen.append((tile.attrs["saving_info"]["cars_ds_col"], old))
        return merge_final(orchestrator, tile)

    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 4, final=spy)
        orch.breakpoint()
    want = reference(4)
    assert seen[0] == (0, None)  # nothing merged yet: CARS's get_data returns None too
    for index, old in seen[1:]:
        w = window_of(index)
        before = reference(4, upto=index).arrays["count"]
        np.testing.assert_array_equal(
            old, before[w["row_min"] : w["row_max"], w["col_min"] : w["col_max"]]
        )
    assert_equal_arrays(product_arrays(out_dir / "merged.zarr"), want.arrays)


def test_window_none_is_the_whole_raster(out_dir, seq_conf):
    """A single tile without window (dense matching's global disparity grid) fills it all."""
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 1, window=None)
        plain = CarsDataset("arrays", name="plain")
        plain.tiling_grid = np.array([[[0, HEIGHT, 0, WIDTH]]])
        orch.add_to_save_lists("plain.tif", "val", plain, dtype="float32", nodata=-9999)
        [info] = orch.get_saving_infos([plain])
        plain[0, 0] = orch.cluster.create_task(windowed_tile)(
            0, zo.update_saving_infos(info, row=0, col=0), profile(), 0.0, None
        )
        orch.breakpoint()
    whole = windowed_tile(0, {"cars_ds_col": 0}, profile(), 0.0, None)
    merged = product_arrays(out_dir / "merged.zarr")
    np.testing.assert_array_equal(merged["val"], whole["val"].values)
    np.testing.assert_array_equal(merged["count"], np.ones((HEIGHT, WIDTH), "uint16"))
    stored = zarr.open_group(str(out_dir / "plain.zarr"), mode="r")["val"][...]
    # the grid-aligned path casts NaN to nodata; values are those of the whole tile
    np.testing.assert_array_equal(stored, np.nan_to_num(whole["val"].values, nan=-9999))


def test_a_window_outside_the_raster_fails_its_tile_and_keeps_earlier_ones(out_dir, seq_conf):
    outside = {"row_min": 80, "row_max": 120, "col_min": 0, "col_max": 50}
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        cds = windowed_dataset(orch, 3)
        [info] = orch.get_saving_infos([cds])
        cds[0, 2] = orch.cluster.create_task(windowed_tile)(
            2, zo.update_saving_infos(info, row=0, col=2), profile(), 0.0, outside
        )
        with pytest.raises(zo.TaskFailedError) as err:
            orch.breakpoint()
    text = str(err.value)
    assert "tile (row=0, col=2) of merged" in text
    assert "window rows [80, 120) cols [0, 50) is outside the 96x128 raster" in text
    assert "2 tile(s) finished and are kept on disk" in text
    assert_equal_arrays(product_arrays(out_dir / "merged.zarr"), reference(3, upto=2).arrays)


def test_a_raising_final_function_names_its_tile_keeps_earlier_tiles_and_resumes(out_dir):
    conf = {"mode": "sequential", "progress": False, "max_retries": 0}
    with Orchestrator(conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 6, final=failing_final)
        with pytest.raises(zo.TaskFailedError) as err:
            orch.breakpoint()
    text = str(err.value)
    assert "task for tile (row=0, col=3) of merged failed: ValueError" in text
    assert "merge of this tile is broken" in text
    assert "(2 other tile(s) failed too)" in text  # tiles 4, 5: not merged after it
    assert "3 tile(s) finished and are kept on disk" in text
    assert [f[2] for f in err.value.failures] == [3, 4, 5]
    assert_equal_arrays(product_arrays(out_dir / "merged.zarr"), reference(6, upto=3).arrays)
    with Orchestrator(conf, out_dir=out_dir) as orch:  # fixed: the rest merges, in order
        windowed_dataset(orch, 6)
        orch.breakpoint()
    assert_equal_arrays(product_arrays(out_dir / "merged.zarr"), reference(6).arrays)


def flaky_tile(index: int, saving_info: dict, prof: dict, fail_from: int) -> Any:
    """windowed_tile, failing from tile `fail_from` on (an interrupted run)."""
    if index >= fail_from:
        raise ValueError(f"tile {index} fails")
    return windowed_tile(index, saving_info, prof)


def overlapping_raw(orch: Orchestrator, tiles: int, fail_from: int = 1 << 20) -> None:
    """A 1 x `tiles` dataset without final_function whose windows overlap (windowed_tile)."""
    cds = CarsDataset("arrays", name="raw")
    cds.tiling_grid = generate_tiling_grid(0, 0, 1, tiles, 1, 1)
    for tag, (dtype, nodata) in TAGS.items():
        orch.add_to_save_lists("raw.tif", tag, cds, dtype=dtype, nodata=nodata)
    [info] = orch.get_saving_infos([cds])
    for index in range(tiles):
        cds[0, index] = orch.cluster.create_task(flaky_tile)(
            index, zo.update_saving_infos(info, row=0, col=index), profile(), fail_from
        )


@pytest.mark.parametrize("mode", ["sequential", "multiprocessing"])
def test_overlapping_windows_without_final_function_later_tile_wins(out_dir, mode, caplog):
    """CARS's saver pastes each tile at its window (last written wins; arrival order in its
    multiprocessing mode): here the later tile in tile order wins, in every mode, logged."""
    conf = {"mode": mode, "progress": False, "max_retries": 0}
    tiles = 6
    with Orchestrator(conf, out_dir=out_dir) as orch:
        overlapping_raw(orch, tiles)
        orch.breakpoint()
    want = reference(tiles, final=lambda _saver, tile: tile)  # pasted in tile order
    assert_equal_arrays(product_arrays(out_dir / "raw.zarr"), want.arrays)
    warnings = [r.getMessage() for r in caplog.records if "overlaps" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per dataset
    assert "tile (row=0, col=1) of raw" in warnings[0] and "the later one" in warnings[0]
    info = zarr.open_group(str(out_dir / "raw.zarr"), mode="r").attrs["zarr_orch"]
    assert info["windowed"] is True


def test_overlapping_windows_resume_exactly(out_dir, seq_conf):
    """A rerun after tiles 0-2 of 6 were merged ends as the uninterrupted run (tile order)."""
    conf = {**seq_conf, "max_retries": 0}
    with Orchestrator(conf, out_dir=out_dir) as orch:
        overlapping_raw(orch, 6, fail_from=3)
        with pytest.raises(zo.TaskFailedError):
            orch.breakpoint()
    with Orchestrator(conf, out_dir=out_dir) as orch:
        overlapping_raw(orch, 6)
        orch.breakpoint()
    stats = json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert (stats["tiles"], stats["resumed"]) == (3, 3)
    want = reference(6, final=lambda _saver, tile: tile)
    assert_equal_arrays(product_arrays(out_dir / "raw.zarr"), want.arrays)


def test_resume_skips_merged_tiles_and_merges_the_rest_once(out_dir, seq_conf):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 8)
        orch.breakpoint()
    first = product_arrays(out_dir / "merged.zarr")
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 8)
        orch.breakpoint()
    stats = json.loads((out_dir / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert (stats["tiles"], stats["resumed"]) == (0, 8)  # every tile merged: none again
    assert_equal_arrays(product_arrays(out_dir / "merged.zarr"), first)


def test_journal_rolls_back_a_half_applied_merge_across_products(tmp_path):
    """One transaction over two products' stores: every key restored (changed, created)."""
    first = zarr.storage.LocalStore(str(tmp_path / "a.zarr"))
    second = zarr.storage.LocalStore(str(tmp_path / "b.zarr"))
    stores = {"a": first, "b": second}
    set_bytes(first, "v/c/0/0", b"old chunk")
    set_bytes(second, "w/c/1/0", b"old weights")
    journal = MergeJournal(first)
    entries = [("a", first, "v/c/0/0"), ("a", first, "v/c/0/1"), ("b", second, "w/c/1/0")]
    journal.begin((0, 5), entries, [b"old chunk", None, b"old weights"])
    # one undo object for every key, whatever their number, then the manifest
    assert sorted(list_keys(first, "_zarr_orch/journal/")) == sorted([MANIFEST, UNDO])
    set_bytes(first, "v/c/0/0", b"half merged")
    set_bytes(first, "v/c/0/1", b"new chunk")
    set_bytes(second, "w/c/1/0", b"new weights")
    assert get_bytes(first, MANIFEST) is not None
    assert MergeJournal(second).recover(stores) is None  # the journal lives in the first
    assert MergeJournal(first).recover(stores) == (0, 5)
    assert get_bytes(first, "v/c/0/0") == b"old chunk"
    assert get_bytes(first, "v/c/0/1") is None
    assert get_bytes(second, "w/c/1/0") == b"old weights"
    assert list_keys(first, "_zarr_orch/journal/") == []
    assert MergeJournal(first).recover(stores) is None  # nothing left to undo


def test_an_older_versions_journal_is_still_rolled_back(tmp_path):
    """Before the undo object, each key had its own copy: a run killed by an older version
    is rolled back by this one."""
    store = zarr.storage.LocalStore(str(tmp_path / "a.zarr"))
    set_bytes(store, "v/c/0/0", b"half merged")
    set_bytes(store, "v/c/0/1", b"created by the merge")
    set_bytes(store, "_zarr_orch/journal/0.undo", b"old chunk")
    manifest = {"tile": [0, 2], "entries": [["a", "v/c/0/0", "_zarr_orch/journal/0.undo"]]}
    manifest["entries"].append(["a", "v/c/0/1", None])
    set_bytes(store, MANIFEST, json.dumps(manifest).encode())
    assert MergeJournal(store).recover({"a": store}) == (0, 2)
    assert get_bytes(store, "v/c/0/0") == b"old chunk"
    assert get_bytes(store, "v/c/0/1") is None
    assert list_keys(store, "_zarr_orch/journal/") == []


def test_a_journal_naming_a_product_this_run_does_not_register_is_refused(tmp_path):
    first = zarr.storage.LocalStore(str(tmp_path / "a.zarr"))
    other = zarr.storage.LocalStore(str(tmp_path / "b.zarr"))
    entries = [("a", first, "v/c/0/0"), ("b", other, "w/c/0/0")]
    MergeJournal(first).begin((0, 1), entries, [None, None])
    with pytest.raises(StorageError, match="also changed b, which this run does not register"):
        MergeJournal(first).recover({"a": first})
    assert get_bytes(first, MANIFEST) is not None  # kept for the run that can roll it back


def test_verify_checks_every_chunk_and_reports_a_pending_merge(out_dir, seq_conf):
    with Orchestrator(seq_conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 5)
        orch.breakpoint()
    product = out_dir / "merged.zarr"
    report = verify_product(str(product))
    assert report.ok and report.checked == 5
    chunk = product / "val" / "c" / "1" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    set_bytes(zarr.storage.LocalStore(str(product)), MANIFEST, b'{"tile": [0, 4], "keys": {}}')
    report = verify_product(str(product), repair=True)
    problems = sorted(bad.problem for bad in report.bad)
    assert len(problems) == 2 and not report.repaired  # a merged pixel is not one tile's
    assert problems[0].startswith("undecodable: val/c/1/1 (")
    assert "rebuild the product with resume: false" in problems[0]
    assert problems[1].startswith("unfinished merge: the merge journal holds a merge a killed")


def test_torn_manifest_means_the_merge_never_began(tmp_path):
    store = zarr.storage.LocalStore(str(tmp_path / "p.zarr"))
    set_bytes(store, "a/c/0/0", b"old chunk")
    set_bytes(store, "_zarr_orch/journal/0.undo", b"old chunk")
    set_bytes(store, MANIFEST, b'{"tile": [0, 1], "ke')  # killed while writing it
    assert MergeJournal(store).recover({}) is None
    assert get_bytes(store, "a/c/0/0") == b"old chunk"
    assert list_keys(store, "_zarr_orch/journal/") == []


def test_on_s3_a_half_applied_merge_is_rolled_back_at_start_up(s3_options, s3_bucket):
    """Same merges on S3; a journaled merge left by a crash is undone by the next run."""
    pytest.importorskip("s3fs")
    from zarr_orch.storage.core.location import Location

    url = f"s3://{s3_bucket}/run"
    conf = {"mode": "sequential", "progress": False, "storage_options": s3_options}
    with Orchestrator(conf, out_dir=url) as orch:
        windowed_dataset(orch, 6)
        orch.breakpoint()
    store = Location.parse(f"{url}/merged.zarr", s3_options).zarr_store()
    want = reference(6).arrays
    group = zarr.open_group(store, mode="r")
    for tag in TAGS:
        np.testing.assert_array_equal(group[tag][...], want[tag], err_msg=tag)
    # a crash in the middle of a merge: journal begun, chunks half rewritten
    keys = ["val/c/0/0", "count/c/1/1", "seen/c/2/3"]
    product = f"{url}/merged.zarr"
    entries = [(product, store, key) for key in keys]
    MergeJournal(store).begin((0, 5), entries, [get_bytes(store, key) for key in keys])
    for key in keys:
        set_bytes(store, key, b"torn bytes of a half-applied merge")
    with Orchestrator(conf, out_dir=url) as orch:
        windowed_dataset(orch, 6)
        orch.breakpoint()
    group = zarr.open_group(store, mode="r")
    for tag in TAGS:
        np.testing.assert_array_equal(group[tag][...], want[tag], err_msg=tag)
    assert list_keys(store, "_zarr_orch/journal/") == []


def two_passes(out_dir: Any, conf: dict, second_final: Any) -> None:
    """One run, two breakpoints merging into the same products (a second pass)."""
    with Orchestrator(conf, out_dir=out_dir) as orch:
        windowed_dataset(orch, 6)
        orch.breakpoint()
        windowed_dataset(orch, 6, final=second_final)
        orch.breakpoint()


def test_a_second_merge_pass_of_the_same_run_resumes_exactly(tmp_path, seq_conf):
    """Killed (here: failing) in its second pass, the rerun skips the first pass and merges
    only the second pass's missing tiles: equal to the uninterrupted two-pass run."""
    conf = {**seq_conf, "max_retries": 0}
    two_passes(tmp_path / "a", conf, merge_final)
    want = product_arrays(tmp_path / "a" / "merged.zarr")
    assert not np.array_equal(want["count"], reference(6).arrays["count"])  # merged twice
    with pytest.raises(zo.TaskFailedError):
        two_passes(tmp_path / "b", conf, failing_final)  # pass 2 merged tiles 0-2 only
    two_passes(tmp_path / "b", conf, merge_final)
    assert_equal_arrays(product_arrays(tmp_path / "b" / "merged.zarr"), want)
    stats = json.loads((tmp_path / "b" / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert (stats["tiles"], stats["resumed"]) == (3, 9)
    two_passes(tmp_path / "b", conf, merge_final)  # finished: nothing is merged again
    stats = json.loads((tmp_path / "b" / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert (stats["tiles"], stats["resumed"]) == (0, 12)
    assert_equal_arrays(product_arrays(tmp_path / "b" / "merged.zarr"), want)


def chunk_files(out: Any) -> dict[str, bytes]:
    """Every data chunk file of every product under `out`, with its bytes (records hold
    the time each tile was done, so they differ between any two runs)."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("c/**/*"))
        if path.is_file() and ".zarr" in str(path) and "_zarr_orch" not in path.parts
    }


@pytest.mark.parametrize("mode", ["sequential", "multiprocessing"])
def test_batched_commits_store_the_same_bytes_as_one_commit_per_tile(tmp_path, mode):
    """merge_commit_seconds only changes when merges are stored, never what is stored."""
    got = {}
    for seconds in (0, 1.0, 60):
        out = tmp_path / f"commit_{seconds}"
        conf = {"mode": mode, "progress": False, "merge_commit_seconds": seconds}
        with Orchestrator(conf, out_dir=out) as orch:
            windowed_dataset(orch, 12, split=True)
            orch.breakpoint()
        got[seconds] = chunk_files(out)
        assert not list(out.rglob("merge.json")), "a commit was left unfinished"
        for product in ("merged.zarr", "weights.zarr", "seen.zarr"):
            report = verify_product(out / product)
            assert report.ok and report.checked == 12, str(report)
    assert got[0] and got[0] == got[1.0] == got[60]
    want = reference(12).arrays
    for product, tag in [("merged", "val"), ("merged", "count"), ("weights", "weight")]:
        group = zarr.open_group(str(tmp_path / "commit_60" / f"{product}.zarr"), mode="r")
        np.testing.assert_array_equal(group[tag][...], want[tag], err_msg=tag)


def test_merge_commit_seconds_must_be_a_number_of_seconds(out_dir):
    with pytest.raises(zo.ConfigurationError, match="merge_commit_seconds must be a number >= 0"):
        Orchestrator({"mode": "sequential", "merge_commit_seconds": -1}, out_dir=out_dir)
    with pytest.raises(zo.ConfigurationError, match="merge_commit_seconds must be a number >= 0"):
        Orchestrator({"mode": "sequential", "merge_commit_seconds": "1s"}, out_dir=out_dir)
    assert not out_dir.exists() or not list(out_dir.rglob("*.zarr"))


def test_a_commit_that_finds_the_disk_full_is_rolled_back_and_the_rerun_merges_exactly(
    tmp_path,
):
    """A real full disk (tmpfs) under a batched commit: its tiles are not recorded, later
    merges are refused, nothing half-merged stays recorded; with room, the rerun merges the
    missing tiles only and the products equal the uninterrupted run's."""
    want = tmp_path / "want"
    conf = {"mode": "sequential", "progress": False, "max_retries": 0, "geotiff_outputs": False}
    conf["merge_commit_seconds"] = 0.05  # tiles take 0.03 s: commits of about 2 tiles
    with Orchestrator(conf, out_dir=want) as orch:
        windowed_dataset(orch, 16, split=True)
        orch.breakpoint()
    with tmpfs(tmp_path / "small", "400k") as mount:
        out = mount / "out"
        out.mkdir()
        (tmp_path / "logs").mkdir()
        (out / "logs").symlink_to(tmp_path / "logs")  # a full disk must not eat the log
        # metadata.json beside the mount: its write at exit must not be the next ENOSPC
        meta = tmp_path / "metadata.json"
        with Orchestrator(conf, out, True, meta) as orch:
            windowed_dataset(orch, 16, split=True, sleep=0.03)
            with pytest.raises((zo.TaskFailedError, StorageError)) as info:
                orch.breakpoint()
        message = str(info.value)
        assert "No space left on device" in message, message
        if isinstance(info.value, zo.TaskFailedError):  # later tiles were refused, named
            assert "not merged, because an earlier commit of merged tiles failed" in message
        reports = [
            verify_product(out / product)
            for product in ("merged.zarr", "weights.zarr", "seen.zarr")
        ]
        if (out / "merged.zarr" / MANIFEST).exists():
            # no room even to roll back at once: the journal stays for the next start-up
            assert "unfinished merge" in str(reports[0])
        else:  # rolled back at once: what is recorded is a prefix, the same everywhere
            assert all(report.ok for report in reports), [str(r) for r in reports]
            assert len({report.checked for report in reports}) == 1
            assert reports[0].checked < 16
        remount(mount, "size=16m")
        with Orchestrator(conf, out, True, meta) as orch:
            windowed_dataset(orch, 16, split=True)
            orch.breakpoint()
        stats = json.loads(meta.read_text())["zarr_orch"]["stats"]
        assert 0 < stats["tiles"] < 16 and stats["tiles"] + stats["resumed"] == 16, stats
        assert chunk_files(out) == chunk_files(want)
