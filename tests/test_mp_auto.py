"""mp_mode "auto" (the default): the first workers are forked while the process has no other
thread, later ones come from the forkserver.

Forking at start-up is what makes a CARS pipeline's workers ready at once (a forkserver
imports CARS's applications again: seconds). Each case runs `mp_auto_app.py` as a fresh
process, as a pipeline runs: a worker killed mid-run is replaced through the forkserver
(the process has threads by then) and the raster still equals the sequential one; a main
process SIGKILLed mid-run leaves no worker behind; and a process that already has a thread
(here: pytest's, after zarr started its I/O thread) starts its workers with the forkserver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import zarr
from app_tasks import array_tile, arrays_dataset, field, profile_for, schedule

from zarr_orch import Orchestrator

APP = Path(__file__).with_name("mp_auto_app.py")
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_the_first_workers_are_forked_and_a_replacement_comes_from_the_forkserver(tmp_path):
    marker = tmp_path / "killed"
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(APP), str(out), "--kill-once", str(marker)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert (info["first"], info["later"], info["mp_mode"]) == ("fork", "forkserver", "auto")
    killed = int(marker.read_text())
    assert killed in info["pids"] and killed not in info["after"]
    assert len(info["after"]) == 2  # the replacement
    assert "was killed by signal SIGKILL" in done.stderr
    got = zarr.open_array(str(out / "ds.zarr" / "hgt"), mode="r")[...]
    np.testing.assert_array_equal(got, field(np.arange(128), np.arange(128)).astype("float32"))


def test_forked_workers_exit_when_the_main_process_is_killed(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(APP), str(tmp_path / "run"), "--hang", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        info = json.loads(proc.stdout.readline())
        assert info["first"] == "fork"
        workers = [psutil.Process(pid) for pid in info["pids"]]
        time.sleep(1.0)  # both busy with a hanging tile (3 s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # each worker ends its tile, then sees its task pipe closed and exits
        _gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"workers outlived their main process: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_a_process_with_threads_starts_its_workers_with_the_forkserver(tmp_path):
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="a user's thread", daemon=True)
    other.start()
    try:
        conf = {"mode": "multiprocessing", "nb_workers": 2, "progress": False}
        with Orchestrator(conf, tmp_path / "run") as orch:
            cds = arrays_dataset(64, 64, (32, 32))
            orch.add_to_save_lists("ds.zarr", "hgt", cds, dtype="float32", nodata=-9999)
            schedule(orch, cds, array_tile, profile_for(64, 64))
            orch.breakpoint()
            assert orch.cluster.first_start_method == "forkserver"
            assert orch.get_conf()["mp_mode"] == "auto"
    finally:
        stop.set()
    got = zarr.open_array(str(tmp_path / "run" / "ds.zarr" / "hgt"), mode="r")[...]
    np.testing.assert_array_equal(got, field(np.arange(64), np.arange(64)).astype("float32"))
