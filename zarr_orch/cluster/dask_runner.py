"""Runs zarr_orch task graphs on a `distributed` cluster: one distributed task per job.

A job is a task plus the nodes fused into it (its sink, single-consumer chain links), as in
multiprocessing mode, so a saved tile is computed and written by one distributed task and
only its receipt comes back. Outputs that feed other jobs stay on the workers as distributed
futures; we hold them until their consumers are submitted, the scheduler until those have
run. Jobs are
submitted in bounded batches as results come back. Each job travels as one pickled payload
called through builtins (`operator.call`, `pickle.loads`), so the scheduler never unpickles
user code, and the graph never embeds tile data: concrete inputs of `SCATTER_BYTES` or more
are scattered to the workers once and passed as dependencies.
"""

from __future__ import annotations

import itertools
import logging
import operator
import pickle
import time
import traceback
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from zarr_orch.cluster.base import Outcome, TaskError
from zarr_orch.cluster.dask_jobs import (
    COMPUTED,
    FINISHED,
    PENDING,
    SUBMITTED,
    DaskFuture,
    InputSlot,
    Job,
    JobPayload,
    StepRef,
    plan_jobs,
)
from zarr_orch.cluster.graph import Delayed
from zarr_orch.errors import ZarrOrchError

logger = logging.getLogger(__name__)

#: concrete task inputs at least this big (dask.sizeof) are scattered, not put in the graph
SCATTER_BYTES = 64 * 1024
#: seconds between two checks of the timeout while waiting for a completion
_POLL = 0.1
#: exact types that never hold anything to replace in task arguments
_LEAF_TYPES = frozenset({int, float, str, bytes, bool, complex, type(None)})


def _size(obj: Any, sizeof: Callable[[Any], int]) -> int:
    """Bytes `obj` would add to a graph; `nbytes` first, as it never loads lazy tiles."""
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return int(sizeof(obj))


