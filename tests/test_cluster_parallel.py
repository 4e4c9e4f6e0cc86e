"""Parallel clusters (multiprocessing, local_dask, dask at an address) against the cluster API.

Each kind of cluster is started once per module and shared by the tests of that kind; tests that
must break things (timeouts, RAM) or check cleanup start their own.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from typing import Any

import cluster_tasks as ct
import numpy as np
import psutil
import pytest

from zarr_orch.cluster import AbstractCluster, Outcome
from zarr_orch.cluster.dask_clusters import jobqueue_kwargs
from zarr_orch.cluster.multiprocessing import MultiprocessingCluster, ScatterHandle
from zarr_orch.cluster.sequential import SequentialCluster
from zarr_orch.errors import ConfigurationError

MP_KINDS = ["mp-forkserver", "mp-spawn"]
DASK_KINDS = ["local_dask", "dask"]
ALL_KINDS = MP_KINDS + DASK_KINDS


def make_conf(mode: str, **overrides: Any) -> dict[str, Any]:
    """A validated conf: common keys plus the mode's CONF_OPTIONS defaults and overrides."""
    cls = AbstractCluster.for_mode(mode)
    conf: dict[str, Any] = {"mode": mode, "task_timeout": 600.0, "max_retries": 2}
    conf.update({key: option.default for key, option in cls.CONF_OPTIONS.items()})
    conf.update(overrides)
    for key, option in cls.CONF_OPTIONS.items():
        conf[key] = option.check(conf[key])
    return conf


def new_cluster(kind: str, scheduler: str | None = None, **overrides: Any) -> AbstractCluster:
    """Start a cluster of `kind` ("mp-<start method>", "local_dask" or "dask")."""
    if kind.startswith("mp-"):
        conf = make_conf("multiprocessing", **{"nb_workers": 2, "mp_mode": kind[3:], **overrides})
        return MultiprocessingCluster(conf, out_dir=None)
    if kind == "local_dask":
        conf = make_conf("local_dask", **{"nb_workers": 2, "max_ram_per_worker": 1000, **overrides})
    else:
        conf = make_conf("dask", address=scheduler, **overrides)
    return AbstractCluster.for_mode(kind)(conf, out_dir=None)


def run(cluster: AbstractCluster, tasks: list[Any], timeout: float | None = 60) -> list[Outcome]:
    """Start `tasks` and return their outcomes in task order."""
    futures = cluster.start_tasks(tasks)
    index = {id(f): i for i, f in enumerate(futures)}
    outcomes: list[Outcome | None] = [None] * len(futures)
    for outcome in cluster.outcome_iterator(futures, timeout=timeout):
        outcomes[index[id(outcome.future)]] = outcome
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def values(outcomes: list[Outcome]) -> list[Any]:
    """Values of successful outcomes (fails on the first error)."""
    for outcome in outcomes:
        assert outcome.ok, outcome.error.traceback if outcome.error else ""
    return [o.value for o in outcomes]


def settle(cluster: AbstractCluster) -> None:
    """Wait until a dask cluster has its 2 workers again (after a kill or a restart)."""
    client = getattr(cluster, "client", None)
    if client is not None:
        client.wait_for_workers(2, timeout=60)


def descendants() -> dict[int, str]:
    """Live descendant processes of this test process: pid -> command line.

    multiprocessing's forkserver and resource tracker (our direct children) outlive clusters
    by design and are reported as "helper"; forkserver workers share the forkserver's
    command line but are its children, not ours.
    """
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
            direct = child.ppid() == os.getpid()
        except psutil.Error:
            continue
        helper = direct and ("forkserver" in cmdline or "resource_tracker" in cmdline)
        found[child.pid] = "helper" if helper else cmdline
    return found


def is_helper(cmdline: str) -> bool:
    """True for the forkserver and the resource tracker (see `descendants`)."""
    return cmdline == "helper"


@pytest.fixture(scope="module")
def scheduler_address() -> Any:
    """An external dask cluster (2 worker processes) the 'dask' mode connects to."""
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module", params=ALL_KINDS)
def cluster(request: pytest.FixtureRequest) -> Any:
    """One shared cluster per kind."""
    address = request.getfixturevalue("scheduler_address") if request.param == "dask" else None
    started = new_cluster(request.param, scheduler=address)
    started.kind = request.param
    yield started
    started.cleanup()


