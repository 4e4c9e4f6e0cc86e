"""A run directory is self-contained: a copied (``cp -r``), moved or S3-synced run is checked,
repaired, listed and resumed in the directory given, and its original is never touched.

metadata.json names the products inside out_dir by relative path; an old metadata.json with
absolute URLs into its out_dir is rebased onto the directory given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from app_tasks import array_tile, arrays_dataset, full_field, profile_for, schedule

from zarr_orch import Orchestrator, open_run
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.readers.verify import verify_run

H, W, TILE = 60, 90, (32, 48)  # 2x2 tiles
SEQ = {"mode": "sequential", "max_retries": 0, "progress": False}
ROOT = Path(__file__).resolve().parents[1]
DAMAGED = ("ds.zarr", "hgt", "c", "0", "1")  # the chunk of tile (0, 1)


def write(out_dir: Path | str, **conf) -> Orchestrator:
    """The reference run: tag hgt of 2x2 tiles into out_dir/ds.zarr."""
    with Orchestrator(dict(SEQ, **conf), out_dir=out_dir) as orch:
        cds = arrays_dataset(H, W, TILE, overlap=2, name="ds")
        orch.add_to_save_lists("ds.tif", "hgt", cds, dtype="float32", nodata=-9999)
        schedule(orch, cds, array_tile, profile_for(H, W))
    return orch


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`: relative path -> bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def flip_byte(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    """`python -m zarr_orch ARGS` as a real subprocess, this worktree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "zarr_orch", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def stored(out_dir: Path) -> np.ndarray:
    return zarr.open_group(str(out_dir / "ds.zarr"), mode="r")["hgt"][...]


@pytest.fixture
def original(tmp_path: Path) -> Path:
    out = tmp_path / "original"
    write(out)
    return out


def test_metadata_names_products_and_log_relative_to_out_dir(original):
    info = json.loads((original / "metadata.json").read_text())["zarr_orch"]
    entry = info["products"]["ds.tif"]
    assert entry["path"] == "ds.zarr" and "url" not in entry
    assert info["log_file"].startswith("logs/run-") and info["log_file"].endswith(".log")


def _repair_copy_and_rerun(original: Path, copy: Path, before: dict[str, bytes]) -> None:
    """Damage a chunk of `copy`, `verify --repair` it, rerun there: `original` stays as is."""
    flip_byte(copy.joinpath(*DAMAGED))
    checked = cli("verify", copy)
    assert checked.returncode == 1, checked.stderr
    assert str(copy / "ds.zarr") in checked.stdout and str(original) not in checked.stdout
    assert "verified 4 tile record(s) in 1 product(s)" in checked.stdout
    repaired = cli("verify", "--repair", copy)
    assert repaired.returncode == 1, repaired.stderr
    assert "repaired: forgot the records of 1 tile(s)" in repaired.stdout
    assert snapshot(original) == before, "verify --repair of the copy changed the original"
    status = json.loads(cli("status", copy, "--json").stdout)
    assert [p["url"] for p in status["products"]] == [str(copy / "ds.zarr")]
    assert [p["tiles_done"] for p in status["products"]] == [3]
    orch = write(copy)  # resume in the copy: only the repaired tile is recomputed
    assert orch.stats["tiles"] == 1 and orch.stats["resumed"] == 3
    assert cli("verify", copy).returncode == 0
    np.testing.assert_array_equal(stored(copy), full_field(H, W))
    assert snapshot(original) == before, "resuming the copy changed the original"


def test_verify_repair_of_a_copied_run_never_touches_the_original(original, tmp_path):
    before = snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # cp -r
    _repair_copy_and_rerun(original, copy, before)


def test_a_copy_of_a_run_with_old_absolute_metadata_is_rebased(original, tmp_path):
    """metadata.json of older versions: absolute product URLs and log file into out_dir."""
    meta_path = original / "metadata.json"
    meta = json.loads(meta_path.read_text())
    info = meta["zarr_orch"]
    info["products"]["ds.tif"] = {"url": str(original / "ds.zarr"), "kind": "arrays"}
    info["log_file"] = str(original / info["log_file"])
    meta_path.write_text(json.dumps(meta))
    before = snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    run = open_run(copy)
    assert [p.url for p in run.products] == [str(copy / "ds.zarr")]
    assert run.log_file == str(copy / info["log_file"][len(str(original)) + 1 :])
    _repair_copy_and_rerun(original, copy, before)


def test_a_moved_run_is_verified_repaired_and_resumed_where_it_is(original, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(original, moved)
    decoy = snapshot(moved)
    # something new at the old place must not be touched either
    write(original)
    before = snapshot(original)
    assert set(before) - {"metadata.json"} and decoy
    flip_byte(moved.joinpath(*DAMAGED))
    report = verify_run(moved, repair=True)
    assert report.products == [str(moved / "ds.zarr")]
    assert report.repaired == [(str(moved / "ds.zarr"), 0, 1)]
    status = cli("status", moved)
    assert status.returncode == 0 and f"log: {moved / 'logs'}" in status.stdout
    orch = write(moved)
    assert orch.stats["tiles"] == 1
    np.testing.assert_array_equal(stored(moved), full_field(H, W))
    assert snapshot(original) == before


def test_a_copied_s3_prefix_is_repaired_without_touching_the_original(tmp_path, moto_server):
    options = moto_server.options()
    bucket = moto_server.make_bucket()
    source, target = f"s3://{bucket}/original", f"s3://{bucket}/copy"
    write(source, storage_options=options)
    fs = Location.parse(source, options).fs

    def objects(prefix: str) -> dict[str, bytes]:
        fs.invalidate_cache()
        return {
            key[len(prefix) :]: fs.cat_file(key)
            for key in sorted(fs.find(prefix))
            if not key.endswith(".lease.json")
        }

    before = objects(f"{bucket}/original/")
    fs.copy(f"{bucket}/original/", f"{bucket}/copy/", recursive=True)
    chunk = f"{bucket}/copy/{'/'.join(DAMAGED)}"
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    report = verify_run(target, options, repair=True)
    assert report.products == [f"{target}/ds.zarr"]
    assert report.repaired == [(f"{target}/ds.zarr", 0, 1)]
    assert [p.url for p in open_run(target, options).products] == [f"{target}/ds.zarr"]
    assert write(target, storage_options=options).stats["tiles"] == 1
    assert verify_run(target, options).ok
    assert objects(f"{bucket}/original/") == before
