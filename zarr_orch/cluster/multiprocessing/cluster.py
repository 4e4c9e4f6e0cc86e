"""Multiprocessing mode: a small dependency-aware scheduler over worker processes we own.

Why not `multiprocessing.Pool`: it cannot tell which task a SIGKILLed worker was running, it
cannot kill a hung task and it hides memory use. Here every worker has its own task and result
pipes, so the main process always knows what each worker runs; it notices a dead worker at once
(process sentinel), kills tasks that stall past `task_timeout` or push a worker past
`max_ram_per_worker`, replaces the worker and retries the task.

Scheduling: a task and the fused nodes hanging off it (sinks, single-consumer chains) form one
*job* that runs in one worker call, so tile data never travels back to the main process; only
outputs still needed by another job or by a future come back, and they are dropped as soon as
their last consumer has finished.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import connection
from typing import Any

import psutil

from zarr_orch.cluster.base import AbstractCluster, Option, Outcome, TaskError
from zarr_orch.cluster.graph import Delayed, GraphTasks, TaskNode, split_outputs, substitute
from zarr_orch.cluster.main_guard import check_main_guard
from zarr_orch.errors import ConfigurationError, ZarrOrchError

logger = logging.getLogger(__name__)

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: seconds between two RSS samples of busy workers (when max_ram_per_worker is set)
_RAM_CHECK_INTERVAL = 0.5
#: idle workers dying in a row before we give up (a worker that cannot even start)
_MAX_STARTUP_DEATHS = 10
#: seconds a new worker may take to import its modules and say it is ready
_STARTUP_TIMEOUT = 120.0
#: the first message of a worker: imports done, ready to run tasks (timeouts start then)
_READY = b""


# -- conf validators -------------------------------------------------------------------------
def _check_nb_workers(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f'nb_workers must be "auto" or an integer >= 1, got {value!r}')
    return value


def _check_mp_mode(value: Any) -> str:
    if value not in ("forkserver", "spawn", "fork"):
        raise ConfigurationError(f'mp_mode must be "forkserver", "spawn" or "fork", got {value!r}')
    return value


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


def resolve_nb_workers(value: int | str) -> int:
    """`"auto"` means all usable cores but one (the main process writes too), at least 1."""
    if value != "auto":
        return int(value)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


# -- objects shared by the main process and the workers ---------------------------------------
_IN_WORKER = False
_SCATTER_CACHE: dict[str, Any] = {}


def _load_scattered(path: str, key: str) -> Any:
    """Unpickle a scattered object (once per worker process, then from the cache)."""
    if key in _SCATTER_CACHE:
        return _SCATTER_CACHE[key]
    with open(path, "rb") as file:
        obj = pickle.load(file)
    if _IN_WORKER:
        _SCATTER_CACHE[key] = obj
    return obj


class ScatterHandle:
    """A small stand-in for a scattered object; it turns back into the object when unpickled.

    Because the resolution happens at unpickling time, the handle works wherever it is nested
    in a task's arguments (even inside user objects), and each worker loads it only once.
    """

    __slots__ = ("key", "path", "type_name")

    def __init__(self, path: str, key: str, type_name: str) -> None:
        self.path = path
        self.key = key
        self.type_name = type_name

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (_load_scattered, (self.path, self.key))

    def __copy__(self) -> ScatterHandle:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ScatterHandle:
        return self

    def __repr__(self) -> str:
        return f"ScatterHandle({self.type_name}, key={self.key})"


class _Ref:
    """In a job payload: the output of an earlier step of the same job."""

    __slots__ = ("index", "uid")

    def __init__(self, uid: int, index: int | None) -> None:
        self.uid = uid
        self.index = index

    def __reduce__(self) -> tuple[type[_Ref], tuple[int, int | None]]:
        return (_Ref, (self.uid, self.index))


def _resolve_refs(obj: Any, values: dict[int, list[Any]]) -> Any:
    if isinstance(obj, _Ref):
        outputs = values[obj.uid]
        return outputs[0] if obj.index is None else outputs[obj.index]
    if isinstance(obj, list):
        return [_resolve_refs(item, values) for item in obj]
    if isinstance(obj, tuple):
        items = [_resolve_refs(item, values) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, set | frozenset):
        return type(obj)(_resolve_refs(item, values) for item in obj)
    if isinstance(obj, dict):
        return {key: _resolve_refs(value, values) for key, value in obj.items()}
    return obj


def _task_error(exc: BaseException) -> TaskError:
    """A TaskError that is sure to pickle (the exception object is dropped if it cannot)."""
    error = TaskError.from_exception(exc)
    try:
        pickle.loads(pickle.dumps(exc, protocol=_PICKLE_PROTOCOL))
    except Exception:
        error.exception = None
    return error


def _upstream_error(name: str, error: TaskError) -> TaskError:
    """The error of a task whose input task `name` failed with `error`."""
    return TaskError(
        error.exc_type,
        f"upstream task {name!r} failed: {error.message}",
        error.traceback,
        error.exception,
    )


# -- worker process ---------------------------------------------------------------------------
def _run_job(data: bytes) -> tuple[Any, dict[int, list[Any]], dict[Any, tuple[str, Any]], dict]:
    """Run one job payload: (job id, outputs wanted back, step errors, step names)."""
    try:
        job_id, steps, wanted = pickle.loads(data)
    except BaseException as exc:  # e.g. a task function the worker cannot import
        error = _task_error(exc)
        error.message = (
            f"the worker process could not load the task ({type(exc).__name__}: {exc}); task "
            "functions and arguments must be importable by name in a fresh process"
        )
        return None, {}, {None: ("error", error)}, {}
    del data
    names = {step[0]: step[1] for step in steps}
    values: dict[int, list[Any]] = {}
    errors: dict[Any, tuple[str, Any]] = {}
    while steps:
        uid, name, func, args, kwargs, nout, in_job_deps = steps.pop(0)
        failed = next((dep for dep in in_job_deps if dep not in values), None)
        if failed is not None:
            errors[uid] = ("upstream", failed)
            continue
        result = None
        try:
            if in_job_deps:
                args = _resolve_refs(args, values)
                kwargs = _resolve_refs(kwargs, values)
            result = func(*args, **kwargs)
            values[uid] = split_outputs(types.SimpleNamespace(name=name, nout=nout), result)
        except BaseException as exc:  # a task's own failure must never kill the worker
            errors[uid] = ("error", _task_error(exc))
        del args, kwargs, result
    outputs = {uid: values[uid] for uid in wanted if uid in values}
    return job_id, outputs, errors, names


def _dump_reply(job_id: Any, outputs: dict, errors: dict, names: dict, rss: int) -> bytes:
    """Pickle a reply; outputs that cannot be pickled become errors of their task."""
    try:
        return pickle.dumps((job_id, outputs, errors, rss), _PICKLE_PROTOCOL)
    except Exception as exc:
        for uid, value in outputs.items():
            try:
                pickle.dumps(value, _PICKLE_PROTOCOL)
            except Exception as item_exc:
                err = _task_error(item_exc)
                err.message = f"the result of task {names.get(uid)!r} cannot be pickled: {item_exc}"
                errors[uid] = ("error", err)
        if not any(kind == "error" for kind, _ in errors.values()):
            errors[None] = ("error", _task_error(exc))
        return pickle.dumps((job_id, {}, errors, rss), _PICKLE_PROTOCOL)


def _keep_freed_memory() -> None:
    """Let this worker reuse the memory it frees instead of handing it back to the kernel.

    Tile tasks allocate and free the same large temporaries tile after tile; glibc returns
    them (mmap/trim) and every tile then pays page faults on fresh pages, which on VMs that
    reclaim guest memory costs a few ms per MB. Keeping them costs nothing extra: the worker's
    RSS stays at its peak tile, which max_ram_per_worker already bounds.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 31)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