def build_graph(cluster: AbstractCluster) -> list[Any]:
    """Chained tasks, nout=2 outputs and inputs nested in dicts/lists/tuples and kwargs."""
    inc, pair, add = (
        cluster.create_task(ct.inc),
        cluster.create_task(ct.pair, nout=2),
        cluster.create_task(ct.add),
    )
    firsts = [inc(i) for i in range(5)]
    sums = []
    for first in firsts:
        single, double = pair(first)
        sums.append(add(single, double))
    total = cluster.create_task(ct.combine)({"xs": sums, "first": (firsts[0],)}, scale=2)
    return [*sums, total, firsts[1], pair(firsts[2])[1]]


# -- results --------------------------------------------------------------------------------
def test_same_values_as_sequential(cluster: AbstractCluster) -> None:
    sequential = SequentialCluster(make_conf("sequential"), None)
    # one root per run: GraphRunner re-runs released intermediates when a later root shares
    # an ancestor with an earlier one (reported to the lead)
    expected = [values(run(sequential, [task]))[0] for task in build_graph(sequential)]
    assert values(run(cluster, build_graph(cluster))) == expected
    assert expected[-3:] == [2 * (sum(expected[:5]) + 1), 2, 6]


def test_fused_sink_runs_in_the_process_that_computed_its_input(cluster: AbstractCluster) -> None:
    tiles = [cluster.create_task(ct.pid_value)(cluster.create_task(ct.inc)(i)) for i in range(6)]
    receipts = values(run(cluster, [cluster.attach_sink(t, ct.PidCheckSink()) for t in tiles]))
    assert [r["value"] for r in receipts] == [1, 2, 3, 4, 5, 6]
    assert all(r["same_pid"] for r in receipts)
    assert all(r["sink_pid"] != os.getpid() for r in receipts)


def test_sinks_on_both_outputs_and_on_a_chained_tile(cluster: AbstractCluster) -> None:
    sink = ct.PidCheckSink()
    tasks = []
    for i in range(3):
        first, second = cluster.create_task(ct.pid_pair, nout=2)(i + 1)
        tasks += [cluster.attach_sink(first, sink), cluster.attach_sink(second, sink)]
        tasks.append(cluster.create_task(ct.unwrap)(second))  # the tile also feeds a stage
    out = values(run(cluster, tasks))
    assert [o["value"] for o in out[0::3]] == [1, 2, 3]
    assert [o["value"] for o in out[1::3]] == [2, 4, 6]
    assert out[2::3] == [2, 4, 6]
    if isinstance(cluster, MultiprocessingCluster):
        # dask makes each output a separate `getitem` task, which its scheduler may treat as
        # "root-ish" and place without locality: the output then moves worker to worker
        # (never through the main process) before its sink runs
        assert all(o["same_pid"] for o in out[0::3] + out[1::3])


def test_scatter_ships_the_object_to_workers(cluster: AbstractCluster) -> None:
    shared = {"array": np.ones(2_000_000)}
    handle = cluster.scatter(shared)
    if isinstance(handle, ScatterHandle):
        assert len(pickle.dumps(handle)) < 1000  # a handle, not the data
    use = cluster.create_task(ct.use_scattered)
    assert values(run(cluster, [use(handle, i) for i in range(4)])) == [
        2e6,
        2e6 + 1,
        2e6 + 2,
        2e6 + 3,
    ]


def test_task_failing_once_is_retried(cluster: AbstractCluster, tmp_path: Any) -> None:
    [outcome] = run(cluster, [cluster.create_task(ct.fail_once)(str(tmp_path / "marker"), 7)])
    assert outcome.ok and outcome.value == 7
    assert (tmp_path / "marker").exists()


def test_always_failing_task_reports_traceback(cluster: AbstractCluster) -> None:
    failing = cluster.create_task(ct.always_fail)(3)
    dependent = cluster.create_task(ct.inc)(failing)
    good = [cluster.create_task(ct.inc)(i) for i in range(3)]
    outcomes = run(cluster, [failing, *good, dependent])
    error = outcomes[0].error
    assert error is not None and error.exc_type == "ValueError"
    assert "boom 3" in error.message
    assert "always_fail" in error.traceback and "boom 3" in error.traceback
    assert values(outcomes[1:4]) == [1, 2, 3]
    assert outcomes[4].error is not None and "boom 3" in outcomes[4].error.message
    if isinstance(cluster, MultiprocessingCluster):
        assert outcomes[0].attempts == 3  # max_retries=2
        assert "upstream task 'always_fail'" in outcomes[4].error.message


