"""The fault matrix (docs/fault_matrix.md): each bad input or fault, the message the user sees
and what is left on disk afterwards.

Every test asserts both: the message (what to change) and the state on disk (an existing
product unchanged, no completion record without its data, nothing created where nothing
should be). Rows already covered by tests/test_bad_input.py and tests/test_verify.py are
referenced from the table rather than repeated here.

Faults of the filesystem (read-only, full) use small tmpfs mounts when this process may
mount (root in a container with CAP_SYS_ADMIN, as here and in CI), else they are skipped
with the reason; a store wrapper raising ENOSPC covers the disk-full path everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from app_tasks import array_tile, arrays_dataset, full_field, profile_for, schedule
from fault_tasks import leaky_tile, ndarray_tile, random_tile, typed_tile
from tmpfs_mounts import remount, tmpfs

import zarr_orch as zo
from zarr_orch import CarsDataset, Orchestrator
from zarr_orch.storage.core.lease import LeaseError
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.readers.verify import verify_product
from zarr_orch.storage.writers import chunk_writer

H, W, TILE = 60, 90, (32, 48)
SEQ = {"mode": "sequential", "max_retries": 0, "progress": False}


# -- helpers ---------------------------------------------------------------------------------------


def write_reference(out_dir: Path, conf: dict | None = None) -> Orchestrator:
    """ds.zarr with tag hgt (float32, nodata -9999): the product faults must not damage."""
    with Orchestrator(conf or SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W))
    return orch


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: what a refused run must leave unchanged.

    Left out: run logs, the lease, metadata.json (run bookkeeping) and the ``run_id`` a
    rerun stamps into a product's group attributes (the last run that prepared it).
    """
    if not path.exists():
        return {}
    files = {}
    for p in sorted(path.rglob("*")):
        name = str(p.relative_to(path))
        if (
            not p.is_file()
            or "logs" in p.relative_to(path).parts
            or p.name in (".zarr_orch.lease.json", "metadata.json")
        ):
            continue
        data = p.read_bytes()
        if p.name == "zarr.json" and p.parent.suffix == ".zarr":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                meta = json.loads(data)
                meta["attributes"]["zarr_orch"].pop("run_id", None)
                data = json.dumps(meta, sort_keys=True).encode()
        files[name] = data
    return files


def records_of(product: Path) -> set[tuple[int, int]]:
    """Tiles recorded as done in `product` (all records arrays)."""
    group = zarr.open_group(str(product), mode="r")
    store = zarr.storage.LocalStore(str(product))
    done: set[tuple[int, int]] = set()
    for name in group.attrs["zarr_orch"].get("records", []):
        done |= rec.done_tiles(store, name)
    return done


def chunk_files(array_dir: Path) -> set[str]:
    """Chunk keys (``row/col``) stored under a tag's array directory."""
    base = array_dir / "c"
    if not base.exists():
        return set()
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


# -- names and locations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_name", "message"),
    [
        ("zarr.json", "'zarr.json' contains 'zarr.json'"),
        ("sub/zarr.json/x.tif", "contains 'zarr.json'"),
        ("sub/..", "'sub/..' contains '..'"),
        (".", "'.' names no file or directory"),
        ("   ", "file_name is empty"),
    ],
)
def test_reserved_and_empty_file_names_are_refused(out_dir, file_name, message):
    write_reference(out_dir)
    before = tree(out_dir)
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="bad")
        with pytest.raises(zo.ConfigurationError) as info:
            orch.add_to_save_lists(file_name, "hgt", cds)
        assert message in str(info.value)
        assert not orch.registries
    assert tree(out_dir) == before


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("zarr.json", "tag 'zarr.json' is a reserved Zarr name"),
        ("..", "tag '..' is not a valid name"),
        ("../hgt", "tag '../hgt' is not a valid name"),
        ("", "tag '' is not a valid name"),
        ("spatial_ref", "tag 'spatial_ref' is reserved for coordinates"),
    ],
)
def test_reserved_and_traversing_tags_are_refused(out_dir, tag, message):
    write_reference(out_dir)
    before = tree(out_dir)
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="ds")
        with pytest.raises(zo.ConfigurationError) as info:
            orch.add_to_save_lists("ds.tif", tag, cds)
        assert message in str(info.value)
        assert not orch.registries
    assert tree(out_dir) == before


