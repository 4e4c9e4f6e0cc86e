"""Throughput of zarr_orch against the incumbents, measured side by side in one process.

Pipeline: an 8192x8192 float32 raster (256 MiB), a 3x3 mean per tile, tiles of 1024 and
256 px, codecs zstd (zarr's default) and none, 2 workers. Cases:
- zarr_orch in sequential, multiprocessing and local_dask modes, and `mode: dask` against
  an already running LocalCluster (2 workers, 1 thread each, like the distributed baseline),
- dask `map_blocks(...).to_zarr` with the threaded scheduler and with a distributed
  LocalCluster(2 workers),
- an xarray `to_zarr(region=...)` loop and a plain per-tile zarr write loop (main process).
Each case runs `--repeat` times (median reported); MB/s counts uncompressed bytes; ovh
ms/tile = (wall - serial compute time / workers) / tiles; peak RSS is this process's peak
above its RSS at the case start (sampled every 5 ms); record req/tile = store requests spent
on completion records per tile (zarr_orch cases).

Run: python benchmarks/bench_parallel.py [--size 8192] [--repeat 3] [--big] [--graph]
`--big` adds the memory case: a 4 GiB saved-only raster (32768^2 float32, tile 1024) in
multiprocessing and local_dask, whose main-process peak RSS must stay <= 300 MiB.
`--graph` runs the demo in local_dask at 2048 and 4096 px and prints the bytes of every
graph sent to the scheduler, as distributed itself counts them (its large-graph warning
lowered to 1 byte; zarr_orch keeps those warnings in the run log).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiles

import zarr_orch
from zarr_orch import CarsDataset, Orchestrator
from zarr_orch.cluster.base import AbstractCluster
from zarr_orch.data.tiling import window_array_to_dict


class PeakRSS:
    """Samples this process's RSS in a thread; `peak` is the max above the start value."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def compressors(codec: str) -> Any:
    return None if codec == "none" else "auto"


# -- cases ----------------------------------------------------------------------------------------


def case_zarr_orch(mode: str, size: int, tile: int, codec: str, out: str) -> Callable[[], None]:
    conf: dict[str, Any] = {"mode": mode, "codec": codec, "progress": False}
    cluster = None
    if mode == "dask":  # someone else's running cluster, configured like the baseline's
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        conf["address"] = cluster.scheduler_address
    elif mode != "sequential":
        conf["nb_workers"] = 2
    orch = Orchestrator(conf, out_dir=out)  # cluster start is setup, not measured
    warm_up(orch)

    def run() -> None:
        before = orch.stats["record_requests"]
        tiles.save_mean(orch, "mean.zarr", size, tile)
        run.record_requests = orch.stats["record_requests"] - before  # type: ignore[attr-defined]

    def close() -> None:
        orch.__exit__(None, None, None)
        if cluster is not None:
            cluster.close()

    run.close = close  # type: ignore[attr-defined]
    return run


def warm_up(orch: Orchestrator) -> None:
    """Setup, not measured: start the workers and import the task module in each of them.

    The dask-distributed case likewise starts its LocalCluster before timing.
    """
    ds = CarsDataset("arrays", name="warm-up")
    ds.tiling_grid = zarr_orch.generate_tiling_grid(0, 0, 64, 64, 32, 32)
    orch.add_to_compute_lists(ds)
    [info] = orch.get_saving_infos([ds])
    task = orch.cluster.create_task(tiles.orch_tile)
    for r in range(2):
        for c in range(2):
            ds[r, c] = task(
                window_array_to_dict(ds.tiling_grid[r, c]),
                zarr_orch.update_saving_infos(info, row=r, col=c),
                (64, 64),
            )
    orch.breakpoint()


def case_dask(scheduler: str, size: int, tile: int, codec: str, out: str) -> Callable[[], None]:
    import dask
    import dask.array as da

    client = None
    if scheduler == "distributed":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)

    def run() -> None:
        import zarr

        arr = zarr.create_array(
            os.path.join(out, "mean.zarr"),
            shape=(size, size),
            chunks=(tile, tile),
            dtype="float32",
            compressors=compressors(codec),
            overwrite=True,
        )
        src = da.empty((size, size), chunks=(tile, tile), dtype="float32")
        result = src.map_blocks(tiles.block_tile, shape=(size, size), dtype="float32")
        if client is None:
            with dask.config.set(scheduler="threads", num_workers=2):
                da.to_zarr(result, arr)
        else:
            da.to_zarr(result, arr)

    def close() -> None:
        if client is not None:
            cluster = client.cluster
            client.close()
            cluster.close()

    run.close = close  # type: ignore[attr-defined]
    return run


