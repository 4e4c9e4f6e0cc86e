"""What a user reads where users trip: a script without the ``__main__`` guard in
multiprocessing mode, the summary after Ctrl-C and its rerun, and the commands printed after
a demo (which must run exactly as printed). Every case runs a real subprocess.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zarr

from zarr_orch.storage.format import records as rec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PIPELINE = """
import sys
import numpy as np
import xarray as xr
import zarr_orch as ocht
from zarr_orch import CarsDataset, Orchestrator, fill_dataset
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict


def smooth(window, overlaps, saving_info):
    rows = np.arange(window["row_min"], window["row_max"])
    cols = np.arange(window["col_min"], window["col_max"])
    ds = xr.Dataset({"hgt": (("row", "col"), np.add.outer(rows, cols).astype("float32"))})
    return fill_dataset(ds, saving_info=saving_info, window=window, overlaps=overlaps)


CONF = {"mode": "multiprocessing", "nb_workers": 2, "mp_mode": sys.argv[2], "progress": False}
"""
BODY = """\
with Orchestrator(CONF, out_dir=sys.argv[1]) as orchestrator:
    dsm = CarsDataset("arrays", name="dsm")
    dsm.create_grid(96, 64, 32, 32, 0, 0)
    orchestrator.add_to_save_lists("dsm.tif", "hgt", dsm, dtype="float32", nodata=-9999)
    [saving_info] = orchestrator.get_saving_infos([dsm])
    task = orchestrator.cluster.create_task(smooth)
    for row in range(dsm.shape[0]):
        for col in range(dsm.shape[1]):
            dsm[row, col] = task(
                window_array_to_dict(dsm.tiling_grid[row, col]),
                overlap_array_to_dict(dsm.overlaps[row, col]),
                ocht.update_saving_infos(saving_info, row=row, col=col),
            )
