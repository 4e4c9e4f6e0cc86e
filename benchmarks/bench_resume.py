"""Resume cost: a finished job run again with the same out_dir, against its first run.

The job is the demo pipeline (two stages, a breakpoint between them, stage 1 replaced and
saved, stage 2 saved with three tags) in multiprocessing mode with 2 workers. The rerun
computes no tile; its time is the orchestrator and worker start-up, reading the completion
records and deciding from stage 1's tile descriptions that the store serves its replaced
tiles: they come back lazy, and none is read since stage 2 is done too. Median of --repeat
runs.

Run: python benchmarks/bench_resume.py [--size 8192] [--tile 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from zarr_orch.demo import run_demo
from zarr_orch.storage.readers import tile_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", default="multiprocessing")
    args = parser.parse_args()
    conf = {"mode": args.mode, "progress": False}
    if args.mode != "sequential":
        conf["nb_workers"] = 2
    import dask.array  # noqa: F401  (xarray imports it on first use: a one-off, not resume work)

    firsts, reruns, computed, read_back = [], [], [], []
    for _ in range(args.repeat):
        out = tempfile.mkdtemp(prefix="zo_resume_", dir=os.environ.get("BENCH_DIR"))
        try:
            start = time.perf_counter()
            run_demo(out, conf, size=args.size, tile=args.tile)
            firsts.append(time.perf_counter() - start)
            tile_store.READS.clear()
            start = time.perf_counter()
            run_demo(out, conf, size=args.size, tile=args.tile)
            reruns.append(time.perf_counter() - start)
            read_back.append(sum(tile_store.READS.values()))
            with open(os.path.join(out, "metadata.json")) as handle:
                computed.append(json.load(handle)["zarr_orch"]["stats"]["tiles"])
        finally:
            shutil.rmtree(out, ignore_errors=True)
    first, rerun = statistics.median(firsts), statistics.median(reruns)
    tiles = (args.size // args.tile) ** 2
    print(
        f"# demo pipeline {args.size}^2, tile {args.tile} ({tiles} tiles per stage), "
        f"{args.mode}, median of {args.repeat}"
    )
    print("| run | seconds (min-max) | tiles computed | tiles read back | ratio to first run |")
    print("|---|---|---|---|---|")
    print(
        f"| first run | {first:.2f} ({min(firsts):.2f}-{max(firsts):.2f}) | {2 * tiles} | 0 "
        "| 1.00 |"
    )
    print(
        f"| rerun of the finished job | {rerun:.2f} ({min(reruns):.2f}-{max(reruns):.2f}) "
        f"| {max(computed)} | {max(read_back)} | {rerun / first:.3f} |"
    )


if __name__ == "__main__":
    main()
