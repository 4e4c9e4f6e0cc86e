"""The temp-file sweep a run does when it first prepares a product, on a product of ~50k chunks.

Builds one product-like tree in a temp directory: a Zarr v3 array of 224 x 224 chunks
(50,176 chunk files) written by zarr_orch's own `ChunkWriter`, plus a few temp files as
killed writers leave them, then times, in the same process (warm page cache, the state
right after a killed run): a bare ``os.walk`` listing of the tree (the floor of any
listing), `find_temp_files` and `sweep_temp_files` (which also deletes the temp files).

    python benchmarks/bench_temp_sweep.py [--side 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import zarr

from zarr_orch.storage.core.atomic_files import find_temp_files, sweep_temp_files, temp_path
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.writers.chunk_writer import ChunkWriter

#: temp files planted before each timed sweep (a kill leaves about one per writer)
PLANTED = 8


def build(root: str, side: int) -> int:
    """A product of side x side chunks of 4 x 4 float32; returns the number of files."""
    array = zarr.create_array(
        os.path.join(root, "hgt"),
        shape=(side * 4, side * 4),
        chunks=(4, 4),
        dtype="float32",
        fill_value=-9999.0,
    )
    writer = ChunkWriter.for_array(Location.parse(root), "hgt", array)
    assert writer is not None
    values = np.arange(16, dtype="float32").reshape(4, 4)
    for i in range(side):
        for j in range(side):
            writer.write((i, j), values)
    return sum(len(files) for _, _, files in os.walk(root))


def plant(root: str, side: int) -> None:
    for k in range(PLANTED):
        with open(temp_path(os.path.join(root, "hgt", "c", str(k % side), "0")), "wb") as f:
            f.write(b"torn")


def walk(root: str) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def timed(func: Callable[[], object], repeat: int, before: Callable[[], None]) -> list[float]:
    seconds = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        func()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=224, help="chunks per side (224: 50,176)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench_temp_sweep_")
    try:
        start = time.perf_counter()
        files = build(root, args.side)
        print(f"built {files} files in {time.perf_counter() - start:.1f} s under {root}")
        cases = {
            "os.walk listing (floor)": (lambda: walk(root), lambda: None),
            "find_temp_files": (lambda: find_temp_files(root), lambda: plant(root, args.side)),
            "sweep_temp_files": (lambda: sweep_temp_files(root), lambda: plant(root, args.side)),
        }
        results = {name: timed(f, args.repeat, b) for name, (f, b) in cases.items()}
        assert find_temp_files(root) == [], "the sweep left temp files"
        floor = statistics.median(results["os.walk listing (floor)"])
        print(
            f"\n{files} files, {PLANTED} temp files planted before each run (median of "
            f"{args.repeat})"
        )
        print("| case | ms (min-max) | us/file | x os.walk |")
        print("|---|---|---|---|")
        for name, seconds in results.items():
            median = statistics.median(seconds)
            print(
                f"| {name} | {median * 1e3:.0f} ({min(seconds) * 1e3:.0f}-"
                f"{max(seconds) * 1e3:.0f}) | {median / files * 1e6:.2f} | {median / floor:.2f} |"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