def test_unsupported_url_protocol_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(zo.ConfigurationError) as info:
        Orchestrator(SEQ, out_dir="nosuchproto://bucket/run")
    assert "unsupported URL protocol 'nosuchproto' in 'nosuchproto://bucket/run'" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    with Orchestrator(SEQ, out_dir=tmp_path / "out") as orch:
        cds = arrays_dataset(H, W, TILE, name="ds")
        with pytest.raises(zo.ConfigurationError, match="unsupported URL protocol 'nosuchproto'"):
            orch.add_to_save_lists("nosuchproto://bucket/x.tif", "hgt", cds)
        assert not orch.registries
    assert not any(p.suffix == ".zarr" for p in (tmp_path / "out").iterdir())


def test_missing_out_dir_parents_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    write_reference(out)
    assert records_of(out / "ds.zarr") == {(0, 0), (0, 1), (1, 0), (1, 1)}
    np.testing.assert_array_equal(
        zarr.open_array(str(out / "ds.zarr" / "hgt"))[...], full_field(H, W)
    )


# -- read-only and full filesystems ----------------------------------------------------------------


def test_read_only_out_dir_is_refused_before_anything_runs(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        with pytest.raises(zo.ConfigurationError) as info:
            Orchestrator(SEQ, out_dir=mount)
        assert f"out_dir {mount} is not writable; choose another one" in str(info.value)
        with pytest.raises(zo.ConfigurationError) as info:
            Orchestrator(SEQ, out_dir=mount / "sub" / "out")
        assert f"cannot create out_dir {mount / 'sub' / 'out'}: Read-only file system" in str(
            info.value
        )
        assert list(mount.iterdir()) == []


def test_rerun_on_a_product_made_read_only_is_refused_and_verify_still_reads_it(tmp_path):
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        write_reference(mount / "out")
        before = tree(mount / "out")
        remount(mount, "ro")
        with pytest.raises(zo.ConfigurationError, match="is not writable; choose another one"):
            write_reference(mount / "out")
        assert tree(mount / "out") == before
        report = verify_product(mount / "out" / "ds.zarr")
        assert report.ok and report.checked == 4
        remount(mount, "rw")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: chmod 0o500 does not stop root from writing "
    "(the read-only tmpfs test covers this row)",
)
def test_out_dir_without_write_permission_is_refused(tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(zo.ConfigurationError, match="is not writable; choose another one"):
            Orchestrator(SEQ, out_dir=out)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


DISK_H = DISK_W = 256  # 16 tiles of 64x64 random float32 (16 KiB each, incompressible)


def _random_run(out: Path) -> Orchestrator:
    with Orchestrator(SEQ, out_dir=out) as orch:
        cds = arrays_dataset(DISK_H, DISK_W, (64, 64), name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, random_tile, profile_for(DISK_H, DISK_W))
    return orch


def _random_reference() -> np.ndarray:
    full = np.empty((DISK_H, DISK_W), dtype="float32")
    for row in range(4):
        for col in range(4):
            rng = np.random.default_rng(row * 1000 + col)
            full[row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64] = rng.random(
                (64, 64), dtype="float32"
            )
    return full


def _assert_no_record_without_data(product: Path) -> set[tuple[int, int]]:
    """Every recorded tile's chunk is there and matches its record; returns the done tiles."""
    done = records_of(product)
    assert chunk_files(product / "hgt") >= {f"{r}/{c}" for r, c in done}
    report = verify_product(product)
    assert report.ok, str(report)
    assert report.checked == len(done)
    return done


def test_disk_full_fails_the_tiles_it_hits_and_a_rerun_with_room_completes(tmp_path, caplog):
    with tmpfs(tmp_path / "small", "160k") as mount:
        out = mount / "out"
        out.mkdir()
        # the run log goes elsewhere: a full disk must not turn its flush into the run's
        # error (see test_disk_full_run_log_does_not_hide_the_tile_error)
        (tmp_path / "logs").mkdir()
        (out / "logs").symlink_to(tmp_path / "logs")
        with pytest.raises(zo.TaskFailedError) as info:
            _random_run(out)
        message = str(info.value)
        assert "of ds failed: OSError: [Errno 28] No space left on device" in message
        assert "tile(s) finished and are kept on disk" in message
        first = (info.value.row, info.value.col)
        failed = {(row, col) for _, row, col, _ in info.value.failures}
        assert first in failed and f"task for tile (row={first[0]}, col={first[1]})" in message
        done = _assert_no_record_without_data(out / "ds.zarr")
        assert done and not done & failed
        # tiles written while records blocks are rewritten (group commit) may find no room
        # for their record either: logged, not recorded, recomputed by the rerun
        unrecorded = 16 - len(done | failed)
        logged = [r for r in caplog.records if r.getMessage().startswith("could not record tile")]
        assert len(logged) == unrecorded
        remount(mount, "size=8m")  # the roomier location
        orch = _random_run(out)
        assert orch._stats["tiles"] == len(failed) + unrecorded
        assert orch._stats["resumed"] == len(done)
        assert _assert_no_record_without_data(out / "ds.zarr") == {
            (r, c) for r in range(4) for c in range(4)
        }
        np.testing.assert_array_equal(
            zarr.open_array(str(out / "ds.zarr" / "hgt"))[...], _random_reference()
        )


def test_disk_full_run_log_does_not_hide_the_tile_error(tmp_path):
    try:
        with tmpfs(tmp_path / "small", "160k") as mount, pytest.raises(zo.TaskFailedError):
            _random_run(mount / "out")
    finally:  # while the bug stands, its handler stays attached to a full disk: detach it
        package_logger = logging.getLogger("zarr_orch")
        for handler in list(package_logger.handlers):
            if str(getattr(handler, "baseFilename", "")).startswith(str(tmp_path)):
                package_logger.removeHandler(handler)
                with contextlib.suppress(OSError):
                    handler.close()


def test_disk_full_simulated_by_the_store_names_the_tile_and_records_nothing(out_dir, monkeypatch):
    """The same fault without a mount: chunk files raise ENOSPC from the 5th chunk on."""
    original = chunk_writer.atomic_write
    written: list[str] = []

    def full_after_four(path, *parts):
        if f"{os.sep}hgt{os.sep}c{os.sep}" in path:
            if len(written) >= 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            written.append(path)
        return original(path, *parts)

    monkeypatch.setattr(chunk_writer, "atomic_write", full_after_four)
    with pytest.raises(zo.TaskFailedError) as info:
        _random_run(out_dir)
    assert str(info.value).startswith(
        "task for tile (row=1, col=0) of ds failed: OSError: [Errno 28] No space left on device"
    )
    assert "(11 other tile(s) failed too); 4 tile(s) finished" in str(info.value)
    assert _assert_no_record_without_data(out_dir / "ds.zarr") == {(0, c) for c in range(4)}
    monkeypatch.setattr(chunk_writer, "atomic_write", original)
    orch = _random_run(out_dir)
    assert orch._stats["tiles"] == 12 and orch._stats["resumed"] == 4
    np.testing.assert_array_equal(
        zarr.open_array(str(out_dir / "ds.zarr" / "hgt"))[...], _random_reference()
    )


# -- bad tiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dtype", "nodata", "message"),
    [
        (
            "complex",
            "float32",
            -9999,
            "has values of dtype complex64, which cannot be saved as "
            "float32: return boolean, integer or float arrays",
        ),
        ("object", "float32", -9999, "has values of dtype object, which cannot be saved"),
        ("str", "float32", -9999, "has values of dtype <U3, which cannot be saved"),
        ("inf", "int16", -1, "contains inf values, which int16 cannot hold"),
        (
            "too_big",
            "uint8",
            0,
            "has values in [1000.0, 1000.0], outside the range of uint8 "
            "[0, 255]; choose a wider dtype or rescale",
        ),
        (
            "nan",
            "int16",
            None,
            "contains NaN values, which int16 cannot hold without a nodata "
            "value; register the tag with a nodata",
        ),
        ("1d", "float32", -9999, "has 1 dimensions; expected (row, col) or (band, row, col)"),
        ("4d", "float32", -9999, "has 4 dimensions; expected (row, col) or (band, row, col)"),
    ],
)
def test_tile_values_a_raster_cannot_hold_fail_their_task_and_record_nothing(
    out_dir, kind, dtype, nodata, message
):
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype=dtype, nodata=nodata)
        schedule(orch, cds, typed_tile, profile_for(H, W), kind)
        with pytest.raises(zo.TaskFailedError) as info:
            orch.breakpoint()
    text = str(info.value)
    assert text.startswith(
        "task for tile (row=0, col=0) of ds failed: TileError: tile (row=0, col=0) of ds tag 'hgt'"
    )
    assert message in text
    assert "(3 other tile(s) failed too); 0 tile(s) finished" in text
    assert records_of(out_dir / "ds.zarr") == set()
    assert chunk_files(out_dir / "ds.zarr" / "hgt") == set()