def case_xarray_region(size: int, tile: int, codec: str, out: str) -> Callable[[], None]:
    import dask.array as da
    import xarray as xr

    def run() -> None:
        path = os.path.join(out, "mean.zarr")
        template = xr.Dataset(
            {"mean": (("row", "col"), da.zeros((size, size), chunks=(tile, tile), dtype="float32"))}
        )
        encoding = {"mean": {"chunks": (tile, tile), "compressors": compressors(codec)}}
        template.to_zarr(
            path, compute=False, mode="w", zarr_format=3, consolidated=False, encoding=encoding
        )
        for r0 in range(0, size, tile):
            for c0 in range(0, size, tile):
                r1, c1 = min(r0 + tile, size), min(c0 + tile, size)
                values = tiles.mean_tile(r0, r1, c0, c1, size, size)
                xr.Dataset({"mean": (("row", "col"), values)}).to_zarr(
                    path,
                    region={"row": slice(r0, r1), "col": slice(c0, c1)},
                    zarr_format=3,
                    consolidated=False,
                )

    run.close = lambda: None  # type: ignore[attr-defined]
    return run


def case_zarr_loop(size: int, tile: int, codec: str, out: str) -> Callable[[], None]:
    import zarr

    def run() -> None:
        arr = zarr.create_array(
            os.path.join(out, "mean.zarr"),
            shape=(size, size),
            chunks=(tile, tile),
            dtype="float32",
            compressors=compressors(codec),
            overwrite=True,
        )
        for r0 in range(0, size, tile):
            for c0 in range(0, size, tile):
                r1, c1 = min(r0 + tile, size), min(c0 + tile, size)
                arr[r0:r1, c0:c1] = tiles.mean_tile(r0, r1, c0, c1, size, size)

    run.close = lambda: None  # type: ignore[attr-defined]
    return run


def serial_compute_seconds(size: int, tile: int) -> float:
    start = time.perf_counter()
    for r0 in range(0, size, tile):
        for c0 in range(0, size, tile):
            tiles.mean_tile(r0, min(r0 + tile, size), c0, min(c0 + tile, size), size, size)
    return time.perf_counter() - start