def _worker_main(task_conn: Any, result_conn: Any, sys_path: list[str]) -> None:
    """Loop of a worker process: run jobs in arrival order until told to stop or orphaned.

    A reader thread drains the task pipe continuously, so the main process never blocks on a
    send while this process is itself blocked sending a large result (no pipe deadlock).
    """
    global _IN_WORKER
    _IN_WORKER = True
    _keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    for path in sys_path:
        if path not in sys.path:
            sys.path.append(path)
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read_tasks() -> None:
        try:
            while True:
                data = task_conn.recv_bytes()
                if not data:
                    break
                inbox.put(data)
        except (EOFError, OSError):
            pass
        inbox.put(None)

    threading.Thread(target=read_tasks, name="zarr-orch-task-reader", daemon=True).start()
    process = psutil.Process()
    try:
        result_conn.send_bytes(_READY)
    except OSError:
        return
    while True:
        data = inbox.get()
        if data is None:
            break
        job_id, outputs, errors, names = _run_job(data)
        del data
        reply = _dump_reply(job_id, outputs, errors, names, process.memory_info().rss)
        del outputs
        try:
            result_conn.send_bytes(reply)
        except OSError:  # the main process is gone
            break
        del reply


# -- main-process bookkeeping -----------------------------------------------------------------
class MpFuture:
    """A started task of the multiprocessing cluster (what `start_tasks` returns)."""

    __slots__ = ("attempts", "cancelled", "delayed", "done", "error", "value")

    def __init__(self, delayed: Any) -> None:
        self.delayed = delayed
        self.cancelled = False
        self.done = False
        self.value: Any = None
        self.error: TaskError | None = None
        self.attempts = 0

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("error" if self.error else "done")
        return f"MpFuture({self.delayed!r}, {state})"