def test_tile_that_is_a_bare_array_fails_its_task(out_dir):
    write_reference(out_dir)
    before = tree(out_dir)
    with Orchestrator(dict(SEQ, resume=False), out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, ndarray_tile)
        with pytest.raises(zo.TaskFailedError) as info:
            orch.breakpoint()
    assert (
        "tile (row=0, col=0) of ds: the task returned a ndarray, which has no .attrs; "
        "return an xarray.Dataset, a pandas.DataFrame or a CarsDict"
    ) in str(info.value)
    assert tree(out_dir) == before


@pytest.mark.parametrize("col_min", [40, 50], ids=["overlapping", "gap"])
def test_overlapping_or_gapped_windows_are_merged_at_their_windows(out_dir, col_min, caplog):
    """A grid whose column 1 starts before (overlap) or after (gap) column 0 ends is no
    chunk grid: merged by the main process at the tiles' windows, as CARS's saver writes
    them. An overlap is logged (the later tile in tile order wins); a gap stays nodata."""
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = CarsDataset("arrays", name="ds")
        grid = np.array(arrays_dataset(H, W, TILE).tiling_grid)
        grid[:, 1, 2] = col_min  # column 1 starts before (overlap) or after (gap) column 0 ends
        cds.tiling_grid = grid
        orch.add_to_save_lists("ds.tif", "hgt", cds, nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W))
        orch.breakpoint()
    want = full_field(H, W)
    want[:, TILE[1] : col_min] = -9999  # the gap (empty when the windows overlap)
    group = zarr.open_group(str(out_dir / "ds.zarr"), mode="r")
    np.testing.assert_array_equal(group["hgt"][...], want)
    assert group.attrs["zarr_orch"]["windowed"] is True
    overlaps = [r.getMessage() for r in caplog.records if "overlaps" in r.getMessage()]
    assert len(overlaps) == (1 if col_min < TILE[1] else 0), overlaps
    assert verify_product(str(out_dir / "ds.zarr")).ok


