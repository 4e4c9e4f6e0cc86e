"""zarr_orch writing to S3 (a local moto_server) against a plain per-tile zarr loop.

Pipeline: a 4096x4096 float32 raster (64 MiB), a 3x3 mean per tile (benchmarks/tiles.py),
tiles of 512 and 1024 px, zarr's default codec (zstd), zarr's default async concurrency.
Cases, all writing to the same moto endpoint:
- plain: the main process creates the array, then computes each tile and writes it with
  ``array[window] = tile`` (timed from array creation to the last tile);
- zarr_orch in sequential and multiprocessing modes (2 workers): the whole breakpoint is
  timed (product + records creation, tasks, one chunk per tile + the records blocks,
  written at most every --floor seconds, metadata); Orchestrator construction (S3
  preflight, worker start) is setup.
Each case runs `--repeat` times into a fresh prefix; the table shows medians. MB/s counts
uncompressed bytes; ratio = plain wall / case wall (>= 1 is as fast as the plain loop);
record req/tile = store requests spent on completion records per tile (a read and a write
per block write, one open per product and breakpoint).

Run: python benchmarks/bench_s3.py [--size 4096] [--tiles 512 1024] [--repeat 3]
The moto_server of this Python environment is started on 127.0.0.1 and stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiles

from zarr_orch import Orchestrator
from zarr_orch.cluster.base import AbstractCluster
from zarr_orch.storage.format import records

HOST = "127.0.0.1"
KEY, SECRET = "benchkey", "benchsecret"


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """Start moto_server on a free loopback port; return the process and its endpoint."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.Popen(
        [exe, "-H", HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://{HOST}:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(400):
        try:
            with opener.open(f"{endpoint}/moto-api/", timeout=1):
                return proc, endpoint
        except OSError:
            time.sleep(0.05)
    stop_moto(proc)
    raise RuntimeError("moto_server did not start")


def stop_moto(proc: subprocess.Popen[bytes]) -> None:
    """Stop moto_server by its PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def windows(size: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Core windows (r0, r1, c0, c1) of every tile, row-major."""
    return [
        (r, min(r + tile, size), c, min(c + tile, size))
        for r in range(0, size, tile)
        for c in range(0, size, tile)
    ]


def case_plain(size: int, tile: int, url: str, options: dict[str, Any]) -> Callable[[], None]:
    """Plain loop: create the array, compute each tile here and write it as one chunk."""
    import zarr

    from zarr_orch.storage.format.product import compressors_for

    def run() -> None:
        array = zarr.create_array(
            url,
            shape=(size, size),
            chunks=(tile, tile),
            dtype="float32",
            fill_value=-9999,
            compressors=compressors_for("zstd"),
            storage_options=options,
        )
        for r0, r1, c0, c1 in windows(size, tile):
            array[r0:r1, c0:c1] = tiles.mean_tile(r0, r1, c0, c1, size, size)

    return run


def case_orch(mode: str, size: int, tile: int, url: str, options: dict[str, Any]):
    """zarr_orch: one saved dataset, one breakpoint (timed); construction is setup."""
    conf: dict[str, Any] = {"mode": mode, "progress": False, "storage_options": options}
    if mode == "multiprocessing":
        conf["nb_workers"] = 2
    orch = Orchestrator(conf, out_dir=url)
    # setup: a tiny breakpoint starts the workers, imports the task modules there and opens
    # their S3 connections (like the pool start the incumbents' benchmarks exclude)
    save_mean(orch, "warmup.zarr", 64, 32)

    def run() -> None:
        before = orch.stats["record_requests"]
        save_mean(orch, "mean.zarr", size, tile)
        run.record_requests = orch.stats["record_requests"] - before  # type: ignore[attr-defined]

    run.close = lambda: orch.__exit__(None, None, None)  # type: ignore[attr-defined]
    return run


save_mean = tiles.save_mean


def check(url: str, options: dict[str, Any], size: int, tile: int) -> None:
    """Read back three tiles and compare them with the tile function."""
    import zarr

    array = zarr.open_array(url, mode="r", storage_options=options)
    for r0, r1, c0, c1 in windows(size, tile)[:: max(1, len(windows(size, tile)) // 3)][:3]:
        np.testing.assert_array_equal(
            array[r0:r1, c0:c1], tiles.mean_tile(r0, r1, c0, c1, size, size)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tiles", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["sequential", "multiprocessing"])
    parser.add_argument(
        "--floor",
        type=float,
        default=None,
        help="seconds between two records writes on S3 (default: records.OBJECT_STORE_FLOOR)",
    )
    args = parser.parse_args()
    if args.floor is not None:
        records.OBJECT_STORE_FLOOR = args.floor
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    # one-time imports (xarray loads dask.array on its first Dataset) are not per-run costs
    tiles.orch_tile({"row_min": 0, "row_max": 4, "col_min": 0, "col_max": 4}, {}, (4, 4))
    proc, endpoint = start_moto()
    options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
    try:
        import s3fs

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(bucket)
        modes = [m for m in args.modes if m in AbstractCluster.modes()]
        rows = []
        mbytes = args.size * args.size * 4 / 1e6
        for tile in args.tiles:
            ntiles = len(windows(args.size, tile))
            walls: dict[str, list[float]] = {}
            requests: dict[str, list[int]] = {}
            for rep in range(args.repeat):
                for case in ["plain", *modes]:
                    prefix = f"s3://{bucket}/{case}-{tile}-{rep}"
                    if case == "plain":
                        url = f"{prefix}/mean.zarr/mean"
                        run = case_plain(args.size, tile, url, options)
                    else:
                        url = f"{prefix}/mean.zarr/mean"
                        run = case_orch(case, args.size, tile, prefix, options)
                    start = time.perf_counter()
                    run()
                    walls.setdefault(case, []).append(time.perf_counter() - start)
                    requests.setdefault(case, []).append(getattr(run, "record_requests", 0))
                    if hasattr(run, "close"):
                        run.close()
                    check(url, options, args.size, tile)
                    s3fs.S3FileSystem(skip_instance_cache=True, **options).rm(
                        f"{bucket}/{case}-{tile}-{rep}", recursive=True
                    )
            plain = statistics.median(walls["plain"])
            for case, values in walls.items():
                wall = statistics.median(values)
                rows.append(
                    (
                        case,
                        tile,
                        ntiles,
                        wall,
                        mbytes / wall,
                        wall / ntiles * 1000,
                        plain / wall,
                        min(values),
                        max(values),
                        statistics.median(requests[case]) / ntiles,
                    )
                )
        print(
            f"\nS3 (moto_server on {HOST}), {args.size}x{args.size} float32 "
            f"({mbytes:.0f} MB), zstd, medians of {args.repeat} runs, records floor "
            f"{records.OBJECT_STORE_FLOOR} s\n"
        )
        print(
            "| case | tile | tiles | wall s (min-max) | MB/s | ms/tile | ratio vs plain "
            "| record req/tile |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for case, tile, ntiles, wall, mbs, ms, ratio, lo, hi, req in rows:
            print(
                f"| {case} | {tile} | {ntiles} | {wall:.2f} ({lo:.2f}-{hi:.2f}) | {mbs:.0f} "
                f"| {ms:.1f} | {ratio:.2f}x | {req:.2f} |"
            )
    finally:
        stop_moto(proc)


if __name__ == "__main__":
    main()
