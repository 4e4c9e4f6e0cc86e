"""SIGKILL in the middle of a windowed merge stage, then rerun: byte-identical products.

`windowed_tasks.py` merges overlapping tiles through a final_function (weighted mean, sums,
boolean or): merging a tile twice would count it twice. Each trial kills the run's main
process (the single writer) at a seeded moment: when the merge journal's manifest appears
for the k-th time (a merge half-applied) or after a seeded delay, checks what is on disk
(the recorded tiles are a prefix of the tile order), reruns to completion and compares
every stored chunk, byte for byte, with an uninterrupted run (the same keys too: the rerun
deletes the temp file a write cut by the kill leaves among the chunks). Kills land between
commits of single tiles and of batches of tiles (`merge_commit_seconds`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zarr

from zarr_orch.storage.core.atomic_files import find_temp_files
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.journal import MANIFEST

PIPELINE = Path(__file__).with_name("windowed_tasks.py")
ROOT = Path(__file__).resolve().parents[1]
TILES = 20
#: product -> its tags (the final_function merging val reads weights.zarr's weights)
PRODUCTS = {"merged.zarr": ("val", "count"), "weights.zarr": ("weight",), "seen.zarr": ("seen",)}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def start(
    out: Path, mode: str, commit_seconds: float = 0.0, sleep: float = 0.0
) -> subprocess.Popen[str]:
    """The pipeline; `commit_seconds` 0 commits every tile's merge alone (a journal per
    tile, so kills land between many commits), more batches them (`merge_batch`)."""
    command = [sys.executable, str(PIPELINE), str(out), "--mode", mode, "--tiles", str(TILES)]
    command += ["--commit-seconds", str(commit_seconds), "--sleep", str(sleep)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def run(out: Path, mode: str, commit_seconds: float = 0.0) -> None:
    proc = start(out, mode, commit_seconds)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"pipeline failed ({proc.returncode}):\n{stderr[-4000:]}"
    assert "ALL_DONE" in stdout


def chunk_bytes(out: Path) -> dict[str, bytes]:
    """Every stored chunk of the data arrays of every product (raw, encoded bytes)."""
    result = {}
    for product, tags in PRODUCTS.items():
        for tag in tags:
            for path in sorted((out / product / tag / "c").rglob("*")):
                if path.is_file():
                    result[str(path.relative_to(out))] = path.read_bytes()
    return result


def recorded(product: Path) -> set[tuple[int, int]]:
    store = zarr.storage.LocalStore(str(product), read_only=True)
    try:
        names = zarr.open_group(store, mode="r").attrs["zarr_orch"]["records"]
    except (FileNotFoundError, KeyError):
        return set()
    return set().union(*(rec.done_tiles(store, name) for name in names))


def recorded_everywhere(out: Path) -> set[tuple[int, int]]:
    """The tiles whose merge is committed, checking that every product records them (a
    commit is one transaction over all products): only the tiles of a journaled,
    unfinished commit may be recorded by some products (the rerun rolls them back)."""
    sets = [recorded(out / product) for product in PRODUCTS]
    manifest = out / "merged.zarr" / MANIFEST
    pending = (
        {tuple(tile) for tile in json.loads(manifest.read_text())["tiles"]}
        if manifest.exists()
        else set()
    )
    committed = set.union(*sets) - pending
    for product, tiles in zip(PRODUCTS, sets, strict=True):
        assert tiles - pending == committed, f"{product} disagrees: {sorted(tiles)}"
    return committed


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("windowed_reference") / "run"
    run(out, "sequential")
    return chunk_bytes(out)


def kill_at_merge(proc: subprocess.Popen[str], manifest: Path, nth: int, limit: float) -> bool:
    """SIGKILL `proc` when the journal manifest appears for the `nth` time (or at `limit`
    seconds); True when the manifest was still there after the kill (a half-applied merge)."""
    seen, present, deadline = 0, False, time.monotonic() + limit
    children: list[psutil.Process] = []
    listed = 0.0
    while proc.poll() is None and time.monotonic() < deadline:
        now = manifest.exists()
        if now and not present:
            seen += 1
            if seen >= nth:
                break
        present = now
        if time.monotonic() - listed > 0.2:  # the run's own workers, to reap them later
            listed = time.monotonic()
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.0002)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    for child in children:  # by pid: only processes this test started
        try:
            child.wait(timeout=10)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return manifest.exists()


@pytest.mark.parametrize("trial", range(4))
def test_killed_merge_resumes_byte_identical(tmp_path, reference, trial):
    """Trials 0-1 commit every tile alone; 2-3 batch commits (tiles sleep 0.1 s, a commit
    at most 0.15 s after its first tile: batches of 2-4 tiles), killed at a seeded commit."""
    rng = random.Random(1100 + trial)
    mode = "multiprocessing" if trial % 2 else "sequential"
    batched = trial >= 2
    out = tmp_path / "run"
    seconds = 0.15 if batched else 0.0
    proc = start(out, mode, seconds, sleep=0.1 if batched else 0.0)
    manifest = out / "merged.zarr" / MANIFEST
    nth = rng.randint(1, 3) if batched else rng.randint(2, TILES - 4)
    half_applied = kill_at_merge(proc, manifest, nth, limit=120)
    done = recorded_everywhere(out)
    # merges are applied in tile order: the recorded tiles are always a prefix of it
    assert done == {(0, col) for col in range(len(done))}
    assert len(done) < TILES, "the run finished before the kill: nothing was tested"
    run(out, mode, seconds)
    assert not manifest.exists()
    assert recorded_everywhere(out) == {(0, col) for col in range(TILES)}
    # the kill may have left a writer's temp file among the chunks: the rerun removed it
    assert [find_temp_files(str(out / product)) for product in PRODUCTS] == [[]] * len(PRODUCTS)
    got = chunk_bytes(out)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert got[key] == value, f"{key} differs after resume (half-applied: {half_applied})"


def test_a_kill_lands_inside_a_merge(tmp_path, reference):
    """At least one seeded kill finds the journal manifest: a merge really was cut."""
    hits = 0
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        proc = start(out, "sequential")
        if kill_at_merge(proc, out / "merged.zarr" / MANIFEST, 3 + trial * 4, limit=120):
            hits += 1
            run(out, "sequential")
            assert chunk_bytes(out) == reference
            break
    assert hits >= 1