def test_lambda_task_in_multiprocessing_mode_is_refused_before_anything_runs(out_dir):
    with Orchestrator(
        {"mode": "multiprocessing", "nb_workers": 1, "progress": False}, out_dir=out_dir
    ) as orch:
        cds = arrays_dataset(H, W, TILE, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds)
        with pytest.raises(zo.ConfigurationError) as info:
            orch.cluster.create_task(lambda window, overlaps, info: None)
        orch.reset_registries()
    assert not (out_dir / "ds.zarr").exists()  # nothing ran, nothing was written
    text = str(info.value)
    assert text.startswith(
        "task function 'test_lambda_task_in_multiprocessing_mode_is_refused_"
        "before_anything_runs.<locals>.<lambda>' cannot be sent to worker "
        "processes in 'multiprocessing' mode"
    )
    assert "define it at module level in an importable module (not a lambda" in text
    assert not (out_dir / "ds.zarr").exists()


def test_task_leaking_memory_past_max_ram_per_worker_is_killed_and_named(out_dir):
    conf = {
        "mode": "multiprocessing",
        "nb_workers": 1,
        "max_ram_per_worker": 200,
        "max_retries": 0,
        "progress": False,
    }
    with Orchestrator(conf, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, leaky_tile, profile_for(H, W), 400, (0, 0))
        with pytest.raises(zo.TaskFailedError) as info:
            orch.breakpoint()
    text = str(info.value)
    assert text.startswith(
        "task for tile (row=0, col=0) of ds failed: MemoryError: task 'leaky_tile'"
    )
    assert "above max_ram_per_worker=200 MB; the worker was killed" in text
    assert "3 tile(s) finished and are kept on disk" in text
    assert records_of(out_dir / "ds.zarr") == {(0, 1), (1, 0), (1, 1)}
    assert "0/0" not in chunk_files(out_dir / "ds.zarr" / "hgt")
    assert verify_product(out_dir / "ds.zarr").ok