class DaskRunner:
    """Submits jobs to a `distributed.Client` in bounded batches and collects their outcomes."""

    def __init__(
        self,
        client: Any,
        retries: int,
        max_in_flight: int | None,
        on_timeout: Callable[[list[str]], None],
    ) -> None:
        from distributed import Future, as_completed

        self.client = client
        self.retries = retries
        self._max_in_flight = max_in_flight
        self._on_timeout = on_timeout
        self._future_type = Future
        self._ready: deque[Job] = deque()
        self._in_flight = 0
        self._tracked: dict[str, tuple[Job, int | None]] = {}
        self._completed = as_completed([], with_results=False, loop=client.loop)
        self._limit = 0
        self._finished: list[DaskFuture] = []
        self._scattered: dict[int, list[Any]] = {}  # id(obj) -> [obj, future, users]
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._last = time.monotonic()
        self.stats = {"graphs": 0, "jobs": 0, "scattered": 0}

    # -- planning -----------------------------------------------------------------------------
    def max_in_flight(self) -> int:
        """Jobs submitted whose values are awaited: 8 per worker thread unless configured.

        A task waiting on a worker holds only its small payload, so the bound is about
        keeping every thread fed across the round trips, not about memory.
        """
        if self._max_in_flight:
            return self._max_in_flight
        try:
            threads = sum(self.client.nthreads().values())
        except Exception:  # a best-effort sizing: a scheduler briefly without workers
            threads = 0
        return max(8, 8 * threads)

    def start(self, task_list: list[Any]) -> list[DaskFuture]:
        """Plan the jobs of `task_list`, submit the first batch, return one future each."""
        jobs, job_of = plan_jobs([t for t in task_list if isinstance(t, Delayed)])
        futures = []
        for task in task_list:
            future = DaskFuture(task)
            futures.append(future)
            if isinstance(task, Delayed):
                job = job_of[task.node.uid]
                job.futures += (future,)
                future.job = job
            else:  # already a value: nothing to compute
                future.value, future.done = task, True
                self._finished.append(future)
        del job_of
        self._ready.extend(job for job in jobs if not job.waiting)
        self._limit = self.max_in_flight()  # workers may have come or gone since last time
        logger.debug("start_tasks: %d futures, %d jobs", len(futures), len(jobs))
        self._submit()
        return futures

    # -- submitting ---------------------------------------------------------------------------
    def _submit(self, slack: int = 0) -> None:
        """Submit ready jobs (consumers first) while fewer than max_in_flight are running.

        `slack` counts jobs known to be finished whose values are not booked yet.
        """
        limit = (self._limit or self.max_in_flight()) + slack
        if not self._ready or (self._in_flight > limit // 2 and self._ready[0].deps == ()):
            return
        from dask._expr import LLGExpr
        from dask._task_spec import Task, TaskRef

        batch: list[Job] = []
        while self._ready and (self._in_flight + len(batch) < limit or self._ready[0].deps):
            job = self._ready.popleft()
            if job.state == PENDING and self._wanted(job):
                batch.append(job)
            elif job.state == PENDING:
                self._fail(job, TaskError("CancelledError", f"{job.name} was cancelled", ""))
        if not batch:
            return
        heavy: dict[int, Any] = {}
        encoded = []
        for job in batch:
            try:
                encoded.append(self._encode(job, heavy))
            except Exception as exc:
                encoded.append(None)
                error = TaskError.from_exception(exc)
                error.message = f"the arguments of {job.name} cannot be pickled: {exc}"
                self._fail(job, error)
        self._scatter(heavy)
        graph: dict[str, Any] = {}
        keys: list[str] = []
        for job, item in zip(batch, encoded, strict=True):
            if item is None:
                continue
            payload, inputs = item
            refs = [TaskRef(self._input_key(value)) for value in inputs]
            job.key = f"{job.steps[0].name}-zo{self._prefix}-{next(self._ids)}"
            graph[job.key] = Task(job.key, operator.call, Task(None, pickle.loads, payload), *refs)
            keys.append(job.key)
            getters = self._getter_uids(job)
            for uid in getters:
                key = f"{job.key}-out{uid}"
                graph[key] = Task(key, operator.getitem, TaskRef(job.key), uid)
                keys.append(key)
            job.scattered = tuple(id(v) for v in inputs if not isinstance(v, Job))
            for ident in job.scattered:
                self._scattered[ident][2] += 1
        if not graph:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # a graph named by us: dask would otherwise hash every task to name it
            expr = LLGExpr(graph, _determ_token=f"zo{self._prefix}-{self.stats['graphs']}")
            dfutures = self.client.get(expr, keys, sync=False, retries=self.retries or None)
        for warning in caught:  # e.g. "Sending large graph": for the run log, not the console
            logger.info("distributed: %s", str(warning.message).splitlines()[0])
        by_key = dict(zip(keys, dfutures, strict=True))
        self.stats["graphs"] += 1
        for job, item in zip(batch, encoded, strict=True):
            if item is None:
                continue
            self.stats["jobs"] += 1
            job.state = SUBMITTED
            job.dfuture = by_key[job.key]
            fetched = [(None, job.dfuture)] if not job.consumers and job.futures else []
            for uid in self._getter_uids(job):
                job.getters[uid] = by_key[f"{job.key}-out{uid}"]
                fetched.append((uid, job.getters[uid]))
            for uid, dfuture in fetched:
                self._tracked[dfuture.key] = (job, uid)
            if fetched:
                job.outstanding = len(fetched)
                self._in_flight += 1
                self._completed.update([dfuture for _, dfuture in fetched])
            for producer in job.deps:
                producer.unsubmitted -= 1
                self._release_if_done(producer)
            for consumer in reversed(job.consumers):
                consumer.waiting -= 1
                if consumer.waiting == 0:
                    self._ready.appendleft(consumer)  # depth first: frees memory early
            self._release_if_done(job)
        if self._ready and self._ready[0].deps:
            self._submit()

    def _wanted(self, job: Job) -> bool:
        """True while a future or a pending consumer still wants this job's outputs."""
        if any(not f.cancelled for f in job.futures):
            return True
        return any(c.state == PENDING and self._wanted(c) for c in job.consumers)

    @staticmethod
    def _getter_uids(job: Job) -> list[int]:
        """Outputs fetched by small extra tasks: a job feeding others keeps its data on the
        workers, so the main process only fetches what its futures want."""
        if not job.consumers:
            return []
        return sorted({f.delayed.node.uid for f in job.futures})

    def _input_key(self, value: Any) -> str:
        if isinstance(value, Job):
            return value.key
        return self._scattered[id(value)][1].key

    def _encode(self, job: Job, heavy: dict[int, Any]) -> tuple[bytes, list[Any]]:
        """Pickle a job's steps; inputs (other jobs, futures, big objects) become `InputSlot`s."""
        from dask.sizeof import sizeof
        from distributed.protocol.pickle import dumps

        in_job = job.uids()
        inputs: list[Any] = []
        positions: dict[int, int] = {}

        def position(value: Any) -> int:
            ident = id(value)
            if ident not in positions:
                positions[ident] = len(inputs)
                inputs.append(value)
            return positions[ident]

        def encode(obj: Any) -> tuple[Any, bool]:
            kind = type(obj)
            if kind in _LEAF_TYPES:
                return obj, False
            if kind is Delayed:
                uid = obj.node.uid
                if uid in in_job:
                    return StepRef(uid, obj.index), True
                producer = next(d for d in job.deps if uid in d.uids())
                return InputSlot(position(producer), uid, obj.index), True
            if isinstance(obj, self._future_type):
                self._scattered.setdefault(id(obj), [obj, obj, 0])
                return InputSlot(position(obj), None, None), True
            if isinstance(obj, list | tuple | set | frozenset | dict):
                items = obj.items() if isinstance(obj, dict) else obj
                changed = False
                out = []
                for item in items:
                    if isinstance(obj, dict):
                        value, hit = encode(item[1])
                        out.append((item[0], value))
                    else:
                        value, hit = encode(item)
                        out.append(value)
                    changed = changed or hit
                if not changed:
                    return obj, False
                if isinstance(obj, dict):
                    return dict(out), True
                if isinstance(obj, tuple) and hasattr(obj, "_fields"):
                    return kind(*out), True
                return kind(out), True
            if _size(obj, sizeof) >= SCATTER_BYTES:
                if id(obj) not in self._scattered:
                    heavy[id(obj)] = obj
                return InputSlot(position(obj), None, None), True
            return obj, False

        steps = []
        for node in job.steps:
            args, hit_args = encode(node.args)
            kwargs, hit_kwargs = encode(node.kwargs)
            steps.append(
                (node.uid, node.name, node.func, args, kwargs, node.nout, hit_args or hit_kwargs)
            )
        returns = {f.delayed.node.uid for f in job.futures}
        for consumer in job.consumers:
            for step in consumer.steps:
                returns.update(d.node.uid for d in step.dependencies() if d.node.uid in in_job)
        payload = JobPayload(steps, tuple(sorted(returns)))
        return dumps(payload), inputs

    def _scatter(self, heavy: dict[int, Any]) -> None:
        """Ship big concrete inputs to the workers once (one call for the whole batch)."""
        if not heavy:
            return
        objects = list(heavy.values())
        futures = self.client.scatter(objects, hash=False)
        for obj, future in zip(objects, futures, strict=True):
            self._scattered[id(obj)] = [obj, future, 0]
        self.stats["scattered"] += len(objects)

    # -- results ------------------------------------------------------------------------------
    def iterate(self, future_list: list[DaskFuture], timeout: float | None) -> Iterator[Outcome]:
        """Yield one Outcome per future of `future_list` as it completes (any order)."""
        pending = {id(f): f for f in future_list if not f.done}
        for future in future_list:
            if future.done and id(future) not in pending:
                if future in self._finished:
                    self._finished.remove(future)
                yield self._outcome(future)
        self._last = time.monotonic()
        while pending:
            mine = [f for f in self._finished if id(f) in pending]
            if mine:
                self._finished = [f for f in self._finished if id(f) not in pending]
                for future in mine:
                    del pending[id(future)]
                    outcome = self._outcome(future)
                    future.value = None
                    yield outcome
                    del outcome
                continue
            self._pump(timeout)

    @staticmethod
    def _outcome(future: DaskFuture) -> Outcome:
        return Outcome(future, value=future.value, error=future.error)

    def _pump(self, timeout: float | None) -> None:
        """Wait for completions (or the timeout), book them, submit more."""
        completed = self._completed
        if not completed.has_ready():
            if not self._tracked and not self._ready:
                raise ZarrOrchError("futures are pending but no task is running or ready")
            if timeout is not None and time.monotonic() - self._last >= timeout:
                self._time_out(timeout)
                return
            with completed.thread_condition:  # notified under this lock: no lost wake-up
                if not completed.has_ready():
                    completed.thread_condition.wait(timeout=_POLL)
            return
        done = completed.next_batch(block=False)
        self._last = time.monotonic()
        entries = [(f, self._tracked.pop(f.key, None)) for f in done]
        finished = [f for f, entry in entries if entry is not None and f.status == "finished"]
        # feed the workers first, then fetch every value of the batch with one gather
        self._submit(slack=len(finished))
        values: dict[str, Any] = {}
        if finished:
            try:
                values = dict(
                    zip([f.key for f in finished], self.client.gather(finished), strict=True)
                )
            except Exception:  # lost meanwhile, or one cannot be unpickled: one by one
                values = {}
        for future, entry in entries:
            if entry is None:  # timed out and cancelled before
                continue
            job, uid = entry
            if future.status == "finished" and future.key in values:
                self._computed(job, uid, future, values.pop(future.key))
            elif future.status == "finished":
                try:
                    self._computed(job, uid, future, future.result(timeout=60))
                except Exception as exc:
                    self._errored(job, uid, TaskError.from_exception(exc))
            elif future.status == "error":
                exc = future.exception()
                text = "".join(traceback.format_exception(type(exc), exc, future.traceback()))
                self._errored(job, uid, TaskError(type(exc).__name__, str(exc), text, exc))
            else:
                message = f"{job.name} ({future.key}) was {future.status}"
                self._errored(job, uid, TaskError("CancelledError", message, message))
        del done, entries, finished, values
        self._submit()

    def _computed(self, job: Job, uid: int | None, dfuture: Any, value: Any) -> None:
        """A fetched value arrived: a whole job's (uid None) or one getter's outputs."""
        for future in job.futures:
            if uid is None or future.delayed.node.uid == uid:
                outputs = value[future.delayed.node.uid] if uid is None else value
                index = future.delayed.index
                self._resolve(future, outputs[0] if index is None else outputs[index], None)
        self._settle(job, uid, dfuture)

    def _errored(self, job: Job, uid: int | None, error: TaskError) -> None:
        """A fetched task failed (after distributed's retries) or was cancelled."""
        for future in job.futures:
            if uid is None or future.delayed.node.uid == uid:
                self._resolve(future, None, error)
        self._settle(job, uid, None)

    def _settle(self, job: Job, uid: int | None, dfuture: Any) -> None:
        """One awaited value of `job` is in: release its getter; maybe the job itself."""
        if uid is not None:
            job.getters.pop(uid, None)
            if dfuture is not None:
                dfuture.release()
        job.outstanding -= 1
        if job.outstanding == 0:
            self._in_flight -= 1
            job.state = COMPUTED
        self._release_if_done(job)

    def _fail_consumers(self, job: Job, error: TaskError) -> None:
        """Consumers not submitted yet can never run: fail them with the upstream error."""
        upstream = TaskError(
            error.exc_type,
            f"upstream {job.name} failed: {error.message}",
            error.traceback,
            error.exception,
        )
        for consumer in job.consumers:
            if consumer.state == PENDING:
                self._fail(consumer, upstream)

    def _fail(self, job: Job, error: TaskError) -> None:
        """Fail a job that was never submitted, and what depends on it."""
        job.state = FINISHED
        if job in self._ready:
            self._ready.remove(job)
        for future in job.futures:
            self._resolve(future, None, error)
        for producer in job.deps:
            producer.unsubmitted -= 1
            self._release_if_done(producer)
        self._fail_consumers(job, error)

    def _resolve(self, future: DaskFuture, value: Any, error: TaskError | None) -> None:
        if future.done:
            return
        future.done, future.value, future.error = True, value, error
        future.job = None
        self._finished.append(future)

    def _release_if_done(self, job: Job) -> None:
        """Forget a job once its values are in and its consumers are submitted.

        A job feeding others is released as soon as they are submitted: the scheduler keeps
        its data exactly as long as those consumers need it.
        """
        if job.state == PENDING or job.state == FINISHED:
            return
        if job.outstanding > 0 or job.unsubmitted > 0:
            return
        job.state = FINISHED
        if job.dfuture is not None:
            job.dfuture.release()
            job.dfuture = None
        for ident in job.scattered:
            entry = self._scattered.get(ident)
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._scattered[ident]
                    if entry[1] is not entry[0]:
                        entry[1].release()
        job.scattered = ()
        job.consumers = []
        job.deps = ()

    def _time_out(self, timeout: float) -> None:
        """No completion for `timeout` s: cancel and fail the submitted jobs still awaited."""
        entries = list(self._tracked.items())
        self._tracked.clear()
        jobs = {id(job): job for _, (job, _) in entries}
        keys = [job.key for job in jobs.values()]
        keys += [dep.key for job in jobs.values() for dep in job.deps]
        stuck = self._processing_workers(keys)
        logger.warning(
            "no task completed for task_timeout=%g s: cancelling %d task(s)", timeout, len(jobs)
        )
        self.client.cancel([job.dfuture for job in jobs.values() if job.dfuture is not None])
        for _key, (job, uid) in entries:
            message = (
                f"{job.name} ({job.key}) did not complete within task_timeout={timeout:g} s "
                "(no task completed meanwhile); it was cancelled"
            )
            error = TaskError("TimeoutError", message, message)
            self._errored(job, uid, error)
            self._fail_consumers(job, error)
        if stuck:
            self._on_timeout(stuck)
        self._last = time.monotonic()
        self._submit()

    def _processing_workers(self, keys: list[str]) -> list[str]:
        """Workers currently running one of `keys`."""
        try:
            processing = self.client.processing()
        except Exception:  # a best-effort diagnostic
            return []
        wanted = set(keys)
        return [w for w, ks in processing.items() if any(str(k) in wanted for k in ks)]

    # -- stopping -----------------------------------------------------------------------------
    def cancel(self, future_list: Any) -> None:
        """Drop jobs whose outputs no remaining future or consumer needs."""
        for future in future_list:
            if isinstance(future, DaskFuture) and not future.done:
                future.cancelled = True
        for job in list(self._ready):
            if job.state == PENDING and not self._wanted(job):
                self._fail(job, TaskError("CancelledError", f"{job.name} was cancelled", ""))
        running = {
            id(job): job
            for job, _ in list(self._tracked.values())
            if job.dfuture is not None and not self._wanted(job)
        }
        if running:
            self.client.cancel([job.dfuture for job in running.values()])

    def close(self) -> None:
        """Forget every pending job (the client is closed by the cluster)."""
        self._ready.clear()
        self._tracked.clear()
        self._scattered.clear()
        self._completed.clear()
        self._in_flight = 0
        self._finished.clear()

    def __repr__(self) -> str:
        return f"DaskRunner(in_flight={self._in_flight}, ready={len(self._ready)})"