def test_sigkilled_worker_is_replaced_and_task_retried(
    cluster: AbstractCluster, tmp_path: Any
) -> None:
    settle(cluster)
    marker = tmp_path / "killed"
    tasks = [cluster.create_task(ct.kill_once)(str(marker), 5)]
    tasks += [cluster.create_task(ct.inc)(i) for i in range(3)]
    start = time.monotonic()
    assert values(run(cluster, tasks)) == [5, 1, 2, 3]
    killed_pid = int(marker.read_text())
    assert not psutil.pid_exists(killed_pid) or psutil.Process(killed_pid).status() == "zombie"
    assert time.monotonic() - start < 20
    if isinstance(cluster, MultiprocessingCluster):
        assert len(cluster.worker_pids()) == 2 and killed_pid not in cluster.worker_pids()


def test_hung_task_times_out(cluster: AbstractCluster, tmp_path: Any) -> None:
    # a timed-out task keeps running in a dask worker thread; we restart the workers of
    # clusters we started, not those of someone else's cluster, so hang briefly there
    seconds = 6 if cluster.kind == "dask" else 60
    settle(cluster)
    owner = cluster
    before = descendants()  # before the new cluster: its workers start at construction
    if isinstance(cluster, MultiprocessingCluster):  # no retries: one 2 s timeout suffices
        owner = new_cluster(cluster.kind, max_retries=0)
    try:
        tasks = [owner.create_task(ct.hang)(seconds)]
        tasks += [owner.create_task(ct.inc)(i) for i in range(3)]
        start = time.monotonic()
        outcomes = run(owner, tasks, timeout=2)
        elapsed = time.monotonic() - start
        assert elapsed < 15
        error = outcomes[0].error
        assert error is not None and error.exc_type == "TimeoutError"
        assert "hang" in error.message and "task_timeout=2" in error.message
        assert values(outcomes[1:]) == [1, 2, 3]
        if isinstance(owner, MultiprocessingCluster):
            new = [p for p, cmd in descendants().items() if p not in before and not is_helper(cmd)]
            assert sorted(new) == sorted(owner.worker_pids())  # the hung worker was killed
        # the cluster still works afterwards
        assert values(run(owner, [owner.create_task(ct.inc)(9)])) == [10]
    finally:
        if owner is not cluster:
            owner.cleanup()


# -- multiprocessing specifics --------------------------------------------------------------
def test_cleanup_leaves_no_child_process() -> None:
    before = descendants()
    cluster = new_cluster("mp-forkserver", nb_workers=2)
    assert values(run(cluster, [cluster.create_task(ct.inc)(i) for i in range(4)])) == [1, 2, 3, 4]
    pids = cluster.worker_pids()
    assert len(pids) == 2
    cluster.cleanup()
    cluster.cleanup()  # idempotent
    assert not any(psutil.pid_exists(pid) for pid in pids)
    new = {pid: cmd for pid, cmd in descendants().items() if pid not in before}
    assert all(is_helper(cmd) for cmd in new.values()), new


def test_cleanup_stops_busy_workers_quickly() -> None:
    cluster = new_cluster("mp-forkserver")
    futures = cluster.start_tasks([cluster.create_task(ct.hang)(60) for _ in range(2)])
    time.sleep(0.5)
    pids = cluster.worker_pids()
    start = time.monotonic()
    cluster.cleanup()
    assert time.monotonic() - start < 5
    assert not any(psutil.pid_exists(pid) for pid in pids)
    del futures


def test_unpicklable_task_function_is_refused() -> None:
    cluster = MultiprocessingCluster(make_conf("multiprocessing", nb_workers=1), None)

    def local_function(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=r"local_function.*module level"):
        cluster.create_task(local_function)
    with pytest.raises(ConfigurationError, match=r"lambda.*module level"):
        cluster.create_task(lambda x: x)
    cluster.create_task(ct.inc)  # module-level functions are fine
    cluster.cleanup()