def test_tile_returning_none_is_skipped_and_not_recorded(out_dir):
    """CARS allows empty cells: a task returning None saves and records nothing."""
    with Orchestrator(SEQ, out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds)
        schedule(orch, cds, none_tile)
    assert records_of(out_dir / "ds.zarr") == set()
    assert not (out_dir / "ds.zarr" / "hgt").exists()


def none_tile(window: dict, overlaps: dict, saving_info: dict) -> None:
    """A task with nothing to return for its cell (sequential mode: may live here)."""
    return None


# -- products modified by hand before a rerun ------------------------------------------------------


def _edit_dtype(meta: dict) -> None:
    meta["data_type"] = "int16"
    meta["fill_value"] = -9999


def _edit_shape(meta: dict) -> None:
    meta["shape"] = [100, 90]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_dtype, "(hgt: dtype int16 != float32)"),
        (
            _edit_shape,
            "(hgt: shape (100, 90) does not match the 60x90 raster of its row/col coordinates)",
        ),
        (None, "(its array metadata cannot be read (JSONDecodeError"),
    ],
    ids=["dtype", "shape", "garbage"],
)
def test_rerun_refuses_a_product_whose_metadata_was_edited(out_dir, edit, message):
    write_reference(out_dir)
    meta_file = out_dir / "ds.zarr" / "hgt" / "zarr.json"
    if edit is None:
        meta_file.write_text("{garbage")
    else:
        meta = json.loads(meta_file.read_text())
        edit(meta)
        meta_file.write_text(json.dumps(meta))
    before = tree(out_dir)
    for conf in (SEQ, dict(SEQ, resume=False)):
        with pytest.raises(zo.ProductError) as info:
            write_reference(out_dir, conf)
        text = str(info.value)
        assert f"{out_dir / 'ds.zarr'} already exists with another layout {message}" in text
        assert "set overwrite: true, or remove the old product" in text
        assert tree(out_dir) == before
    write_reference(out_dir, dict(SEQ, overwrite=True))  # the documented way out
    assert verify_product(out_dir / "ds.zarr").ok


