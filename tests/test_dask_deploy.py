"""`mode: dask` against a cluster started the way clusters start: the `dask` command line.

A `dask scheduler` and two `dask worker` processes (no nanny, one thread each) run on
127.0.0.1 from the venv's entry point, the workers importing this worktree and the test
task modules through PYTHONPATH. The CARS-style two-stage app writes to moto_server S3; one
worker process is SIGKILLed in the middle of stage 2. The products must be complete and
byte-identical to a sequential run on local disk, and zarr_orch must have closed only its
own client: the scheduler and the surviving worker still run tasks afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cars_app
import pytest
import s3fs
from s3_server import SAFE_ENV

from zarr_orch import Orchestrator
from zarr_orch.progress import Callback

pytest.importorskip("distributed")

SIZE, TILE = (400, 600), (64, 96)  # 7 x 7 tiles per stage, ragged last row and column
TAGS = {"stage1.zarr": ["hgt"], "stage2.zarr": ["mean", "mask", "bands"]}
DASK = Path(sys.executable).parent / "dask"
WORKTREE = Path(__file__).resolve().parents[1]


def _env(with_code: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DASK_"))}
    env.update(SAFE_ENV)
    if with_code:  # workers import zarr_orch from this worktree and the test task modules
        env["PYTHONPATH"] = os.pathsep.join([str(WORKTREE), str(WORKTREE / "tests")])
    else:  # the scheduler needs no user code: task specs are builtins around a payload
        env.pop("PYTHONPATH", None)
    return env


class DaskCLICluster:
    """A scheduler and workers started from the `dask` entry point; stopped by their PIDs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.scheduler_file = tmp / "scheduler.json"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], name: str, with_code: bool) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        try:
            return subprocess.Popen(
                [str(DASK), *args], stdout=log, stderr=subprocess.STDOUT, env=_env(with_code)
            )
        finally:
            log.close()

    def start(self, nb_workers: int = 2) -> None:
        self.scheduler = self._spawn(
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(self.scheduler_file),
            ],
            "scheduler",
            with_code=False,
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            assert self.scheduler.poll() is None, (self.tmp / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the scheduler did not write its file"
            time.sleep(0.1)
        for i in range(nb_workers):
            self.workers.append(
                self._spawn(
                    [
                        "worker",
                        "--scheduler-file",
                        str(self.scheduler_file),
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        "1",
                        "--no-nanny",
                        "--no-dashboard",
                        "--memory-limit",
                        "1GiB",
                        "--name",
                        f"w{i}",
                    ],
                    f"worker{i}",
                    with_code=True,
                )
            )
        from distributed import Client

        with Client(scheduler_file=str(self.scheduler_file), timeout=60) as client:
            client.wait_for_workers(nb_workers, timeout=120)

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.scheduler, *self.workers] if p is not None]

    def stop(self) -> None:
        for process in self.processes():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


@pytest.fixture
def cli_cluster(tmp_path: Path, moto_server: Any) -> Iterator[DaskCLICluster]:
    """Scheduler + 2 workers from the command line (after moto_server set a safe env)."""
    if not DASK.exists():
        pytest.skip(f"no dask entry point at {DASK}")
    cluster = DaskCLICluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.processes())


class KillWorkerMidStage(Callback):
    """SIGKILLs one worker process once `after` tiles of stage 2 are done."""

    def __init__(self, process: subprocess.Popen[bytes], after: int) -> None:
        self.process, self.after, self.done, self.killed_at = process, after, 0, None

    def on_tile_done(self, dataset: str, row: int, col: int, nbytes: int, seconds: float) -> None:
        if dataset != "stage2":
            return
        self.done += 1
        if self.done == self.after:
            os.kill(self.process.pid, signal.SIGKILL)
            self.killed_at = self.done


def chunk_bytes_local(out: Path) -> dict[str, bytes]:
    found = {}
    for product, tags in TAGS.items():
        for tag in tags:
            for path in sorted((out / product / tag / "c").rglob("*")):
                if path.is_file():
                    found[str(path.relative_to(out))] = path.read_bytes()
    return found


def chunk_bytes_s3(fs: s3fs.S3FileSystem, root: str) -> dict[str, bytes]:
    found = {}
    for product, tags in TAGS.items():
        for tag in tags:
            for key in sorted(fs.find(f"{root}/{product}/{tag}/c")):
                found[key[len(root) + 1 :]] = fs.cat_file(key)
    return found


def test_dask_cli_cluster_survives_a_worker_kill_and_products_match_sequential(
    cli_cluster: DaskCLICluster, moto_server: Any, s3_bucket: str, s3_options: dict, tmp_path: Path
) -> None:
    local = tmp_path / "sequential"
    with Orchestrator({"mode": "sequential", "progress": False}, out_dir=local) as orch:
        cars_app.run_pipeline(orch, tile=TILE, size=SIZE)

    url = f"s3://{s3_bucket}/run"
    conf = {
        "mode": "dask",
        "address": cli_cluster.address,
        "progress": False,
        "storage_options": s3_options,
    }
    killer = KillWorkerMidStage(cli_cluster.workers[1], after=10)
    with Orchestrator(conf, out_dir=url) as orch:
        orch.add_callback(killer)
        cars_app.run_pipeline(orch, tile=TILE, size=SIZE)
        products = dict(orch.products)
    assert killer.killed_at == 10
    assert cli_cluster.workers[1].wait(timeout=30) == -signal.SIGKILL

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    root = f"{s3_bucket}/run"
    expected = chunk_bytes_local(local)
    assert len(expected) == 4 * 7 * 7  # every tile of every tag has its chunk
    assert chunk_bytes_s3(fs, root) == expected
    meta = json.loads(fs.cat_file(f"{root}/metadata.json"))
    for name in ("stage1.tif", "stage2.tif"):
        assert meta["zarr_orch"]["products"][name]["tiles_done"] == 49
    assert products["stage2.tif"] == f"{url}/stage2.zarr"

    # zarr_orch closed its client only: the scheduler and the other worker still work
    assert cli_cluster.scheduler.poll() is None and cli_cluster.workers[0].poll() is None
    from distributed import Client

    with Client(cli_cluster.address, timeout=30) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        mine = client.id
        others = client.run_on_scheduler(
            lambda dask_scheduler: sorted(set(dask_scheduler.clients) - {mine, "fire-and-forget"})
        )
        assert others == []  # zarr_orch's client is gone
