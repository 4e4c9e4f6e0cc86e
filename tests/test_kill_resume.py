"""Crash and rerun: SIGKILL the main process (or a worker) of a real multiprocessing run.

Every trial kills `tests/kill_pipeline.py` (256 tiles per stage, a breakpoint between the
stages) at a seeded random moment — during stage 1, between the stages or during stage 2 —
checks what is on disk right after the kill (every completion record has its data, nothing
torn, no orphan worker), reruns to completion and compares every product with an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from zarr_orch.storage.format import records as rec

PIPELINE = Path(__file__).with_name("kill_pipeline.py")
ROOT = Path(__file__).resolve().parents[1]
TILES = 256  # 512 px / 32 px tiles, squared
PRODUCTS = {"stage1.zarr": ["v"], "stage2.zarr": ["mean", "pos"]}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def start(out: Path | str, counter: Path, *extra: str) -> subprocess.Popen[str]:
    """Start the pipeline as a subprocess (its stdout carries the stage markers)."""
    counter.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(PIPELINE), str(out), "--counter", str(counter), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def run(out: Path | str, counter: Path, *extra: str, timeout: float = 180) -> str:
    """Run the pipeline to completion; fail the test with its stderr otherwise."""
    proc = start(out, counter, *extra)
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"pipeline failed ({proc.returncode}):\n{stderr[-4000:]}"
    assert "ALL_DONE" in stdout
    return stderr


def recorded_in(store) -> set[tuple[int, int]]:
    """Tiles recorded done in the product at `store` (empty while it is being created)."""
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
        names = (group.attrs.get("zarr_orch") or {}).get("records") or []
    except (FileNotFoundError, KeyError, ValueError):
        return set()
    done: set[tuple[int, int]] = set()
    for name in names:
        done |= rec.done_tiles(store, name)
    return done


def done_tiles(out: Path, product: str) -> set[tuple[int, int]]:
    return recorded_in(zarr.storage.LocalStore(str(out / product), read_only=True))


def read_products(out: Path) -> dict[str, np.ndarray]:
    """Decoded arrays of every product (reading every chunk: a torn chunk would raise)."""
    arrays = {}
    for product, tags in PRODUCTS.items():
        group = zarr.open_group(str(out / product), mode="r")
        for tag in tags:
            arrays[f"{product}/{tag}"] = group[tag][...]
    return arrays


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Products of an uninterrupted run (sequential mode: same results, faster start)."""
    out = tmp_path_factory.mktemp("reference")
    run(out / "run", out / "counter", "--mode", "sequential")
    return read_products(out / "run")


def check_records_have_data(out: Path, reference: dict[str, np.ndarray]) -> int:
    """Every tile recorded as done holds exactly the reference data. Returns how many."""
    total = 0
    for product, tags in PRODUCTS.items():
        if not (out / product / "zarr.json").exists():
            continue
        group = zarr.open_group(str(out / product), mode="r")
        for row, col in done_tiles(out, product):
            r0, c0 = row * 32, col * 32
            for tag in tags:
                assert tag in group, f"{product} records tile ({row}, {col}) but has no {tag}"
                got = group[tag][r0 : r0 + 32, c0 : c0 + 32]
                want = reference[f"{product}/{tag}"][r0 : r0 + 32, c0 : c0 + 32]
                np.testing.assert_array_equal(got, want, err_msg=f"{product}/{tag} ({row},{col})")
            total += 1
    return total


def workers_of(pid: int) -> list[psutil.Process]:
    """Every descendant process of `pid` (forkserver, workers, resource tracker)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def worker_processes(pid: int) -> list[psutil.Process]:
    """The worker processes among `pid`'s descendants: forked by it at start-up (mp_mode
    "auto") or by its forkserver; not the forkserver or the resource tracker."""
    found = []
    for child in workers_of(pid):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver" not in cmdline and "resource_tracker" not in cmdline:
            found.append(child)
    return found


def assert_no_orphans(processes: list[psutil.Process], timeout: float = 15.0) -> None:
    """The killed run's worker processes all exit on their own (they watch their parent)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:
        proc.kill()
    assert not alive, f"orphan processes left behind: {[p.pid for p in alive]}"


