"""Real CARS 1.3 applications: CARS's own orchestrator vs zarr_orch, whole-process wall time.

Each run is a fresh ``python`` process (imports, orchestrator and worker start, tiles, the
GeoTIFF outputs, cleanup), timed from outside. zarr_orch also runs with
``geotiff_outputs: false`` to show what writing the GeoTIFFs costs. A case is a small
function registered in CASES: ``prepare(directory, size) -> inputs`` builds its inputs
once, ``run(orchestrator, inputs, out_dir)`` is the application code.

    python benchmarks/bench_cars.py [--size 2200] [--repeat 1] [--cases interpolation_filling]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# at module level, as in a CARS pipeline script: forkserver workers preload __main__, so
# they start with the applications imported instead of importing them at their first task
from cars.applications.application import Application

ROOT = Path(__file__).resolve().parent.parent
MODES = ("sequential", "multiprocessing")


@dataclass(frozen=True)
class Case:
    """A benchmarked application: its inputs and the code that registers its tasks."""

    prepare: Callable[[Path, int], dict[str, str]]
    run: Callable[[Any, dict[str, str], Path], None]
    tile: int


# -- interpolation filling (dsm_filling) -----------------------------------------------------------


def prepare_filling(directory: Path, size: int) -> dict[str, str]:
    """A size x size DSM with classified buildings to fill, and its classification."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size]
    dsm = (100 + 10 * np.sin(rows / 40.0) + 5 * np.cos(cols / 30.0)).astype("float32")
    classif = np.zeros((size, size), "uint8")
    for _ in range(size // 20):
        r, c = rng.integers(0, size - 40, 2)
        h, w = rng.integers(5, 40, 2)
        classif[r : r + h, c : c + w] = 1
    dsm[classif == 1] = -32768
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 1,
        "crs": "EPSG:32631",
        "transform": from_origin(600000, 4800000, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    paths = {"dsm": str(directory / "dsm.tif"), "classif": str(directory / "classif.tif")}
    with rasterio.open(paths["dsm"], "w", dtype="float32", nodata=-32768, **profile) as dst:
        dst.write(dsm, 1)
    with rasterio.open(paths["classif"], "w", dtype="uint8", **profile) as dst:
        dst.write(classif, 1)
    return paths


def run_filling(orchestrator: Any, inputs: dict[str, str], out: Path) -> None:
    """CARS's InterpolationFilling as the filling pipeline runs it (tiles of 256, margin 32)."""
    app = Application(
        "dsm_filling",
        cfg={
            "method": "interpolation",
            "fill_classification": ["1"],
            "tile_size": 256,
            "margin": 32,
        },
    )
    app.run(
        inputs["dsm"],
        inputs["classif"],
        None,
        ["1"],
        str(out / "dump"),
        None,
        None,
        dsm_dir=str(out),
        orchestrator=orchestrator,
    )
    orchestrator.breakpoint()


CASES: dict[str, Case] = {
    "interpolation_filling": Case(prepare_filling, run_filling, 256),
}


# -- one run, in its own process -------------------------------------------------------------------


def child(case: str, which: str, mode: str, inputs_json: str, out: str, geotiff: bool) -> None:
    """Run one case once and print its timings as JSON (the parent also times the process).

    ``inside_s`` starts once CARS's applications are imported (both sides pay that import,
    ~5 s of CPU, at module level): orchestrator start, tiles, GeoTIFFs, cleanup.
    """
    start = time.perf_counter()
    if which == "cars":
        from cars.orchestrator import orchestrator as ocht
    else:
        import zarr_orch.orchestrator as ocht
    conf: dict[str, Any] = {"mode": mode}
    if mode == "multiprocessing":
        conf["nb_workers"] = 2
    if which == "zarr_orch":
        conf.update(progress=False, geotiff_outputs=geotiff)
    out_dir = Path(out)
    inputs = json.loads(inputs_json)
    with ocht.Orchestrator(
        orchestrator_conf=conf,
        out_dir=str(out_dir),
        log_dir=str(out_dir / "logs"),
        out_yaml_path=str(out_dir / "metadata.yaml"),
    ) as orchestrator:
        CASES[case].run(orchestrator, inputs, out_dir)
        geotiff_s = getattr(getattr(orchestrator, "_geotiffs", None), "seconds", None)
    print(json.dumps({"inside_s": time.perf_counter() - start, "geotiff_s": geotiff_s}))


def run_once(
    case: str, which: str, mode: str, inputs: dict[str, str], work: Path, geotiff: bool
) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{which}_{mode}_", dir=work))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    command = [
        sys.executable,
        __file__,
        "--child",
        case,
        which,
        mode,
        json.dumps(inputs),
        str(out),
        "1" if geotiff else "0",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{which} {mode} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2200, help="raster side in pixels")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, which, mode, inputs, out, geotiff = args.child
        child(case, which, mode, inputs, out, geotiff == "1")
        return
    variants = [("cars", True), ("zarr_orch", True), ("zarr_orch", False)]
    with tempfile.TemporaryDirectory(prefix="bench_cars_") as tmp:
        work = Path(tmp)
        for case in args.cases:
            inputs = CASES[case].prepare(work, args.size)
            print(f"\n### {case}: {args.size}x{args.size} raster, tiles {CASES[case].tile}")
            print(
                "| mode | CARS s | zarr_orch s | zarr_orch no GeoTIFF s | GeoTIFF s | x CARS "
                "| CARS in-run s | zarr_orch in-run s | x CARS in-run |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for mode in MODES:
                walls: dict[tuple[str, bool], list[float]] = {}
                inside: dict[tuple[str, bool], list[float]] = {}
                geotiff_s: list[float] = []
                for _ in range(args.repeat):
                    for which, geotiff in variants:
                        result = run_once(case, which, mode, inputs, work, geotiff)
                        walls.setdefault((which, geotiff), []).append(result["wall_s"])
                        inside.setdefault((which, geotiff), []).append(result["inside_s"])
                        if which == "zarr_orch" and geotiff:
                            geotiff_s.append(result["geotiff_s"] or 0.0)
                cars_s = statistics.median(walls[("cars", True)])
                zarr_s = statistics.median(walls[("zarr_orch", True)])
                bare_s = statistics.median(walls[("zarr_orch", False)])
                cars_in = statistics.median(inside[("cars", True)])
                zarr_in = statistics.median(inside[("zarr_orch", True)])
                print(
                    f"| {mode} | {cars_s:.2f} | {zarr_s:.2f} | {bare_s:.2f} | "
                    f"{statistics.median(geotiff_s):.2f} | {cars_s / zarr_s:.2f} | "
                    f"{cars_in:.2f} | {zarr_in:.2f} | {cars_in / zarr_in:.2f} |"
                )


if __name__ == "__main__":
    main()