print("PIPELINE DONE")
"""


def _env(path: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if path is not None:
        env["PATH"] = path
    return env


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 180, **kw):
    return subprocess.run(
        args, capture_output=True, text=True, env=env or _env(), timeout=timeout, **kw
    )


# -- 3. multiprocessing without the __main__ guard ---------------------------------------------


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_script_without_main_guard_fails_once_showing_the_guard(tmp_path, start_method):
    script = tmp_path / "unguarded.py"
    script.write_text(PIPELINE + BODY)
    line = (PIPELINE + BODY).splitlines().index(BODY.splitlines()[0]) + 1
    result = _run([sys.executable, str(script), str(tmp_path / "out"), start_method], timeout=120)
    assert result.returncode == 1
    assert "PIPELINE DONE" not in result.stdout
    message = result.stderr[result.stderr.index("zarr_orch.errors.ConfigurationError") :]
    assert message == (
        f"zarr_orch.errors.ConfigurationError: mode 'multiprocessing' starts worker processes "
        f"with {start_method!r}, which import your script {script} again; its line {line} runs "
        "the pipeline at import time, so every worker would start another Orchestrator. Run "
        "the pipeline only in the main process: move the code into a function main() and add "
        'these two lines at the end of the script:\n\n    if __name__ == "__main__":\n'
        "        main()\n\n(or indent the pipeline code under the if line; or use mode "
        "'sequential')\n"
    )
    assert len(result.stderr.splitlines()) < 25, result.stderr
    assert "LeaseError" not in result.stderr and "WorkerDiedError" not in result.stderr
    assert not list((tmp_path / "out").glob("*.zarr"))  # nothing computed

    # the fix the message shows works
    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        PIPELINE
        + "\n\ndef main():\n"
        + textwrap.indent(BODY, "    ")
        + '\n\nif __name__ == "__main__":\n    main()\n'
    )
    result = _run([sys.executable, str(guarded), str(tmp_path / "out"), start_method])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PIPELINE DONE" in result.stdout


# -- 4. the summary after Ctrl-C and the rerun ---------------------------------------------------

INTERRUPTED = re.compile(
    r"interrupted by SIGINT: (\d+)/(\d+) tiles of breakpoint (\d) \((\w+)\) computed and "
    r"recorded(?: \((\d+) more were done by an earlier run\))?; (\d+) left to compute\. Run the "
    r"same command again to resume: it skips the (\d+) done tiles of this breakpoint"
)
DEMO_DONE = re.compile(r"this run computed (\d+) tiles and resumed (\d+) done by an earlier run")


def _recorded(product: Path) -> int:
    try:
        group = zarr.open_group(str(product), mode="r")
        names = group.attrs["zarr_orch"]["records"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0
    return sum(len(rec.done_tiles(group.store, name)) for name in names)


def test_numbers_after_ctrl_c_add_up_with_the_rerun(tmp_path):
    out = tmp_path / "demo"
    args = [sys.executable, "-m", "zarr_orch", "demo", "--out", str(out), "--workers", "2"]
    args += ["--size", "2048", "--tile", "32"]  # 4096 tiles per stage
    per_stage = 4096
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    deadline = time.monotonic() + 180
    while _recorded(out / "terrain.zarr") < 200:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the demo never started recording tiles"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    matches = [m for m in map(INTERRUPTED.search, stderr.splitlines()) if m]
    assert len(matches) == 1, stderr
    [match] = matches
    computed, total, stage, name, earlier, left, skips = match.groups()
    computed, total, left, skips = int(computed), int(total), int(left), int(skips)
    assert (stage, name, earlier) == ("1", "terrain", None), stderr
    assert total == per_stage and computed + left == total and skips == computed
    assert _recorded(out / "terrain.zarr") == computed  # what the line says is on disk

    rerun = _run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [done] = [m for m in map(DEMO_DONE.search, rerun.stdout.splitlines()) if m]
    assert (int(done.group(1)), int(done.group(2))) == (2 * per_stage - computed, computed)


# -- 6. printed hints work as printed ------------------------------------------------------------


DEMO = ["demo", "--mode", "sequential", "--size", "64", "--tile", "32"]


def _hint(stdout: str, prefix: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith(prefix)]
    return line[len(prefix) :]


def test_memory_demo_suggests_nothing_that_cannot_work():
    result = _run([sys.executable, "-m", "zarr_orch", *DEMO, "--out", "memory://demo"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "the products were in this process's memory (memory://) and are gone now that the "
        "demo has ended; use --out DIR (or an object store URL) to keep them"
    )
    assert "status" not in result.stdout and "open_product" not in result.stdout


def _check_hints(stdout: str, out: Path, command: str, python: str, env: dict[str, str]) -> None:
    """The two hints are exactly `command status OUT` and `python -c ...`, and both run."""
    status = _hint(stdout, "see how far it got with: ")
    assert status == f"{command} status {out}"
    done = subprocess.run(status, shell=True, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"run {out}\n") and "terrain.zarr" in done.stdout
    opener = _hint(stdout, "open one with: ")
    assert opener == (
        f"{python} -c 'import zarr_orch; print(zarr_orch.open_product(\"{out}/terrain.zarr\"))'"
    )
    opened = subprocess.run(opener, shell=True, capture_output=True, text=True, env=env)
    assert opened.returncode == 0, opened.stderr
    assert "<xarray.Dataset>" in opened.stdout and "dem" in opened.stdout


def test_hints_of_python_m_zarr_orch_without_an_activated_environment(tmp_path):
    env = _env(path="/usr/bin:/bin")  # no venv on PATH: `python` is not this interpreter
    out = tmp_path / "out"
    result = _run([sys.executable, "-m", "zarr_orch", *DEMO, "--out", str(out)], env=env)
    assert result.returncode == 0, result.stderr
    _check_hints(result.stdout, out, f"{sys.executable} -m zarr_orch", sys.executable, env)


def test_hints_of_the_entry_point_name_it_by_path_or_by_name(tmp_path):
    script = BIN / "zarr-orch"
    if not script.exists():
        pytest.skip("no zarr-orch entry point beside this interpreter")
    interpreter = script.read_text().splitlines()[0].removeprefix("#!").strip()
    env = _env(path="/usr/bin:/bin")  # the entry point is not on PATH: its full path
    out = tmp_path / "by_path"
    result = _run([str(script), *DEMO, "--out", str(out)], env=env)
    assert result.returncode == 0, result.stderr
    _check_hints(result.stdout, out, str(script), interpreter, env)
    env = _env(path=f"{BIN}:/usr/bin:/bin")  # an activated environment: plain names
    out = tmp_path / "by_name"
    result = _run(["zarr-orch", *DEMO, "--out", str(out)], env=env)
    assert result.returncode == 0, result.stderr
    _check_hints(result.stdout, out, "zarr-orch", Path(interpreter).name, env)