_PENDING, _RUNNING, _FINISHED = "pending", "running", "finished"


class _Job:
    """A node plus the nodes fused into it; the unit sent to one worker call.

    A breakpoint holds one per tile, so a job keeps only what scheduling needs, in tuples
    (shared when empty); the uids it holds and the outputs it sends back are derived on demand.
    """

    __slots__ = ("attempts", "batch", "ext_deps", "futures", "state", "steps", "waiting")

    def __init__(self, batch: _Batch, head: TaskNode) -> None:
        self.batch = batch
        self.steps: tuple[TaskNode, ...] = (head,)
        #: uids of outputs of other jobs this one consumes (the head's dependencies among them)
        self.ext_deps: tuple[int, ...] = ()
        self.futures: tuple[MpFuture, ...] = ()
        self.waiting = 0
        self.attempts = 0
        self.state = _PENDING

    @property
    def name(self) -> str:
        """Head task name, plus the fused ones, for messages."""
        head = repr(self.steps[0].name)
        if len(self.steps) == 1:
            return f"task {head}"
        rest = ", ".join(repr(step.name) for step in self.steps[1:])
        return f"task {head} (with fused {rest})"

    def uids(self) -> list[int]:
        """Uids of the nodes this job runs (head first)."""
        return [step.uid for step in self.steps]

    def wanted(self) -> list[int]:
        """Uids whose outputs must come back: those of futures and of other jobs' inputs."""
        wanted = {future.delayed.node.uid for future in self.futures}
        consumers = self.batch.consumers
        if consumers:
            wanted.update(step.uid for step in self.steps if step.uid in consumers)
        return sorted(wanted)

    def dependents(self) -> Iterator[_Job]:
        """Jobs of the same batch consuming an output of this one."""
        consumers = self.batch.consumers
        if consumers:
            for step in self.steps:
                yield from consumers.get(step.uid, ())

    def needed(self) -> bool:
        """True while some future or dependent job still wants this job's outputs."""
        if any(not f.cancelled for f in self.futures):
            return True
        return any(d.state != _FINISHED and d.needed() for d in self.dependents())


class _Batch:
    """The graph state of one `start_tasks` call: node outputs kept for pending consumers.

    Only nodes consumed by another job appear here, and only until their last consumer is
    done, so a batch of independent tiles costs nothing per tile once planned.
    """

    __slots__ = ("consumers", "refs", "values")

    def __init__(self) -> None:
        #: node uid -> jobs consuming its output (dropped once the node's job is finished)
        self.consumers: dict[int, list[_Job]] = {}
        #: node uid -> outputs held for pending consumers
        self.values: dict[int, list[Any]] = {}
        #: node uid -> consumers not finished yet
        self.refs: dict[int, int] = {}


#: `_walk`'s mark of a node used by several nodes, or returned itself (never fused into a user)
_SHARED = -1