@pytest.mark.parametrize("mode", ["multiprocessing", "local_dask"])
def test_zero_workers_refused(mode: str) -> None:
    with pytest.raises(ConfigurationError, match="nb_workers"):
        make_conf(mode, nb_workers=0)
    with pytest.raises(ConfigurationError, match="nb_workers"):
        AbstractCluster.for_mode(mode)({"mode": mode, "nb_workers": 0}, None)


def test_mp_conf_validation() -> None:
    assert make_conf("mp")["nb_workers"] == "auto"
    auto = MultiprocessingCluster(make_conf("mp"), None, launch_worker=False)
    assert auto.nb_workers == max(1, len(os.sched_getaffinity(0)) - 1)
    assert auto.max_in_flight == 2 * auto.nb_workers
    for key, bad in [
        ("mp_mode", "threads"),
        ("max_tasks_per_worker", 0),
        ("max_ram_per_worker", -1),
        ("max_in_flight", 0),
        ("nb_workers", True),
    ]:
        with pytest.raises(ConfigurationError, match=key):
            make_conf("mp", **{key: bad})


def test_worker_recycled_after_max_tasks() -> None:
    cluster = new_cluster("mp-forkserver", nb_workers=1, max_tasks_per_worker=2)
    try:
        out = values(run(cluster, [cluster.create_task(ct.pid_value)(i) for i in range(6)]))
        assert [v for _, v in out] == list(range(6))
        assert len({pid for pid, _ in out}) == 3
    finally:
        cluster.cleanup()


def test_task_going_past_max_ram_is_killed() -> None:
    cluster = new_cluster("mp-forkserver", nb_workers=1, max_ram_per_worker=200, max_retries=0)
    try:
        outcomes = run(
            cluster, [cluster.create_task(ct.allocate)(400, 10), cluster.create_task(ct.inc)(1)]
        )
        error = outcomes[0].error
        assert error is not None and error.exc_type == "MemoryError"
        assert "max_ram_per_worker=200" in error.message and "allocate" in error.message
        assert values(outcomes[1:]) == [2]
    finally:
        cluster.cleanup()


def test_large_results_and_inputs_cross_the_pipes() -> None:
    cluster = new_cluster("mp-forkserver", max_in_flight=1)
    try:
        big = cluster.create_task(ct.big_bytes)
        blobs = [big(40), big(40)]
        lengths = [cluster.create_task(ct.length)(b) for b in blobs]
        outcomes = run(cluster, [*lengths, blobs[0]])
        assert values(outcomes[:2]) == [40 * 2**20] * 2
        assert len(outcomes[2].value) == 40 * 2**20
    finally:
        cluster.cleanup()


# -- dask specifics -------------------------------------------------------------------------
def test_unreachable_scheduler_fails_fast() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(ConfigurationError, match=f"cannot connect.*{address}"):
        new_cluster("dask", scheduler=address, connect_timeout=2)
    assert time.monotonic() - start < 10


def test_dask_address_is_required() -> None:
    with pytest.raises(ConfigurationError, match="address"):
        make_conf("dask")


def test_jobqueue_conf_translation() -> None:
    slurm = jobqueue_kwargs(
        "slurm_dask",
        make_conf(
            "slurm_dask",
            account="proj",
            nb_workers=4,
            max_ram_per_worker=3000,
            walltime="02:00:00",
            queue="batch",
            python="/opt/py",
            qos="fast",
        ),
    )
    assert slurm["account"] == "proj" and slurm["queue"] == "batch"
    assert slurm["memory"] == "3000MiB" and slurm["cores"] == 1 and slurm["python"] == "/opt/py"
    assert slurm["walltime"] == "02:00:00"
    assert slurm["worker_extra_args"][:2] == ["--lifetime", "6900s"]
    assert slurm["job_extra_directives"] == ["--qos=fast"]
    pbs = jobqueue_kwargs("pbs_dask", make_conf("pbs_dask"))
    assert "account" not in pbs and "queue" not in pbs and pbs["walltime"] == "00:59:00"
    with pytest.raises(ConfigurationError, match="account"):
        make_conf("slurm_dask")
    with pytest.raises(ConfigurationError, match="HH:MM:SS"):
        make_conf("pbs_dask", walltime="1h")


def test_jobqueue_missing_package_message() -> None:
    pytest.importorskip("distributed")
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("dask-jobqueue is installed")
    with pytest.raises(ConfigurationError, match="pip install dask-jobqueue"):
        AbstractCluster.for_mode("pbs_dask")(make_conf("pbs_dask"), None)
