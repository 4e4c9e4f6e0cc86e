"""Jobs over the task graph: fusing nodes into jobs, walking dependencies, and the queue of
ready jobs whose results fill futures, release kept inputs and wake dependents."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

from zarr_orch.cluster.base import TaskError
from zarr_orch.cluster.graph import Delayed, TaskNode

#: the mode's logger, one name for the whole package (as before it was split into modules)
logger = logging.getLogger(__package__)


def upstream_error(name: str, error: TaskError) -> TaskError:
    """The error of a task whose input task `name` failed with `error`."""
    return TaskError(
        error.exc_type,
        f"upstream task {name!r} failed: {error.message}",
        error.traceback,
        error.exception,
    )


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


PENDING, RUNNING, FINISHED = "pending", "running", "finished"


class Job:
    """A node plus the nodes fused into it; the unit sent to one worker call.

    A breakpoint holds one per tile, so a job keeps only what scheduling needs, in tuples
    (shared when empty); the uids it holds and the outputs it sends back are derived on demand.
    """

    __slots__ = ("attempts", "batch", "ext_deps", "futures", "state", "steps", "waiting")

    def __init__(self, batch: Batch, head: TaskNode) -> None:
        self.batch = batch
        self.steps: tuple[TaskNode, ...] = (head,)
        #: uids of outputs of other jobs this one consumes (the head's dependencies among them)
        self.ext_deps: tuple[int, ...] = ()
        self.futures: tuple[MpFuture, ...] = ()
        self.waiting = 0
        self.attempts = 0
        self.state = PENDING

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

    def dependents(self) -> Iterator[Job]:
        """Jobs of the same batch consuming an output of this one."""
        consumers = self.batch.consumers
        if consumers:
            for step in self.steps:
                yield from consumers.get(step.uid, ())

    def needed(self) -> bool:
        """True while some future or dependent job still wants this job's outputs."""
        if any(not f.cancelled for f in self.futures):
            return True
        return any(d.state != FINISHED and d.needed() for d in self.dependents())


class Batch:
    """The graph state of one `start_tasks` call: node outputs kept for pending consumers.

    Only nodes consumed by another job appear here, and only until their last consumer is
    done, so a batch of independent tiles costs nothing per tile once planned.
    """

    __slots__ = ("consumers", "refs", "values")

    def __init__(self) -> None:
        #: node uid -> jobs consuming its output (dropped once the node's job is finished)
        self.consumers: dict[int, list[Job]] = {}
        #: node uid -> outputs held for pending consumers
        self.values: dict[int, list[Any]] = {}
        #: node uid -> consumers not finished yet
        self.refs: dict[int, int] = {}


#: `walk`'s mark of a node used by several nodes, or returned itself (never fused into a user)
SHARED = -1