def _walk(
    roots: list[Delayed],
) -> tuple[list[TaskNode], dict[int, tuple[Delayed, ...]], dict[int, int]]:
    """Nodes needed by `roots`, dependencies first, each node's dependencies, its only user.

    The order is `topological_nodes`'s; one pass computes each node's dependencies once and
    records, per used node, its single user's uid or `_SHARED` (no per-node sets).
    """
    order: list[TaskNode] = []
    deps_of: dict[int, tuple[Delayed, ...]] = {}  # also the set of visited nodes
    users: dict[int, int] = {}
    for root in roots:
        stack: list[tuple[TaskNode, tuple[Delayed, ...] | None]] = [(root.node, None)]
        while stack:
            node, expanded = stack.pop()
            if expanded is not None:
                order.append(node)
                continue
            uid = node.uid
            if uid in deps_of:
                continue
            found = node.dependencies()
            deps = tuple(found) if found else ()
            deps_of[uid] = deps
            stack.append((node, deps))
            for dep in reversed(deps):
                parent = dep.node.uid
                if users.setdefault(parent, uid) != uid:
                    users[parent] = _SHARED
                if parent not in deps_of:
                    stack.append((dep.node, None))
    for root in roots:
        if root.node.uid in users:
            users[root.node.uid] = _SHARED
    return order, deps_of, users


def _plan_jobs(batch: _Batch, roots: list[Delayed]) -> tuple[list[_Job], dict[int, _Job]]:
    """Group the graph of `roots` into jobs; return them and the job of each node uid.

    A node joins the job of its single dependency when it is fused (a sink) or is that
    dependency's only user and the dependency is not itself returned (a chain link). Other
    dependencies become the job's `ext_deps`, recorded in the batch as consumers.
    """
    order, deps_of, users = _walk(roots)
    job_of: dict[int, _Job] = {}
    jobs: list[_Job] = []
    for node in order:
        uid = node.uid
        deps = deps_of[uid]
        host = None
        if deps:
            parent = deps[0].node.uid
            if (node.fused or users[parent] == uid) and all(dep.node.uid == parent for dep in deps):
                host = job_of[parent]
        if host is None:
            host = _Job(batch, node)
            jobs.append(host)
        else:
            host.steps += (node,)
        job_of[uid] = host
    del order, users
    consumers = batch.consumers
    for job in jobs:
        ext: dict[int, None] | None = None
        for step in job.steps:
            for dep in deps_of[step.uid]:
                uid = dep.node.uid
                if job_of[uid] is job or (ext is not None and uid in ext):
                    continue
                if ext is None:
                    ext = {}
                ext[uid] = None
                consumers.setdefault(uid, []).append(job)
        if ext:
            job.ext_deps = tuple(ext)
            job.waiting = len(ext)
    for uid, consumer_jobs in consumers.items():
        batch.refs[uid] = len(consumer_jobs)
    return jobs, job_of


class _Worker:
    """One worker process, its pipes and the jobs sent to it (head = the one running)."""

    __slots__ = (
        "assigned",
        "head_start",
        "jobs",
        "name",
        "process",
        "ps",
        "ready",
        "result_conn",
        "retiring",
        "started",
        "task_conn",
    )

    def __init__(self, ctx: Any, name: str) -> None:
        task_recv, self.task_conn = ctx.Pipe(duplex=False)
        self.result_conn, result_send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_worker_main,
            args=(task_recv, result_send, list(sys.path)),
            name=name,
            daemon=True,
        )
        self.process.start()
        task_recv.close()
        result_send.close()
        self.name = name
        self.jobs: deque[_Job] = deque()
        self.head_start = 0.0
        self.started = time.monotonic()
        self.ready = False
        self.assigned = 0
        self.retiring = False
        try:
            self.ps: psutil.Process | None = psutil.Process(self.process.pid)
        except psutil.Error:
            self.ps = None

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self.process.pid

    def describe_exit(self) -> str:
        """How the process ended, e.g. "killed by signal SIGKILL"."""
        code = self.process.exitcode
        if code is None:
            return "is still running"
        if code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


