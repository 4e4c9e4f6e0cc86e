"""A kill loses only the tiles in flight: repeated SIGKILLs of a real multiprocessing run.

`tests/kill_pipeline.py` (2 stages of 256 tiles of 32 px, ~10 ms each, 2 worker
processes) is started in its own process group and the whole group is SIGKILLed at seeded
random moments, again and again, then run to completion. Every task execution of every run
leaves a file in one counter directory, so the test counts the work a kill threw away:
completion records are written as soon as the previous record write ends (group commit),
so each kill may only lose the tiles in flight, not a second's worth of finished tiles.
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

import numpy as np
import pytest
import zarr

from zarr_orch.storage.core.atomic_files import find_temp_files

PIPELINE = Path(__file__).with_name("kill_pipeline.py")
ROOT = Path(__file__).resolve().parents[1]
TILES = 2 * 256  # two stages of 256 tiles (512 px rasters, 32 px tiles)
#: tiles a kill may waste: the 4 in flight (2 workers, 2 tasks each) and the receipts and
#: records on their way to the store at that moment
WASTE_PER_KILL = 16
PRODUCTS = {"stage1.zarr": ["v"], "stage2.zarr": ["mean", "pos"]}
TILE_ARGS = ("--size", "512", "--tile", "32", "--workers", "2", "--sleep", "0.01")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def _start(out: str, counter: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The pipeline as the leader of its own process group (workers and forkserver in it)."""
    return subprocess.Popen(
        [sys.executable, str(PIPELINE), out, "--counter", str(counter), *TILE_ARGS, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        start_new_session=True,
    )


def _executions(counter: Path) -> int:
    return len(list(counter.iterdir()))


def _kill_group_after(
    proc: subprocess.Popen[bytes], counter: Path, executions: int, delay: float
) -> None:
    """SIGKILL the run's whole process group once it has started `executions` more tasks
    (then `delay` seconds more): a random moment inside a running stage."""
    target = _executions(counter) + executions
    while _executions(counter) < target and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):  # the run had already finished
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def _run_to_end(out: str, counter: Path, *extra: str) -> None:
    proc = _start(out, counter, *extra)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]


def _kill_and_finish(
    out: str, tmp_path: Path, kills: int, seed: int, *extra: str
) -> tuple[int, list[int]]:
    """`kills` seeded group kills, each after 10-60 task starts and 0-50 ms; then a run to
    the end and a rerun. Returns (task executions in all, executions per killed run).

    The rerun of the finished job must execute nothing.
    """
    rng = random.Random(seed)
    counter = tmp_path / "counter"
    counter.mkdir()
    per_kill = []
    for _ in range(kills):
        before = _executions(counter)
        proc = _start(out, counter, *extra)
        _kill_group_after(proc, counter, rng.randint(10, 60), rng.uniform(0.0, 0.05))
        per_kill.append(_executions(counter) - before)
    _run_to_end(out, counter, *extra)
    total = _executions(counter)
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    _run_to_end(out, rerun, *extra)
    assert _executions(rerun) == 0, "the rerun of a finished job executed tasks"
    return total, per_kill


def _chunk_files(group: zarr.Group, tag: str) -> dict[str, bytes]:
    """Every stored chunk of a tag: key -> encoded bytes."""
    store = group.store
    prefix = f"{group.path}/{tag}/c/" if group.path else f"{tag}/c/"

    async def collect() -> dict[str, bytes]:
        from zarr.core.buffer import default_buffer_prototype

        found = {}
        async for key in store.list_prefix(prefix):
            buf = await store.get(key, prototype=default_buffer_prototype())
            found[key] = buf.to_bytes()
        return found

    from zarr.core.sync import sync

    return sync(collect())


def _products(open_group) -> dict[str, tuple[np.ndarray, dict[str, bytes]]]:
    """Decoded arrays and encoded chunks of every tag of both products."""
    result = {}
    for product, tags in PRODUCTS.items():
        group = open_group(product)
        for tag in tags:
            result[f"{product}/{tag}"] = (group[tag][...], _chunk_files(group, tag))
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The products of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    counter = out.parent / "counter"
    counter.mkdir()
    _run_to_end(str(out), counter)
    assert _executions(counter) == TILES
    return _products(lambda product: zarr.open_group(str(out / product), mode="r"))


def _assert_identical(got: dict, want: dict) -> None:
    for name, (array, chunks) in want.items():
        np.testing.assert_array_equal(got[name][0], array, err_msg=name)
        assert got[name][1] == chunks, f"{name}: stored chunks differ from the reference"


def test_ten_group_kills_waste_only_the_tiles_in_flight(tmp_path, reference):
    out = tmp_path / "run"
    total, per_kill = _kill_and_finish(str(out), tmp_path, 10, 20261201)
    assert total <= TILES + WASTE_PER_KILL * len(per_kill), (
        f"{total} task executions for {TILES} tiles after {len(per_kill)} kills "
        f"(executions per killed run: {per_kill})"
    )
    # kills cut writes: the final runs removed their temp files (else the chunk keys differ)
    assert [find_temp_files(str(out / product)) for product in PRODUCTS] == [[]] * len(PRODUCTS)
    _assert_identical(
        _products(lambda product: zarr.open_group(str(out / product), mode="r")), reference
    )
    stats = json.loads((out / "metadata.json").read_text())["zarr_orch"]["stats"]
    assert stats["tiles"] == 0 and stats["resumed"] == TILES  # the last run: all resumed


def test_group_kills_on_s3_waste_only_the_tiles_in_flight(tmp_path, reference, moto_server):
    options = moto_server.options()
    out = f"s3://{moto_server.make_bucket()}/run"
    extra = ("--storage-options", json.dumps(options))
    total, per_kill = _kill_and_finish(out, tmp_path, 3, 20261202, *extra)
    assert total <= TILES + WASTE_PER_KILL * len(per_kill), (
        f"{total} task executions for {TILES} tiles after {len(per_kill)} kills "
        f"(executions per killed run: {per_kill})"
    )

    def open_remote(product: str) -> zarr.Group:
        store = zarr.storage.FsspecStore.from_url(
            f"{out}/{product}", storage_options=options, read_only=True
        )
        return zarr.open_group(store, mode="r")

    _assert_identical(_products(open_remote), reference)