def test_garbled_product_group_metadata_is_refused(out_dir):
    write_reference(out_dir)
    (out_dir / "ds.zarr" / "zarr.json").write_text("not json")
    before = tree(out_dir)
    with pytest.raises(zo.ProductError) as info:
        write_reference(out_dir)
    assert f"{out_dir / 'ds.zarr'} exists but is not a Zarr v3 group" in str(info.value)
    assert "choose another file name or remove it" in str(info.value)
    assert tree(out_dir) == before


def test_stray_file_among_the_records_does_not_break_a_rerun(out_dir, caplog):
    write_reference(out_dir)
    group = zarr.open_group(str(out_dir / "ds.zarr"), mode="r")
    records = out_dir / "ds.zarr" / rec.META_GROUP / group.attrs["zarr_orch"]["records"][0]
    (records / "c" / "notes.txt").write_text("hand-written")
    orch = write_reference(out_dir)
    assert orch._stats["tiles"] == 0 and orch._stats["resumed"] == 4
    [bad] = verify_product(out_dir / "ds.zarr").bad
    assert bad.problem.startswith("malformed record: stray key") and "notes.txt" in bad.problem


# -- runs sharing a process or a directory ---------------------------------------------------------


def test_two_orchestrators_in_one_process_on_different_out_dirs(tmp_path):
    first = Orchestrator(SEQ, out_dir=tmp_path / "one")
    second = Orchestrator(SEQ, out_dir=tmp_path / "two")
    try:
        for orch, offset in ((first, 0.0), (second, 5.0)):
            cds = arrays_dataset(H, W, TILE, name="ds")
            orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
            schedule(orch, cds, array_tile, profile_for(H, W), ("hgt",), offset)
        second.breakpoint()
        first.breakpoint()
    finally:
        first.cleanup()
        second.cleanup()
    for name, offset in (("one", 0.0), ("two", 5.0)):
        stored = zarr.open_array(str(tmp_path / name / "ds.zarr" / "hgt"))[...]
        np.testing.assert_array_equal(stored, full_field(H, W, offset))
        assert not (tmp_path / name / ".zarr_orch.lease.json").exists()


def test_second_orchestrator_on_the_same_out_dir_is_refused_naming_the_holder(out_dir):
    write_reference(out_dir)
    before = tree(out_dir)
    with Orchestrator(SEQ, out_dir=out_dir) as holder:
        with pytest.raises(LeaseError) as info:
            Orchestrator(SEQ, out_dir=out_dir)
        text = str(info.value)
        assert f"{out_dir} is in use by run {holder.run_id} (host " in text
        assert f"pid {os.getpid()}" in text
        assert "held by another orchestrator of this process" in text
        assert "Wait for it to finish, stop it, or use another out_dir" in text
        lease = json.loads((out_dir / ".zarr_orch.lease.json").read_text())
        assert lease["run_id"] == holder.run_id
    assert tree(out_dir) == before
    assert not (out_dir / ".zarr_orch.lease.json").exists()


def test_corrupted_metadata_json_from_an_earlier_run_is_rewritten(out_dir):
    write_reference(out_dir)
    (out_dir / "metadata.json").write_text('{"zarr_orch": {"products": [trunc')
    before = tree(out_dir)
    orch = write_reference(out_dir)
    assert orch._stats["resumed"] == 4 and orch._stats["tiles"] == 0
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert meta["zarr_orch"]["run_id"] == orch.run_id
    assert meta["zarr_orch"]["products"]["ds.tif"]["tiles_done"] == 4
    assert tree(out_dir) == before  # products untouched


def test_copied_product_keeps_verifying(tmp_path):
    """A product is self-contained: copied elsewhere, its records still verify."""
    write_reference(tmp_path / "out")
    shutil.copytree(tmp_path / "out" / "ds.zarr", tmp_path / "copy.zarr")
    assert verify_product(tmp_path / "copy.zarr").ok
