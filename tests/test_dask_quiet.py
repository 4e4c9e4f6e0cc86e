"""local_dask as a user sees it: a quiet console, a complete run log, flat graphs.

distributed logs a dozen INFO lines per cluster start and stop, and warns about large
graphs; a demo run must print only the demo's own lines, while the run log in
`out_dir/logs/` keeps distributed's records. Graph sizes are distributed's own numbers:
with its large-graph threshold at 1 byte it reports every graph it sends, and those
reports land in the run log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zarr_orch.demo import run_demo

pytest.importorskip("distributed")

WORKTREE = Path(__file__).resolve().parents[1]
GRAPH_LINE = re.compile(r"distributed: Sending large graph of size ([0-9.]+ [kMG]?i?B)")
SCRIPT = """
from zarr_orch.demo import run_demo
if __name__ == "__main__":
    run_demo({out!r}, {{"mode": "local_dask", "nb_workers": 2}}, size=512, tile=128)
    print("script done")
"""


def run_log(out: Path) -> str:
    [log] = sorted((out / "logs").glob("run-*.log"))
    return log.read_text()


@pytest.mark.parametrize("how", ["cli", "script"])
def test_local_dask_demo_prints_only_its_own_lines(how: str, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
    # `import cars` (done by the CARS tests of this session) points DASK_CONFIG at CARS's
    # own dask config, whose logging levels silence distributed's INFO records: this test
    # is about zarr_orch's defaults, so its child process must not inherit that
    env.pop("DASK_CONFIG", None)
    # every graph would warn "Sending large graph": the warning must not reach the console
    env["DASK_DISTRIBUTED__ADMIN__LARGE_GRAPH_WARNING_THRESHOLD"] = "1B"
    if how == "cli":
        cmd = [sys.executable, "-m", "zarr_orch.cli", "demo", "--out", str(out)]
        cmd += ["--mode", "local_dask", "--size", "512", "--tile", "128"]
    else:  # a plain script that configures no logging
        script = tmp_path / "job.py"
        script.write_text(SCRIPT.format(out=str(out)))
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # nothing from distributed at INFO, no UserWarning: the worker processes may only
    # complain (WARNING) when the machine is too slow to stop them in time
    noisy = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "Worker process still alive" not in line
    ]
    assert noisy == [], proc.stderr
    if how == "cli":
        assert proc.stdout.splitlines()[0] == (
            "demo done: 16 tiles of 128x128 px per stage, 512x512 raster; this run computed "
            "32 tiles and resumed 0 done by an earlier run"
        )
    else:
        assert proc.stdout == "script done\n"
    log = run_log(out)
    assert "distributed.scheduler: State start" in log
    assert "distributed.nanny" in log and "Scheduler closing" in log
    assert GRAPH_LINE.search(log), "the run log keeps distributed's graph warnings"


def graph_sizes(out: Path) -> list[int]:
    """Sizes of the graphs distributed sent, from its warnings kept in the run log."""
    from dask.utils import parse_bytes

    return [parse_bytes(size) for size in GRAPH_LINE.findall(run_log(out))]


def test_graph_size_does_not_grow_with_the_raster(tmp_path: Path) -> None:
    import dask

    conf = {"mode": "local_dask", "nb_workers": 2, "progress": False}
    sizes = {}
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1B"}):
        for size in (512, 1024):  # 16 and 64 tiles of 128 px per stage
            out = tmp_path / str(size)
            run_demo(str(out), conf, size=size, tile=128)
            sizes[size] = graph_sizes(out)
    small, big = max(sizes[512]), max(sizes[1024])
    # stage 2 takes stage 1's replaced tiles (66 KiB each): scattered, never in the graph
    assert big <= 1.1 * small and small <= 1.1 * big, sizes
    assert big < 64 * 2**10, sizes
    assert len(sizes[1024]) > len(sizes[512])  # more tiles: more batches, not bigger ones