def walk(
    roots: list[Delayed],
) -> tuple[list[TaskNode], dict[int, tuple[Delayed, ...]], dict[int, int]]:
    """Nodes needed by `roots`, dependencies first, each node's dependencies, its only user.

    The order is `topological_nodes`'s; one pass computes each node's dependencies once and
    records, per used node, its single user's uid or `SHARED` (no per-node sets).
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
                    users[parent] = SHARED
                if parent not in deps_of:
                    stack.append((dep.node, None))
    for root in roots:
        if root.node.uid in users:
            users[root.node.uid] = SHARED
    return order, deps_of, users


def plan_jobs(batch: Batch, roots: list[Delayed]) -> tuple[list[Job], dict[int, Job]]:
    """Group the graph of `roots` into jobs; return them and the job of each node uid.

    A node joins the job of its single dependency when it is fused (a sink) or is that
    dependency's only user and the dependency is not itself returned (a chain link). Other
    dependencies become the job's `ext_deps`, recorded in the batch as consumers.
    """
    order, deps_of, users = walk(roots)
    job_of: dict[int, Job] = {}
    jobs: list[Job] = []
    for node in order:
        uid = node.uid
        deps = deps_of[uid]
        host = None
        if deps:
            parent = deps[0].node.uid
            if (node.fused or users[parent] == uid) and all(dep.node.uid == parent for dep in deps):
                host = job_of[parent]
        if host is None:
            host = Job(batch, node)
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


class JobQueue:
    """The scheduling state of a cluster: ready jobs, completed futures, jobs in flight.

    It knows jobs and futures only, never processes: the cluster sends what `ready` holds
    (within `max_in_flight`) and reports back each job's outcome here.
    """

    def __init__(self, max_retries: int, max_in_flight: int) -> None:
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        #: jobs whose inputs are all available, next first
        self.ready: deque[Job] = deque()
        #: futures done and not yet handed out by an outcome iterator
        self.completed: list[MpFuture] = []
        #: jobs sent to workers and not answered yet
        self.in_flight = 0

    def has_room(self) -> bool:
        """True while some job is ready and fewer than `max_in_flight` are in flight."""
        return bool(self.ready) and self.in_flight < self.max_in_flight

    def add_tasks(self, task_list: list[Any]) -> tuple[list[MpFuture], int]:
        """Plan the jobs of `task_list` and queue the ready ones; return one future per task
        (values that are not tasks are done at once) and the number of jobs planned."""
        batch = Batch()
        jobs, job_of = plan_jobs(batch, [task for task in task_list if isinstance(task, Delayed)])
        futures: list[MpFuture] = []
        for task in task_list:
            future = MpFuture(task)
            futures.append(future)
            if isinstance(task, Delayed):
                job = job_of[task.node.uid]
                job.futures += (future,)
            else:  # already a value: nothing to compute
                future.value, future.done = task, True
                self.completed.append(future)
        del job_of
        self.ready.extend(job for job in jobs if not job.waiting)
        return futures, len(jobs)

    def put_back(self, job: Job) -> None:
        """Queue again, first, a job sent to a worker that never started it (no attempt used)."""
        job.attempts -= 1
        job.state = PENDING
        self.ready.appendleft(job)

    def job_errors(self, job: Job, outputs: dict[int, list[Any]], errors: dict) -> None:
        """Turn a reply with failed steps into a retry, or into final per-step errors."""
        own = [err for kind, err in errors.values() if kind == "error"]
        if job.attempts <= self.max_retries:
            first = own[0] if own else None
            logger.warning(
                "%s failed (%s), retry %d/%d", job.name, first, job.attempts, self.max_retries
            )
            job.state = PENDING
            self.ready.appendleft(job)
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
                step_errors[step.uid] = upstream_error(names[info], step_errors[info])
        self.finish_job(job, outputs, step_errors)

    def attempt_failed(self, job: Job, error: TaskError) -> None:
        """A whole-job failure (worker died, timeout, RAM): retry or fail every step."""
        if job.attempts <= self.max_retries:
            logger.warning(
                "%s failed (%s), retry %d/%d", job.name, error, job.attempts, self.max_retries
            )
            job.state = PENDING
            self.ready.appendleft(job)
        else:
            self.finish_job(job, {}, dict.fromkeys(job.uids(), error))

    def finish_job(
        self, job: Job, outputs: dict[int, list[Any]], step_errors: dict[int, TaskError]
    ) -> None:
        """Record a job's final result: fill its futures, release inputs, wake dependents."""
        if job.state == FINISHED:
            return
        job.state = FINISHED
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
            self.completed.append(future)
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
                upstream = upstream_error(step.name, step_errors[uid])
                for consumer in consumers:
                    if consumer.state == PENDING:
                        self.finish_job(consumer, {}, dict.fromkeys(consumer.uids(), upstream))
                continue
            if refs.get(uid, 0) > 0:
                values[uid] = outputs[uid]
            for consumer in consumers:
                if consumer.state != PENDING:
                    continue
                consumer.waiting -= 1
                if consumer.waiting == 0:
                    self.ready.appendleft(consumer)  # depth first: frees memory early

    def cancel(self, future_list: Any) -> None:
        """Drop jobs not yet sent whose outputs no remaining future or dependent needs."""
        for future in future_list:
            if isinstance(future, MpFuture) and not future.done:
                future.cancelled = True
        for job in list(self.ready):
            if job.state == PENDING and not job.needed():
                self.ready.remove(job)
                error = TaskError("CancelledError", f"{job.name} was cancelled", "")
                self.finish_job(job, {}, dict.fromkeys(job.uids(), error))