class _WorkerSet:
    """The worker processes and scratch dir; owned separately so a finalizer can stop them."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.tmp_dir: str | None = None

    def shutdown(self) -> None:
        """Stop every worker (gracefully if idle, terminate if busy or still starting), join them.

        A worker still importing has nothing to lose: waiting for it to finish starting would
        make a run with nothing to compute pay the whole worker start-up at exit.
        """
        workers, self.workers = self.workers, []
        for worker in workers:
            # an idle worker exits at once (EOF alone is not enough with fork)
            with contextlib.suppress(OSError):
                worker.task_conn.send_bytes(b"")
            with contextlib.suppress(OSError):
                worker.task_conn.close()
            if (worker.jobs or not worker.ready) and worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + 2.0
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(2.0)
            if worker.process.is_alive():
                logger.warning("worker process %s did not stop", worker.pid)
            worker.result_conn.close()
            with contextlib.suppress(ValueError):
                worker.process.close()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None


@AbstractCluster.register("multiprocessing", "mp")
class MultiprocessingCluster(GraphTasks, AbstractCluster):
    """Runs task graphs on a set of local worker processes, with retries, timeouts, RAM caps."""

    IN_PROCESS = False
    CONF_OPTIONS = {
        "nb_workers": Option(
            "auto", _check_nb_workers, 'worker processes; "auto" = usable cores - 1 (at least 1)'
        ),
        "mp_mode": Option(
            "forkserver", _check_mp_mode, 'start method: "forkserver", "spawn" or "fork"'
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
        ram = conf["max_ram_per_worker"]
        self._max_rss = None if ram is None else int(ram * 1024 * 1024)
        self._max_tasks = conf["max_tasks_per_worker"]
        self.max_retries = int(conf.get("max_retries", 0) or 0)
        self._ctx = mp.get_context(conf["mp_mode"])
        self._set = _WorkerSet()
        self._finalizer = weakref.finalize(self, self._set.shutdown)
        self._started = False
        self._closed = False
        self._ready: deque[_Job] = deque()
        self._in_flight = 0
        self._worker_ids = itertools.count()
        self._scatter_ids = itertools.count()
        self._completed: list[MpFuture] = []
        self._last_completion = time.monotonic()
        self._last_ram_check = 0.0
        self._startup_deaths = 0
        if launch_worker:
            # start now (as CARS does): workers import while the application builds its graph
            self._ensure_started()

    # -- conf / task API ----------------------------------------------------------------------
    def check_task_function(self, func: Callable[..., Any]) -> None:
        """Refuse functions that worker processes cannot import by name (lambdas, local defs)."""
        try:
            pickle.dumps(func, _PICKLE_PROTOCOL)
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
        if self._set.tmp_dir is None:
            self._set.tmp_dir = tempfile.mkdtemp(prefix="zarr_orch_mp_")
        key = f"{os.getpid()}-{id(self)}-{next(self._scatter_ids)}"
        path = os.path.join(self._set.tmp_dir, f"scatter_{key}.pkl")
        with open(path, "wb") as file:
            pickle.dump(data, file, _PICKLE_PROTOCOL)
        return ScatterHandle(path, key, type(data).__name__)

    # -- starting -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ZarrOrchError("this multiprocessing cluster has been cleaned up")

    def _ensure_started(self) -> None:
        self._check_open()
        if not self.launch_worker:
            raise ZarrOrchError(
                "the cluster was created with launch_worker=False: cannot run tasks"
            )
        if self._started:
            return
        check_main_guard("multiprocessing", self.conf["mp_mode"])
        if self.conf["mp_mode"] == "forkserver":
            # '__main__' is the default preload (tasks defined in a script); ours, and the tile
            # sink's (numpy, xarray, zarr), are imported once in the server, not per worker
            self._ctx.set_forkserver_preload(["__main__", __name__, "zarr_orch.registry.sink"])
        self._started = True
        for _ in range(self.nb_workers):
            self._start_worker()
        logger.info(
            "started %d %s worker process(es) (max %d tasks in flight)",
            self.nb_workers,
            self.conf["mp_mode"],
            self.max_in_flight,
        )

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._ctx, f"zarr-orch-worker-{next(self._worker_ids)}")
        self._set.workers.append(worker)
        logger.debug("started worker %s (pid %s)", worker.name, worker.pid)
        return worker

    def worker_pids(self) -> list[int]:
        """Process ids of the current worker processes (for monitoring and tests)."""
        return [w.pid for w in self._set.workers if w.pid is not None]

    # -- graph --------------------------------------------------------------------------------
    def start_tasks(self, task_list: list[Any]) -> list[MpFuture]:
        """Plan the jobs of `task_list`, send the first ones to workers, return one future each."""
        self._ensure_started()
        batch = _Batch()
        jobs, job_of = _plan_jobs(batch, [task for task in task_list if isinstance(task, Delayed)])
        futures: list[MpFuture] = []
        for task in task_list:
            future = MpFuture(task)
            futures.append(future)
            if isinstance(task, Delayed):
                job = job_of[task.node.uid]
                job.futures += (future,)
            else:  # already a value: nothing to compute
                future.value, future.done = task, True
                self._completed.append(future)
        del job_of
        self._ready.extend(job for job in jobs if not job.waiting)
        logger.debug("start_tasks: %d futures, %d jobs", len(futures), len(jobs))
        del jobs
        self._dispatch()
        return futures

    # -- dispatching --------------------------------------------------------------------------
    def _payload(self, job: _Job) -> bytes:
        """Pickle a job: its steps with inputs from other jobs resolved, in-job ones as refs."""
        values = job.batch.values
        in_job: set[int] = set()

        def resolve(dep: Delayed) -> Any:
            uid = dep.node.uid
            if uid in in_job:
                return _Ref(uid, dep.index)
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
        return pickle.dumps((id(job), steps, job.wanted()), _PICKLE_PROTOCOL)

    def _dispatch(self) -> None:
        """Send ready jobs to the least loaded workers, within the in-flight bound."""
        while self._ready and self._in_flight < self.max_in_flight:
            candidates = [w for w in self._set.workers if not w.retiring]
            if not candidates:
                return
            worker = min(candidates, key=lambda w: len(w.jobs))
            if len(worker.jobs) >= self._per_worker:
                return
            job = self._ready.popleft()
            if job.state != _PENDING:
                continue
            try:
                payload = self._payload(job)
            except Exception as exc:
                error = _task_error(exc)
                error.message = f"the arguments of {job.name} cannot be pickled: {exc}"
                self._finish_job(job, {}, dict.fromkeys(job.uids(), error))
                continue
            try:
                worker.task_conn.send_bytes(payload)
            except OSError:  # died meanwhile: its sentinel will tell; try another worker
                self._ready.appendleft(job)
                self._on_death(worker)
                continue
            del payload
            job.state = _RUNNING
            job.attempts += 1
            if not worker.jobs:
                worker.head_start = time.monotonic()
            worker.jobs.append(job)
            worker.assigned += 1
            self._in_flight += 1
            if self._max_tasks is not None and worker.assigned >= self._max_tasks:
                self._retire(worker, f"it ran max_tasks_per_worker={self._max_tasks} tasks")

    def _retire(self, worker: _Worker, reason: str) -> None:
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
    def _on_message(self, worker: _Worker, data: bytes) -> None:
        if data == _READY:
            worker.ready = True
            worker.head_start = time.monotonic()  # the clock of its first task starts now
            return
        job = worker.jobs.popleft()
        self._in_flight -= 1
        now = time.monotonic()
        self._last_completion = worker.head_start = now
        self._startup_deaths = 0
        rss = 0
        try:
            job_id, outputs, errors, rss = pickle.loads(data)
        except Exception as exc:
            error = _task_error(exc)
            error.message = f"the result of {job.name} cannot be unpickled: {exc}"
            self._attempt_failed(job, error)
        else:
            del data
            if job_id is not None and job_id != id(job):  # pragma: no cover - protocol bug
                raise ZarrOrchError(f"worker {worker.name} answered job {job_id}, not {id(job)}")
            if errors:
                self._job_errors(job, outputs, errors)
            else:
                self._finish_job(job, outputs, {})
        if self._max_rss is not None and rss > self._max_rss:
            self._retire(
                worker,
                f"its RSS {rss / 2**20:.0f} MB is above max_ram_per_worker="
                f"{self.conf['max_ram_per_worker']} MB",
            )
        if worker.retiring and not worker.jobs:
            self._forget(worker)

    def _job_errors(self, job: _Job, outputs: dict[int, list[Any]], errors: dict) -> None:
        """Turn a reply with failed steps into a retry, or into final per-step errors."""
        own = [err for kind, err in errors.values() if kind == "error"]
        if job.attempts <= self.max_retries:
            first = own[0] if own else None
            logger.warning(
                "%s failed (%s), retry %d/%d", job.name, first, job.attempts, self.max_retries
            )
            job.state = _PENDING
            self._ready.appendleft(job)
            return
        step_errors: dict[int, TaskError] = {}
        if None in errors:  # the whole job failed (payload or reply could not be pickled)
            whole = errors[None][1]
            step_errors = dict.fromkeys(job.uids(), whole)
        names = {step.uid: step.name for step in job.steps}
        for step in job.steps:
            if step.uid in step_errors or step.uid not in errors:
                continue
            kind, info = errors[step.uid]
            if kind == "error":
                step_errors[step.uid] = info
            else:
                step_errors[step.uid] = _upstream_error(names[info], step_errors[info])
        self._finish_job(job, outputs, step_errors)

    def _attempt_failed(self, job: _Job, error: TaskError) -> None:
        """A whole-job failure (worker died, timeout, RAM): retry or fail every step."""
        if job.attempts <= self.max_retries:
            logger.warning(
                "%s failed (%s), retry %d/%d", job.name, error, job.attempts, self.max_retries
            )
            job.state = _PENDING
            self._ready.appendleft(job)
        else:
            self._finish_job(job, {}, dict.fromkeys(job.uids(), error))

    def _finish_job(
        self, job: _Job, outputs: dict[int, list[Any]], step_errors: dict[int, TaskError]
    ) -> None:
        """Record a job's final result: fill its futures, release inputs, wake dependents."""
        if job.state == _FINISHED:
            return
        job.state = _FINISHED
        batch = job.batch
        for future in job.futures:
            uid = future.delayed.node.uid
            future.attempts = job.attempts
            if uid in step_errors:
                future.error = step_errors[uid]
            else:
                values = outputs[uid]
                future.value = (
                    values[0] if future.delayed.index is None else values[future.delayed.index]
                )
            future.done = True
            self._completed.append(future)
        refs, values = batch.refs, batch.values
        for uid in job.ext_deps:
            left = refs.get(uid, 0) - 1
            if left > 0:
                refs[uid] = left
            else:  # its last consumer: drop the kept output
                refs.pop(uid, None)
                values.pop(uid, None)
        if not batch.consumers:
            return
        for step in job.steps:
            uid = step.uid
            # this job finishes once: its consumers are woken (or failed) now, then forgotten
            consumers = batch.consumers.pop(uid, None)
            if not consumers:
                continue
            if uid in step_errors:
                upstream = _upstream_error(step.name, step_errors[uid])
                for consumer in consumers:
                    if consumer.state == _PENDING:
                        self._finish_job(consumer, {}, dict.fromkeys(consumer.uids(), upstream))
                continue
            if refs.get(uid, 0) > 0:
                values[uid] = outputs[uid]
            for consumer in consumers:
                if consumer.state != _PENDING:
                    continue
                consumer.waiting -= 1
                if consumer.waiting == 0:
                    self._ready.appendleft(consumer)  # depth first: frees memory early

    # -- failures of workers ------------------------------------------------------------------
    def _forget(self, worker: _Worker) -> None:
        """Drop a finished worker from the set (its process has exited or is exiting)."""
        if worker in self._set.workers:
            self._set.workers.remove(worker)
        with contextlib.suppress(OSError):
            worker.task_conn.close()
        worker.process.join(1.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(1.0)
        worker.result_conn.close()

    def _lose_worker(self, worker: _Worker, head_error: TaskError | None) -> None:
        """Worker gone or killed: fail its running job, requeue the queued ones, replace it."""
        jobs = list(worker.jobs)
        worker.jobs.clear()
        self._in_flight -= len(jobs)
        self._forget(worker)
        for job in reversed(jobs[1:]):  # never started: no attempt used
            job.attempts -= 1
            job.state = _PENDING
            self._ready.appendleft(job)
        if jobs and head_error is not None:
            self._attempt_failed(jobs[0], head_error)
        if not worker.retiring and not self._closed:
            self._start_worker()

    def _on_death(self, worker: _Worker) -> None:
        """A worker process ended: expected if it was retiring and idle, else a failure."""
        if worker not in self._set.workers:
            return
        try:  # a reply may still sit in the pipe
            while (worker.jobs or not worker.ready) and worker.result_conn.poll():
                self._on_message(worker, worker.result_conn.recv_bytes())
        except (EOFError, OSError):
            pass
        if worker not in self._set.workers:
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
                if self._startup_deaths > _MAX_STARTUP_DEATHS:
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

    def _kill(self, worker: _Worker, error: TaskError) -> None:
        logger.warning("%s: killing worker process %s", error.message, worker.pid)
        worker.process.kill()
        worker.process.join(2.0)
        self._lose_worker(worker, error)

    def _check_stalls(self, timeout: float | None) -> float | None:
        """Kill hung or over-RAM tasks; return seconds until the next check is due."""
        now = time.monotonic()
        wait: float | None = None
        busy = [w for w in self._set.workers if w.jobs and w.ready]
        for worker in [w for w in self._set.workers if not w.ready]:
            deadline = worker.started + _STARTUP_TIMEOUT
            if now >= deadline:
                message = (
                    f"worker process {worker.pid} did not start within {_STARTUP_TIMEOUT:g} s "
                    "(importing the task modules?)"
                )
                if worker.jobs:
                    message += f"; it was to run {worker.jobs[0].name}"
                self._kill(worker, TaskError("TimeoutError", message, message))
            else:
                wait = deadline - now if wait is None else min(wait, deadline - now)
        if timeout is not None:
            for worker in busy:
                deadline = max(self._last_completion, worker.head_start) + timeout
                if now >= deadline:
                    job = worker.jobs[0]
                    message = (
                        f"{job.name} did not complete within task_timeout={timeout:g} s "
                        f"(no task completed meanwhile); its worker process was killed"
                    )
                    self._kill(worker, TaskError("TimeoutError", message, message))
                else:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
        if self._max_rss is not None and busy:
            if now - self._last_ram_check >= _RAM_CHECK_INTERVAL:
                self._last_ram_check = now
                for worker in [w for w in self._set.workers if w.jobs and w.ps is not None]:
                    try:
                        rss = worker.ps.memory_info().rss
                    except psutil.Error:
                        continue  # exiting: the sentinel will tell
                    if rss > self._max_rss:
                        job = worker.jobs[0]
                        message = (
                            f"{job.name} pushed its worker process to {rss / 2**20:.0f} MB RSS, "
                            f"above max_ram_per_worker={self.conf['max_ram_per_worker']} MB; "
                            "the worker was killed (use smaller tiles or raise the limit)"
                        )
                        self._kill(worker, TaskError("MemoryError", message, message))
            ram_wait = max(0.0, self._last_ram_check + _RAM_CHECK_INTERVAL - now)
            wait = ram_wait if wait is None else min(wait, ram_wait)
        return wait

    def _pump(self, timeout: float | None) -> None:
        """One scheduler step: wait for results or deaths, handle them, dispatch more work."""
        done_before = len(self._completed)
        wait = self._check_stalls(timeout)
        self._dispatch()
        if len(self._completed) > done_before:
            return  # let the iterator yield them first
        if not self._in_flight:
            if self._ready:
                wait = 0.05  # no worker to take them right now (restarting)
            else:
                raise ZarrOrchError("futures are pending but no task is running or ready")
        by_object: dict[Any, tuple[_Worker, bool]] = {}
        for worker in self._set.workers:
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
            if worker not in self._set.workers:
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
        queued = set(self._completed)
        for future in future_list:  # yielded before: its value is gone
            if future.done and future in pending and future not in queued:
                pending.discard(future)
                yield Outcome(future, error=future.error, attempts=future.attempts)
        try:
            while pending:
                mine = [f for f in self._completed if f in pending]
                if not mine:
                    self._check_open()
                    self._pump(timeout)
                    continue
                self._completed = [f for f in self._completed if f not in pending]
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
        for future in future_list:
            if isinstance(future, MpFuture) and not future.done:
                future.cancelled = True
        for job in list(self._ready):
            if job.state == _PENDING and not job.needed():
                self._ready.remove(job)
                error = TaskError("CancelledError", f"{job.name} was cancelled", "")
                self._finish_job(job, {}, dict.fromkeys(job.uids(), error))

    def cleanup(self, **kwargs: Any) -> None:
        """Stop and join every worker process and remove the scratch dir (idempotent)."""
        self._closed = True
        self._ready.clear()
        self._finalizer()
