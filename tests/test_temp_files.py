"""Temp files of SIGKILLed writers: the next run deletes exactly them, verify lists them.

A real child process (`killed_writer.py`) rewrites a product file through zarr_orch's
`atomic_write` (as a worker writes a chunk, the main process a records block) or zarr's
LocalStore (as zarr writes a ``zarr.json``) and is SIGKILLed mid-write, leaving its temp
file exactly as a killed run does. A rerun removes those files and nothing else (files a
user put there with similar names stay), leaving the product identical to an uninterrupted
run's; a product outside the leased out_dir, and a product this run already writes, are not
swept; `verify` reports temp files as litter (not damage) and `--repair` deletes old ones.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from app_tasks import array_tile, arrays_dataset, profile_for, schedule

from zarr_orch import Orchestrator
from zarr_orch.breakpoint.prepare import prepare_products
from zarr_orch.breakpoint.state import RunState
from zarr_orch.storage.core.atomic_files import (
    OWN_TEMP,
    ZARR_TEMP,
    find_temp_files,
    is_temp_name,
    temp_path,
)
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.readers.verify import verify_run

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("killed_writer.py")
CONF = {"mode": "sequential", "progress": False, "geotiff_outputs": False}
H, W, TILE = 64, 128, (32, 64)  # a 2 x 2 grid
#: names a user may give files in a product: similar to temp names, but none of ours
USER_FILES = (
    "notes.partial.txt",
    "x.partial",
    "hgt/c/0/1.partial",
    "hgt/c/1.12.partial",
    "zarr.0123456789ABCDEF0123456789ABCDEF.partial",
    "hgt/c/0/0.partial.bak",
)


def register(orch: Orchestrator, elsewhere: Path | None = None) -> None:
    """dem.zarr in out_dir (and the same dataset again at `elsewhere`, outside it)."""
    cds = arrays_dataset(H, W, TILE, overlap=1, name="dem")
    orch.add_to_save_lists("dem.zarr", "hgt", cds, dtype="float32", nodata=-9999)
    if elsewhere is not None:
        orch.add_to_save_lists(str(elsewhere), "val", cds, dtype="float32", nodata=-9999)
    schedule(orch, cds, array_tile, profile_for(H, W), ("hgt", "val"))


def run(out: Path, elsewhere: Path | None = None) -> None:
    """One real run (sequential) to the end."""
    with Orchestrator(CONF, out_dir=str(out)) as orch:
        register(orch, elsewhere)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def records_key(product: Path) -> str:
    [block] = product.glob(f"{rec.META_GROUP}/tiles_*/c/0/0/0")
    return str(block.relative_to(product))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def kill_mid_write(how: str, root: Path, key: str) -> list[Path]:
    """SIGKILL a `killed_writer.py` rewriting ``root/key`` until it leaves temp files (a
    kill may land between a rename and the next temp file); returns them, after checking
    their names are those the writer's scheme gives."""
    target = root / key
    original = target.read_bytes()
    for _attempt in range(30):
        before = set(root.rglob("*.partial"))
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), how, str(root), key],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        try:
            word, pid, tid = proc.stdout.readline().split()
            assert word == "writing"
            time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        left = sorted(set(root.rglob("*.partial")) - before)
        if not left:
            continue
        if how == "own":  # one thread: one temp file, <target>.<pid>.<thread id>.partial
            assert left == [target.with_name(f"{target.name}.{pid}.{tid}.partial")]
        for temp in left:  # zarr's LocalStore: the target's suffix -> .<uuid4 hex>.partial
            pattern = rf"{re.escape(target.stem)}\.[0-9a-f]{{32}}\.partial"
            assert how == "own" or (
                temp.parent == target.parent and re.fullmatch(pattern, temp.name)
            )
        assert target.read_bytes() == original  # completed writes stored the same bytes
        return left
    pytest.fail(f"30 kills of a writer of {key} left no temp file")


def plant_user_files(product: Path) -> dict[str, bytes]:
    planted = {}
    for name in USER_FILES:
        path = product / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"kept: {name}".encode())
        planted[name] = path.read_bytes()
    return planted