def check(out: str, size: int, tile: int) -> None:
    """Read three tiles back and compare them with the reference."""
    import zarr

    node = zarr.open(os.path.join(out, "mean.zarr"), mode="r")
    arr = node["mean"] if isinstance(node, zarr.Group) else node
    for r0, c0 in ((0, 0), (size // 2 // tile * tile, tile), (size - tile, size - tile)):
        expected = tiles.mean_tile(r0, r0 + tile, c0, c0 + tile, size, size)
        np.testing.assert_array_equal(arr[r0 : r0 + tile, c0 : c0 + tile], expected)


def measure(
    name: str,
    factory: Callable[[str], Callable[[], None]],
    size: int,
    tile: int,
    repeat: int,
    workers: int,
    compute_s: float,
) -> dict[str, Any]:
    walls, rss, requests = [], [], []
    for _ in range(repeat):
        out = tempfile.mkdtemp(prefix="zo_bench_", dir=os.environ.get("BENCH_DIR"))
        try:
            run = factory(out)
            gc.collect()
            os.sync()
            with PeakRSS() as peak:
                start = time.perf_counter()
                run()
                walls.append(time.perf_counter() - start)
            rss.append(peak.delta_mib)
            requests.append(getattr(run, "record_requests", 0))
            run.close()  # type: ignore[attr-defined]
            check(out, size, tile)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    wall = statistics.median(walls)
    ntiles = ((size + tile - 1) // tile) ** 2
    return {
        "case": name,
        "wall": wall,
        "min": min(walls),
        "max": max(walls),
        "mbs": size * size * 4 / 1e6 / wall,
        "ms_tile": wall / ntiles * 1e3,
        "ovh": max(0.0, wall - compute_s / workers) / ntiles * 1e3,
        "rss": statistics.median(rss),
        "req_tile": statistics.median(requests) / ntiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--codecs", nargs="+", default=["zstd", "none"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="add the 4 GiB memory case")
    parser.add_argument("--graph", action="store_true", help="graph sizes of the demo")
    parser.add_argument(
        "--only-graph", action="store_true", help="only the graph sizes (no throughput)"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="case names to skip")
    args = parser.parse_args()
    modes = AbstractCluster.modes()
    size = args.size
    print(
        f"# zarr_orch {zarr_orch.__version__}, {os.cpu_count()} cores, size {size}, "
        f"repeat {args.repeat} (median)"
    )
    for tile in [] if args.only_graph else args.tiles:
        compute_s = statistics.median(serial_compute_seconds(size, tile) for _ in range(2))
        for codec in args.codecs:
            bind = functools.partial
            cases: list[tuple[str, int, Callable[[str], Callable[[], None]]]] = [
                ("zarr-loop", 1, bind(case_zarr_loop, size, tile, codec)),
                ("xarray-region", 1, bind(case_xarray_region, size, tile, codec)),
                ("dask-threads", 2, bind(case_dask, "threads", size, tile, codec)),
                ("dask-distributed", 2, bind(case_dask, "distributed", size, tile, codec)),
                ("zo-sequential", 1, bind(case_zarr_orch, "sequential", size, tile, codec)),
            ]
            for mode in ("multiprocessing", "local_dask", "dask"):
                if mode in modes:
                    cases.append((f"zo-{mode}", 2, bind(case_zarr_orch, mode, size, tile, codec)))
            results = []
            for name, workers, factory in cases:
                if name in args.skip:
                    continue
                results.append(measure(name, factory, size, tile, args.repeat, workers, compute_s))
            base = {r["case"]: r["mbs"] for r in results}
            print(
                f"\n## tile {tile}, codec {codec}, {((size + tile - 1) // tile) ** 2} tiles, "
                f"serial compute {compute_s:.2f} s"
            )
            print(
                "| case | wall s (min-max) | MB/s | ms/tile | ovh ms/tile | peak dRSS MiB "
                "| x dask-threads | x dask-distributed | x zarr-loop | record req/tile |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in results:
                ratios = [
                    f"{r['mbs'] / base[name]:.2f}" if name in base else "-"
                    for name in ("dask-threads", "dask-distributed", "zarr-loop")
                ]
                print(
                    f"| {r['case']} | {r['wall']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | "
                    f"{r['mbs']:.0f} | {r['ms_tile']:.2f} | {r['ovh']:.2f} | {r['rss']:.0f} | "
                    f"{' | '.join(ratios)} | {r['req_tile']:.2f} |"
                )
            sys.stdout.flush()
    if args.big:
        big = 32768
        for mode in ("multiprocessing", "local_dask"):
            result = measure(
                f"zo-{mode} 4 GiB",
                functools.partial(case_zarr_orch, mode, big, 1024, "zstd"),
                big,
                1024,
                1,
                2,
                serial_compute_seconds(4096, 1024) * 64,
            )
            print(
                f"\n## memory: 4 GiB saved-only raster ({big}^2 float32, tile 1024, zstd, "
                f"{mode}, 2 workers)"
            )
            print(
                f"wall {result['wall']:.1f} s, {result['mbs']:.0f} MB/s, main-process peak "
                f"dRSS {result['rss']:.0f} MiB (target <= 300 MiB)"
            )
            sys.stdout.flush()
    if args.graph or args.only_graph:
        graph_sizes()


def graph_sizes() -> None:
    """Bytes of the graphs local_dask sends to the scheduler for the demo at 2048 and 4096 px."""
    import re

    import dask
    import distributed  # noqa: F401 (its config defaults must exist before we change one)
    from dask.utils import format_bytes, parse_bytes

    from zarr_orch.demo import run_demo

    pattern = re.compile(r"distributed: Sending large graph of size ([0-9.]+ [kMG]?i?B)")
    rows = []
    for size in (2048, 4096):
        out = tempfile.mkdtemp(prefix="zo_bench_graph_", dir=os.environ.get("BENCH_DIR"))
        try:
            with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1B"}):
                result = run_demo(
                    out,
                    {"mode": "local_dask", "nb_workers": 2, "progress": False},
                    size=size,
                    tile=512,
                )
            [log] = [n for n in os.listdir(os.path.join(out, "logs")) if n.endswith(".log")]
            with open(os.path.join(out, "logs", log), encoding="utf-8") as handle:
                sizes = [parse_bytes(m) for m in pattern.findall(handle.read())]
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append((size, result.tiles, sizes))
    print("\n## graphs sent to the scheduler: demo (2 stages, tile 512) in local_dask")
    print("| raster | tiles per stage | graphs | largest graph | total | per tile |")
    print("|---|---|---|---|---|---|")
    for size, ntiles, sizes in rows:
        print(
            f"| {size} px | {ntiles} | {len(sizes)} | {format_bytes(max(sizes))} | "
            f"{format_bytes(sum(sizes))} | {format_bytes(sum(sizes) // (2 * ntiles))} |"
        )
    ratio = max(rows[1][2]) / max(rows[0][2])
    print(f"largest graph 4096 px / 2048 px: {ratio:.2f} (target: within 10 %)")


if __name__ == "__main__":
    main()