def wait_until(predicate, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"pipeline ended before the kill: {proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    raise AssertionError("kill moment never came")


def kill_main(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    children = workers_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    return children


TRIALS = [  # (moment, fraction of the stage's tiles done before the kill)
    ("stage1", None),
    ("stage1", None),
    ("stage1", None),
    ("between", None),
    ("stage2", None),
    ("stage2", None),
    ("stage2", None),
    ("stage1", None),
    ("between", None),
    ("stage2", None),
]


@pytest.mark.parametrize("trial", range(len(TRIALS)))
def test_sigkill_main_process_then_rerun(trial, tmp_path, reference):
    rng = random.Random(20261125 + trial)
    moment, _ = TRIALS[trial]
    fraction = rng.uniform(0.05, 0.95)
    out = tmp_path / "run"
    proc = start(out, tmp_path / "counter1", "--sleep", "0.004")
    if moment == "between":
        line = ""
        while "STAGE1_DONE" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "pipeline ended early"
    else:
        product = "stage1.zarr" if moment == "stage1" else "stage2.zarr"
        target = max(1, int(fraction * TILES))
        wait_until(lambda: len(done_tiles(out, product)) >= target, proc)
    children = kill_main(proc)
    assert_no_orphans(children)
    recorded = check_records_have_data(out, reference)
    missing = 2 * TILES - recorded

    counter = tmp_path / "counter2"
    run(out, counter)
    executed = len(list(counter.iterdir()))
    # the rerun executes exactly the tiles that had no completion record
    assert executed == missing, f"{moment} at {fraction:.2f}: {executed} run, {missing} missing"
    got = read_products(out)
    for name, want in reference.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert not (out / ".zarr_orch.lease.json").exists()


def test_sigkill_a_worker_is_retried(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, tmp_path / "counter", "--sleep", "0.01")
    wait_until(lambda: len(done_tiles(out, "stage1.zarr")) >= 40, proc)
    victims = worker_processes(proc.pid)
    assert victims, "no worker process found"
    victims[0].kill()
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    got = read_products(out)
    for name, want in reference.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_rerun_of_finished_job_executes_nothing(tmp_path, reference):
    out = tmp_path / "run"
    run(out, tmp_path / "c1", "--mode", "sequential")
    counter = tmp_path / "c2"
    run(out, counter)
    assert list(counter.iterdir()) == []
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["zarr_orch"]["stats"]["resumed"] == 2 * TILES
    assert meta["zarr_orch"]["stats"]["tiles"] == 0


def test_failed_tile_then_fixed_input_recomputes_only_that_tile(tmp_path, reference):
    out = tmp_path / "run"
    marker = tmp_path / "broken"
    marker.write_text("the input of tile (3, 5) is broken")
    proc = start(out, tmp_path / "c1", "--mode", "sequential", "--fail-tile", f"3,5,{marker}")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "tile (row=3, col=5) of stage1" in stderr and "is broken" in stderr
    assert len(done_tiles(out, "stage1.zarr")) == TILES - 1
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["zarr_orch"]["failed_tiles"][0]["row"] == 3
    marker.unlink()  # the user fixes the input
    counter = tmp_path / "c2"
    run(out, counter, "--mode", "sequential", "--fail-tile", f"3,5,{marker}")
    executed = sorted(p.name.rsplit("_", 1)[0] for p in counter.iterdir())
    assert executed.count("s1_3_5") == 1 and len([e for e in executed if e.startswith("s1")]) == 1
    assert len([e for e in executed if e.startswith("s2")]) == TILES
    got = read_products(out)
    for name, want in reference.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def _interrupt(proc: subprocess.Popen[str], out: Path, signum: int, at_least: int) -> tuple:
    wait_until(lambda: len(done_tiles(out, "stage1.zarr")) >= at_least, proc)
    children = workers_of(proc.pid)
    os.kill(proc.pid, signum)
    start_wait = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr, children, time.monotonic() - start_wait


def test_sigint_stops_cleanly_and_rerun_resumes(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, tmp_path / "c1", "--sleep", "0.01")
    code, stderr, children, _ = _interrupt(proc, out, signal.SIGINT, 60)
    # Python dies of SIGINT on an uncaught KeyboardInterrupt: shells report 130
    assert code in (130, -signal.SIGINT), stderr[-2000:]
    lines = [line for line in stderr.splitlines() if "interrupted by SIGINT" in line]
    assert lines and "Run the same command again to resume" in lines[0]
    assert_no_orphans(children)
    check_records_have_data(out, reference)
    assert not (out / ".zarr_orch.lease.json").exists()
    log = next((out / "logs").glob("run-*.log")).read_text()
    assert "interrupted by SIGINT" in log and "versions:" in log
    run(out, tmp_path / "c2")
    got = read_products(out)
    for name, want in reference.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_sigterm_stops_cleanly(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, tmp_path / "c1", "--sleep", "0.01")
    code, stderr, children, _ = _interrupt(proc, out, signal.SIGTERM, 60)
    assert code in (143, -signal.SIGTERM), stderr[-2000:]
    assert "interrupted by SIGTERM" in stderr
    assert_no_orphans(children)
    check_records_have_data(out, reference)


def test_second_ctrl_c_stops_at_once(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, tmp_path / "c1", "--sleep", "3", "--workers", "2")
    wait_until(lambda: len(worker_processes(proc.pid)) >= 2, proc)
    time.sleep(1.0)  # both workers are inside a 3 s task
    children = workers_of(proc.pid)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < 2.5, "the second Ctrl-C did not stop at once"
    assert "stopped at once" in stderr
    assert_no_orphans(children)
    check_records_have_data(out, reference)


@pytest.mark.parametrize("moment", ["stage1", "stage2"])
def test_sigkill_main_process_on_s3_then_rerun(moment, tmp_path, reference, moto_server):
    """The same crash-and-rerun on the S3 test endpoint (moto_server on 127.0.0.1)."""
    options = moto_server.options()
    out = f"s3://{moto_server.make_bucket()}/run"
    extra = ("--storage-options", json.dumps(options), "--sleep", "0.004")

    def recorded(product: str) -> set[tuple[int, int]]:
        store = zarr.storage.FsspecStore.from_url(
            f"{out}/{product}", storage_options={**options, "skip_instance_cache": True}
        )
        return recorded_in(store)

    proc = start(out, tmp_path / "c1", *extra)
    product = "stage1.zarr" if moment == "stage1" else "stage2.zarr"
    target = int(random.Random(moment).uniform(0.2, 0.8) * TILES)
    wait_until(lambda: len(recorded(product)) >= target, proc, timeout=240)
    assert_no_orphans(kill_main(proc))
    missing = 2 * TILES - len(recorded("stage1.zarr")) - len(recorded("stage2.zarr"))
    counter = tmp_path / "c2"
    run(out, counter, *extra, timeout=300)
    assert len(list(counter.iterdir())) == missing
    for name, want in reference.items():
        product_name, tag = name.split("/")
        store = zarr.storage.FsspecStore.from_url(f"{out}/{product_name}", storage_options=options)
        got = zarr.open_group(store, mode="r")[tag][...]
        np.testing.assert_array_equal(got, want, err_msg=name)