def test_temp_names_are_the_writers_own(tmp_path):
    """The writer's names and the sweep's patterns come from one module: they agree."""
    name = os.path.basename(temp_path(str(tmp_path / "c" / "0")))
    assert is_temp_name(name) and OWN_TEMP.match(name)
    assert is_temp_name("zarr.0123456789abcdef0123456789abcdef.partial")
    assert ZARR_TEMP.match("0.0123456789abcdef0123456789abcdef.partial")
    for user in USER_FILES:
        assert not is_temp_name(user), user


def test_a_rerun_removes_what_killed_writers_left_and_nothing_else(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    run(reference)
    run(out)
    product = out / "dem.zarr"
    temps = [
        *kill_mid_write("own", product, "hgt/c/0/1"),  # a worker writing a chunk
        *kill_mid_write("own", product, records_key(product)),  # the main process, records
        *kill_mid_write("zarr", product, "zarr.json"),  # zarr writing the group's document
        *kill_mid_write("zarr", product, "hgt/c/1/0"),  # a chunk written through zarr
    ]
    user = plant_user_files(product)
    assert find_temp_files(str(product)) == sorted(str(t) for t in temps)

    run(out)

    assert not any(t.exists() for t in temps)
    assert find_temp_files(str(out)) == []
    got, want = files(product), files(reference / "dem.zarr")
    for name, content in user.items():
        assert got.pop(name) == content, f"{name} was changed"
    assert got.keys() == want.keys()
    # the group document (run id, dates) and the records (times) differ between any two runs
    records = records_key(product)
    for name in want.keys() - {"zarr.json", records}:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    store = zarr.storage.LocalStore(str(product), read_only=True)
    name = records.split("/")[1]
    assert rec.done_tiles(store, name) == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_only_first_use_inside_out_dir_is_swept(tmp_path):
    """A product this run already prepared may have live writers; one outside out_dir is
    not covered by the lease: their temp files stay."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere" / "dem2.zarr"
    run(out, elsewhere)
    [outside] = kill_mid_write("own", elsewhere, "val/c/0/0")
    with Orchestrator(CONF, out_dir=str(out)) as orch:
        register(orch, elsewhere)
        state = RunState()
        conf, registries = orch.get_conf(), orch.registries
        prepare_products(registries.ordered(), registries, conf, orch.out_location, "a", state)
        assert outside.exists()  # outside out_dir: never swept
        [inside] = kill_mid_write("own", out / "dem.zarr", "hgt/c/0/0")
        prepare_products(registries.ordered(), registries, conf, orch.out_location, "a", state)
        assert inside.exists()  # prepared before in this run: its writers may be live
        prepare_products(registries.ordered(), registries, conf, orch.out_location, "b", RunState())
        assert not inside.exists()  # a first use: swept
        assert outside.exists()
        orch.reset_registries()


def test_verify_lists_temp_files_and_repair_removes_the_stale_ones(tmp_path):
    out = tmp_path / "out"
    run(out)
    product = out / "dem.zarr"
    [old] = kill_mid_write("own", product, records_key(product))
    new = kill_mid_write("zarr", product, "hgt/zarr.json")
    stale = time.time() - 3600
    os.utime(old, (stale, stale))
    user = plant_user_files(product)

    report = verify_run(str(out))
    assert report.ok and report.checked == 4  # litter, not damage: no stray-record problem
    assert report.temp_files == sorted(str(t) for t in [old, *new])
    text = str(report)
    assert f"{1 + len(new)} temp file(s) left by killed writers (not damage" in text
    assert f"verify --repair {out}" in text and str(old) in text

    report = verify_run(str(out), repair=True)
    assert report.ok and report.repaired == []
    assert report.removed_temp_files == [str(old)]
    assert report.kept_temp_files == sorted(str(t) for t in new)  # less than a minute old
    assert "removed 1 temp file(s)" in str(report)
    assert f"kept {len(new)} temp file(s) written less than 60 s ago" in str(report)
    assert not old.exists() and all(t.exists() for t in new)
    assert {name: (product / name).read_bytes() for name in user} == user
    assert verify_run(str(out)).temp_files == sorted(str(t) for t in new)
