"""The MultiprocessingCluster facade: conf checks, scatter, and the scheduler loop that sends
ready jobs to worker processes and books their replies, deaths and timeouts."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import connection
from typing import Any

from zarr_orch.cluster.base import AbstractCluster, Option, Outcome, TaskError
from zarr_orch.cluster.graph import Delayed, GraphTasks, substitute
from zarr_orch.cluster.main_guard import check_main_guard
from zarr_orch.cluster.multiprocessing.planner import PENDING, RUNNING, Job, JobQueue, MpFuture
from zarr_orch.cluster.multiprocessing.pool import Worker, WorkerPool
from zarr_orch.cluster.multiprocessing.scatter import ScatterHandle
from zarr_orch.cluster.multiprocessing.worker import (
    PICKLE_PROTOCOL,
    READY,
    Ref,
    task_error,
    worker_main,
)
from zarr_orch.errors import ConfigurationError, ZarrOrchError

#: the mode's logger, one name for the whole package (as before it was split into modules)
logger = logging.getLogger(__package__)

#: idle workers dying in a row before we give up (a worker that cannot even start)
MAX_STARTUP_DEATHS = 10


def _check_nb_workers(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f'nb_workers must be "auto" or an integer >= 1, got {value!r}')
    return value


def _check_mp_mode(value: Any) -> str:
    if value not in ("auto", "forkserver", "spawn", "fork"):
        raise ConfigurationError(
            f'mp_mode must be "auto", "forkserver", "spawn" or "fork", got {value!r}'
        )
    return value


def can_fork_safely() -> bool:
    """True when forking this process now cannot inherit another thread's half-held lock:
    on Linux, from the main thread, with no other Python thread alive (as at start-up)."""
    return (
        sys.platform.startswith("linux")
        and threading.current_thread() is threading.main_thread()
        and threading.active_count() == 1
    )


def _optional_int(name: str) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be an integer >= 1 or null, got {value!r}")
        return value

    return check


def _check_ram(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(
            f"max_ram_per_worker must be a number of MB > 0 or null, got {value!r}"
        )
    return value


def _check_preload(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise ConfigurationError(
            f"worker_preload must be a list of module names or null, got {value!r}"
        )
    return [v.strip() for v in value]


def resolve_nb_workers(value: int | str) -> int:
    """`"auto"` means all usable cores but one (the main process writes too), at least 1."""
    if value != "auto":
        return int(value)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def job_payload(job: Job) -> bytes:
    """Pickle a job: its steps with inputs from other jobs resolved, in-job ones as refs."""
    values = job.batch.values
    in_job: set[int] = set()

    def resolve(dep: Delayed) -> Any:
        uid = dep.node.uid
        if uid in in_job:
            return Ref(uid, dep.index)
        outputs = values[uid]
        return outputs[0] if dep.index is None else outputs[dep.index]

    steps = []
    for position, node in enumerate(job.steps):
        args, kwargs = node.args, node.kwargs
        refs: list[int] = []
        # the head's dependencies are all external: none when the job has no ext_deps
        deps = node.dependencies() if position or job.ext_deps else None
        if deps:
            if position and not in_job:
                in_job.update(job.uids())
            args = substitute(args, resolve)
            kwargs = substitute(kwargs, resolve)
            refs = sorted({d.node.uid for d in deps if d.node.uid in in_job})
        steps.append((node.uid, node.name, node.func, args, kwargs, node.nout, refs))
    return pickle.dumps((id(job), steps, job.wanted()), PICKLE_PROTOCOL)


@AbstractCluster.register("multiprocessing", "mp")
class MultiprocessingCluster(GraphTasks, AbstractCluster):
    """Runs task graphs on a set of local worker processes, with retries, timeouts, RAM caps."""

    IN_PROCESS = False
    CONF_OPTIONS = {
        "nb_workers": Option(
            "auto", _check_nb_workers, 'worker processes; "auto" = usable cores - 1 (at least 1)'
        ),
        "mp_mode": Option(
            "auto",
            _check_mp_mode,
            'start method: "auto" (fork the first workers while this process has no other '
            "thread, at start-up on Linux: they start at once with everything it imported; "
            'every later one through the forkserver), "forkserver", "spawn" or "fork"',
        ),
        "max_tasks_per_worker": Option(
            None,
            _optional_int("max_tasks_per_worker"),
            "restart a worker after this many tasks to bound leaks (null: never)",
        ),
        "max_ram_per_worker": Option(
            2000,
            _check_ram,
            "MB of RSS per worker: a task going past it is killed and fails, "
            "a worker left above it after a task is restarted (null: no limit)",
        ),
        "max_in_flight": Option(
            None,
            _optional_int("max_in_flight"),
            "tasks sent to workers at once (null: 2 * nb_workers)",
        ),
        "worker_preload": Option(
            None,
            _check_preload,
            "modules imported once by the forkserver, before it forks the workers (forkserver "
            "only; null: none besides the script itself)",
        ),
    }

    @classmethod
    def resolve_conf(cls, conf: dict[str, Any]) -> dict[str, Any]:
        """``nb_workers: "auto"`` becomes the number of workers started (as CARS reports it)."""
        return {**conf, "nb_workers": resolve_nb_workers(conf["nb_workers"])}

    def __init__(self, conf: dict[str, Any], out_dir: Any, launch_worker: bool = True) -> None:
        conf = dict(conf)
        for key, option in self.CONF_OPTIONS.items():
            conf[key] = option.check(conf.get(key, option.default))
        super().__init__(conf, out_dir, launch_worker)
        self.nb_workers = resolve_nb_workers(conf["nb_workers"])
        self.max_in_flight = conf["max_in_flight"] or 2 * self.nb_workers
        self._per_worker = max(1, math.ceil(self.max_in_flight / self.nb_workers))
        self._max_tasks = conf["max_tasks_per_worker"]
        self.max_retries = int(conf.get("max_retries", 0) or 0)
        auto = conf["mp_mode"] == "auto"
        #: how workers are started from now on ("auto": forkserver after the first ones)
        self.start_method = "forkserver" if auto else conf["mp_mode"]
        #: how the first workers were started (set when they are)
        self.first_start_method: str | None = None
        self._ctx = mp.get_context(self.start_method)
        self._pool = WorkerPool(self._ctx, conf["max_ram_per_worker"])
        self._finalizer = weakref.finalize(self, self._pool.shutdown)
        self._jobs = JobQueue(self.max_retries, self.max_in_flight)
        self._started = False
        self._closed = False
        self._scatter_ids = itertools.count()
        self._last_completion = time.monotonic()
        self._startup_deaths = 0
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        if launch_worker:
            self._check_can_start()
            if auto and can_fork_safely():
                # forked now, before any thread exists: they start in milliseconds with
                # what this process imported (CARS's applications: seconds in a forkserver)
                self._start_workers(mp.get_context("fork"))
                return
            # start now (as CARS does), in the background: the forkserver imports the script
            # and the preloaded modules (seconds for CARS's applications) while the
            # application builds its graph; the first use of the workers waits for them
            self._starter = threading.Thread(
                target=self._start_in_background, name="zarr-orch-mp-start", daemon=True
            )
            self._starter.start()

    # -- conf / task API ----------------------------------------------------------------------
    def check_task_function(self, func: Callable[..., Any]) -> None:
        """Refuse functions that worker processes cannot import by name (lambdas, local defs)."""
        try:
            pickle.dumps(func, PICKLE_PROTOCOL)
        except Exception as exc:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise ConfigurationError(
                f"task function {name!r} cannot be sent to worker processes in "
                f"{self.conf.get('mode', 'multiprocessing')!r} mode ({type(exc).__name__}: "
                f"{exc}); define it at module level in an importable module (not a lambda, "
                "a nested function or a local class), or use mode 'sequential'"
            ) from exc

    def scatter(self, data: Any, broadcast: bool = True) -> ScatterHandle:
        """Pickle `data` once to a local scratch file; each worker loads it once, on first use."""
        self._check_open()
        if self._pool.tmp_dir is None:
            self._pool.tmp_dir = tempfile.mkdtemp(prefix="zarr_orch_mp_")
        key = f"{os.getpid()}-{id(self)}-{next(self._scatter_ids)}"
        path = os.path.join(self._pool.tmp_dir, f"scatter_{key}.pkl")
        with open(path, "wb") as file:
            pickle.dump(data, file, PICKLE_PROTOCOL)
        return ScatterHandle(path, key, type(data).__name__)

    # -- starting -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ZarrOrchError("this multiprocessing cluster has been cleaned up")

    def _check_can_start(self) -> None:
        """Refuse, in the calling thread, what would stop the workers from starting."""
        self._check_open()
        if not self.launch_worker:
            raise ZarrOrchError(
                "the cluster was created with launch_worker=False: cannot run tasks"
            )
        # "auto" starts later workers (replacements) through the forkserver: it needs it too
        check_main_guard("multiprocessing", self.start_method)

    def _start_in_background(self) -> None:
        try:
            self._start_workers()
        except BaseException as exc:  # re-raised in the thread that first needs the workers
            self._start_error = exc

    def _wait_for_start(self) -> None:
        """Join the background start; its failure is raised here, once."""
        starter, self._starter = self._starter, None
        if starter is not None:
            starter.join()
        error, self._start_error = self._start_error, None
        if error is not None:
            raise error

    def _ensure_started(self) -> None:
        self._wait_for_start()
        if self._started:
            self._check_open()
            return
        self._check_can_start()
        self._start_workers()

    def _start_workers(self, first: Any = None) -> None:
        """Start the workers (with context `first` for these, default the cluster's)."""
        if self._started:
            return
        if self.start_method == "forkserver":
            # '__main__' is the default preload (tasks defined in a script); ours, and the tile
            # sink's (numpy, xarray, zarr), are imported once in the server, not per worker
            self._ctx.set_forkserver_preload(
                [
                    "__main__",
                    worker_main.__module__,
                    "zarr_orch.registry.sink",
                    *(self.conf["worker_preload"] or ()),
                ]
            )
        self._started = True
        self.first_start_method = (first or self._ctx).get_start_method()
        for _ in range(self.nb_workers):
            self._start_worker(first)
        logger.info(
            "started %d %s worker process(es) (max %d tasks in flight)",
            self.nb_workers,
            self.first_start_method,
            self.max_in_flight,
        )

    def _start_worker(self, ctx: Any = None) -> Worker:
        return self._pool.start_worker(ctx)

    def worker_pids(self) -> list[int]:
        """Process ids of the current worker processes (for monitoring and tests)."""
        self._wait_for_start()
        return self._pool.pids()

    # -- graph --------------------------------------------------------------------------------
    def start_tasks(self, task_list: list[Any]) -> list[MpFuture]:
        """Plan the jobs of `task_list`, send the first ones to workers, return one future each."""
        self._ensure_started()
        futures, nb_jobs = self._jobs.add_tasks(task_list)
        logger.debug("start_tasks: %d futures, %d jobs", len(futures), nb_jobs)
        self._dispatch()
        return futures

    def _dispatch(self) -> None:
        """Send ready jobs to the least loaded workers, within the in-flight bound."""
        while self._jobs.has_room():
            candidates = [w for w in self._pool.workers if not w.retiring]
            if not candidates:
                return
            worker = min(candidates, key=lambda w: len(w.jobs))
            if len(worker.jobs) >= self._per_worker:
                return
            job = self._jobs.ready.popleft()
            if job.state != PENDING:
                continue
            try:
                payload = job_payload(job)
            except Exception as exc:
                error = task_error(exc)
                error.message = f"the arguments of {job.name} cannot be pickled: {exc}"
                self._jobs.finish_job(job, {}, dict.fromkeys(job.uids(), error))
                continue
            try:
                worker.task_conn.send_bytes(payload)
            except OSError:  # died meanwhile: its sentinel will tell; try another worker
                self._jobs.ready.appendleft(job)
                self._on_death(worker)
                continue
            del payload
            job.state = RUNNING
            job.attempts += 1
            if not worker.jobs:
                worker.head_start = time.monotonic()
            worker.jobs.append(job)
            worker.assigned += 1
            self._jobs.in_flight += 1
            if self._max_tasks is not None and worker.assigned >= self._max_tasks:
                self._retire(worker, f"it ran max_tasks_per_worker={self._max_tasks} tasks")

    def _retire(self, worker: Worker, reason: str) -> None:
        """Stop sending to `worker`; it exits after its queued jobs; a fresh one replaces it."""
        if worker.retiring:
            return
        logger.debug("recycling worker %s (pid %s): %s", worker.name, worker.pid, reason)
        worker.retiring = True
        with contextlib.suppress(OSError):
            worker.task_conn.send_bytes(b"")
        if not self._closed:
            self._start_worker()

    # -- results ------------------------------------------------------------------------------
    def _on_message(self, worker: Worker, data: bytes) -> None:
        if data == READY:
            worker.ready = True
            worker.head_start = time.monotonic()  # the clock of its first task starts now
            return
        job = worker.jobs.popleft()
        self._jobs.in_flight -= 1
        now = time.monotonic()
        self._last_completion = worker.head_start = now
        self._startup_deaths = 0
        rss = 0
        try:
            job_id, outputs, errors, rss = pickle.loads(data)
        except Exception as exc:
            error = task_error(exc)
            error.message = f"the result of {job.name} cannot be unpickled: {exc}"
            self._jobs.attempt_failed(job, error)
        else:
            del data
            if job_id is not None and job_id != id(job):  # pragma: no cover - protocol bug
                raise ZarrOrchError(f"worker {worker.name} answered job {job_id}, not {id(job)}")
            if errors:
                self._jobs.job_errors(job, outputs, errors)
            else:
                self._jobs.finish_job(job, outputs, {})
        if self._pool.max_rss is not None and rss > self._pool.max_rss:
            self._retire(
                worker,
                f"its RSS {rss / 2**20:.0f} MB is above max_ram_per_worker="
                f"{self._pool.max_ram_per_worker} MB",
            )
        if worker.retiring and not worker.jobs:
            self._pool.forget(worker)

    # -- failures of workers ------------------------------------------------------------------
    def _lose_worker(self, worker: Worker, head_error: TaskError | None) -> None:
        """Worker gone or killed: fail its running job, requeue the queued ones, replace it."""
        jobs = list(worker.jobs)
        worker.jobs.clear()
        self._jobs.in_flight -= len(jobs)
        self._pool.forget(worker)
        for job in reversed(jobs[1:]):  # never started: no attempt used
            self._jobs.put_back(job)
        if jobs and head_error is not None:
            self._jobs.attempt_failed(jobs[0], head_error)
        if not worker.retiring and not self._closed:
            self._start_worker()

    def _on_death(self, worker: Worker) -> None:
        """A worker process ended: expected if it was retiring and idle, else a failure."""
        if worker not in self._pool.workers:
            return
        try:  # a reply may still sit in the pipe
            while (worker.jobs or not worker.ready) and worker.result_conn.poll():
                self._on_message(worker, worker.result_conn.recv_bytes())
        except (EOFError, OSError):
            pass
        if worker not in self._pool.workers:
            return
        worker.process.join(1.0)
        if not worker.jobs:
            if not worker.retiring:
                self._startup_deaths += 1
                logger.warning(
                    "worker %s (pid %s) %s while idle; restarting it",
                    worker.name,
                    worker.pid,
                    worker.describe_exit(),
                )
                if self._startup_deaths > MAX_STARTUP_DEATHS:
                    raise ZarrOrchError(
                        f"worker processes keep dying ({worker.describe_exit()}); "
                        "check that zarr_orch and the task modules import in a fresh process"
                    )
            self._lose_worker(worker, None)
            return
        job = worker.jobs[0]
        how = worker.describe_exit()
        hint = (
            " (SIGKILL often means the system ran out of memory: lower the tile size or nb_workers)"
            if "SIGKILL" in how
            else ""
        )
        message = f"worker process {worker.pid} {how} while running {job.name}{hint}"
        logger.warning(message)
        error = TaskError("WorkerDiedError", message, message)
        self._lose_worker(worker, error)

    def _kill(self, worker: Worker, error: TaskError) -> None:
        self._pool.kill(worker, error)
        self._lose_worker(worker, error)

    def _pump(self, timeout: float | None) -> None:
        """One scheduler step: wait for results or deaths, handle them, dispatch more work."""
        done_before = len(self._jobs.completed)
        wait = self._pool.check_stalls(timeout, self._last_completion, self._kill)
        self._dispatch()
        if len(self._jobs.completed) > done_before:
            return  # let the iterator yield them first
        if not self._jobs.in_flight:
            if self._jobs.ready:
                wait = 0.05  # no worker to take them right now (restarting)
            else:
                raise ZarrOrchError("futures are pending but no task is running or ready")
        by_object: dict[Any, tuple[Worker, bool]] = {}
        for worker in self._pool.workers:
            by_object[worker.process.sentinel] = (worker, False)
            if worker.jobs or not worker.ready:
                by_object[worker.result_conn] = (worker, True)
        ready = connection.wait(list(by_object), wait)
        deaths = []
        for obj in ready:
            worker, is_result = by_object[obj]
            if not is_result:
                deaths.append(worker)
                continue
            if worker not in self._pool.workers:
                continue
            try:
                data = worker.result_conn.recv_bytes()
            except (EOFError, OSError):
                deaths.append(worker)
                continue
            self._on_message(worker, data)
            del data
        for worker in deaths:
            self._on_death(worker)
        self._dispatch()

    # -- iteration ----------------------------------------------------------------------------
    def outcome_iterator(
        self, future_list: list[MpFuture], timeout: float | None = None
    ) -> Iterator[Outcome]:
        """Yield one Outcome per future in completion order, driving the scheduler meanwhile.

        A running task is killed (and counts as a failed attempt) when it has run for
        `timeout` seconds while no task completed at all.
        """
        pending = set(future_list)  # identity-hashed: no per-future id() ints
        self._last_completion = time.monotonic()
        queued = set(self._jobs.completed)
        for future in future_list:  # yielded before: its value is gone
            if future.done and future in pending and future not in queued:
                pending.discard(future)
                yield Outcome(future, error=future.error, attempts=future.attempts)
        try:
            while pending:
                mine = [f for f in self._jobs.completed if f in pending]
                if not mine:
                    self._check_open()
                    self._pump(timeout)
                    continue
                self._jobs.completed = [f for f in self._jobs.completed if f not in pending]
                for future in mine:
                    pending.discard(future)
                    outcome = Outcome(
                        future, value=future.value, error=future.error, attempts=future.attempts
                    )
                    future.value = None  # the Outcome holds the only reference now
                    yield outcome
                    del outcome
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping the worker processes")
            self.cleanup()
            raise

    def cancel(self, future_list: Any) -> None:
        """Drop jobs not yet sent whose outputs no remaining future or dependent needs."""
        self._jobs.cancel(future_list)

    def cleanup(self, **kwargs: Any) -> None:
        """Stop and join every worker process and remove the scratch dir (idempotent)."""
        starter = self._starter
        if starter is not None:  # a start still running: let it finish, then stop them all
            starter.join()
        self._closed = True
        self._jobs.ready.clear()
        self._finalizer()
