"""The jobs of the dask modes: what one distributed task runs, and how a graph is cut into them.

A job is a node of zarr_orch's lazy graph plus the nodes fused into it (its sink,
single-consumer chain links), exactly as in multiprocessing mode, so a saved tile is computed
and written by one distributed task. `JobPayload` is what a worker calls: the job's steps,
with inputs from other tasks marked by `InputSlot` and outputs of earlier steps of the same
job by `StepRef`. The bookkeeping classes (`Job`, `DaskFuture`) live in the main process.
"""

from __future__ import annotations

import types
from typing import Any

from zarr_orch.cluster.base import TaskError
from zarr_orch.cluster.graph import Delayed, TaskNode, split_outputs


# -- what runs on the worker ------------------------------------------------------------------
class InputSlot:
    """In a payload: input `pos` of the distributed task (``[uid][index]`` of it, if uid set)."""

    __slots__ = ("index", "pos", "uid")

    def __init__(self, pos: int, uid: int | None, index: int | None) -> None:
        self.pos, self.uid, self.index = pos, uid, index

    def __reduce__(self) -> tuple[type[InputSlot], tuple[int, int | None, int | None]]:
        return (InputSlot, (self.pos, self.uid, self.index))


class StepRef:
    """In a payload: the output of an earlier step of the same job."""

    __slots__ = ("index", "uid")

    def __init__(self, uid: int, index: int | None) -> None:
        self.uid, self.index = uid, index

    def __reduce__(self) -> tuple[type[StepRef], tuple[int, int | None]]:
        return (StepRef, (self.uid, self.index))


def fill(obj: Any, inputs: tuple[Any, ...], values: dict[int, list[Any]]) -> Any:
    """`obj` with every `InputSlot` and `StepRef` replaced by its value (nested containers too)."""
    if isinstance(obj, InputSlot):
        value = inputs[obj.pos]
        if obj.uid is None:
            return value
        outputs = value[obj.uid]
        return outputs[0] if obj.index is None else outputs[obj.index]
    if isinstance(obj, StepRef):
        outputs = values[obj.uid]
        return outputs[0] if obj.index is None else outputs[obj.index]
    if isinstance(obj, list):
        return [fill(item, inputs, values) for item in obj]
    if isinstance(obj, tuple):
        items = [fill(item, inputs, values) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, set | frozenset):
        return type(obj)(fill(item, inputs, values) for item in obj)
    if isinstance(obj, dict):
        return {key: fill(value, inputs, values) for key, value in obj.items()}
    return obj


class JobPayload:
    """The steps of one job; called on the worker with the job's inputs, in order.

    Returns ``{uid: outputs}`` for the steps whose outputs someone wants (a future in the
    main process, or another job).
    """

    __slots__ = ("returns", "steps")

    def __init__(self, steps: list[tuple], returns: tuple[int, ...]) -> None:
        self.steps = steps
        self.returns = returns

    def __reduce__(self) -> tuple[type[JobPayload], tuple[list[tuple], tuple[int, ...]]]:
        return (JobPayload, (self.steps, self.returns))

    def __call__(self, *inputs: Any) -> dict[int, list[Any]]:
        values: dict[int, list[Any]] = {}
        for uid, name, func, args, kwargs, nout, has_inputs in self.steps:
            if has_inputs:
                args = fill(args, inputs, values)
                kwargs = fill(kwargs, inputs, values)
            result = func(*args, **kwargs)
            values[uid] = split_outputs(types.SimpleNamespace(name=name, nout=nout), result)
            del args, kwargs, result
        return {uid: values[uid] for uid in self.returns}


# -- main-process bookkeeping -----------------------------------------------------------------
class DaskFuture:
    """A started task of a dask cluster (what `start_tasks` returns)."""

    __slots__ = ("cancelled", "delayed", "done", "error", "job", "value")

    def __init__(self, delayed: Any) -> None:
        self.delayed = delayed
        self.job: Job | None = None
        self.done = False
        self.cancelled = False
        self.value: Any = None
        self.error: TaskError | None = None

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("error" if self.error else "done")
        return f"DaskFuture({self.delayed!r}, {state})"


PENDING, SUBMITTED, COMPUTED, FINISHED = "pending", "submitted", "computed", "finished"


class Job:
    """A node plus the nodes fused into it: one distributed task."""

    __slots__ = (
        "consumers",
        "deps",
        "dfuture",
        "futures",
        "getters",
        "key",
        "outstanding",
        "scattered",
        "state",
        "steps",
        "unsubmitted",
        "waiting",
    )

    def __init__(self, head: TaskNode) -> None:
        self.steps: tuple[TaskNode, ...] = (head,)
        self.deps: tuple[Job, ...] = ()
        self.consumers: list[Job] = []
        self.futures: tuple[DaskFuture, ...] = ()
        self.waiting = 0  # dependencies not submitted yet
        self.unsubmitted = 0  # consumers not submitted yet
        self.state = PENDING
        self.key = ""
        self.dfuture: Any = None
        self.getters: dict[int, Any] = {}
        self.outstanding = 0  # distributed futures whose values we still wait for
        self.scattered: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """Head task name, plus the fused ones, for messages."""
        head = repr(self.steps[0].name)
        if len(self.steps) == 1:
            return f"task {head}"
        rest = ", ".join(repr(step.name) for step in self.steps[1:])
        return f"task {head} (with fused {rest})"

    def uids(self) -> set[int]:
        """Uids of the nodes this job runs."""
        return {step.uid for step in self.steps}


def plan_jobs(roots: list[Delayed]) -> tuple[list[Job], dict[int, Job]]:
    """Group the graph of `roots` into jobs (dependencies first); also the job of each uid.

    A node joins the job of its single dependency when it is fused (a sink) or is that
    dependency's only user and the dependency is not itself a root (a chain link).
    """
    order: list[TaskNode] = []
    deps_of: dict[int, tuple[Delayed, ...]] = {}
    users: dict[int, int] = {}
    shared = -1
    for root in roots:
        stack: list[tuple[TaskNode, bool]] = [(root.node, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node.uid in deps_of:
                continue
            deps = tuple(node.dependencies())
            deps_of[node.uid] = deps
            stack.append((node, True))
            for dep in reversed(deps):
                if users.setdefault(dep.node.uid, node.uid) != node.uid:
                    users[dep.node.uid] = shared
                if dep.node.uid not in deps_of:
                    stack.append((dep.node, False))
    for root in roots:
        if root.node.uid in users:
            users[root.node.uid] = shared
    job_of: dict[int, Job] = {}
    jobs: list[Job] = []
    for node in order:
        deps = deps_of[node.uid]
        host = None
        if deps:
            parent = deps[0].node.uid
            single = all(dep.node.uid == parent for dep in deps)
            if single and (node.fused or users[parent] == node.uid):
                host = job_of[parent]
        if host is None:
            host = Job(node)
            jobs.append(host)
        else:
            host.steps += (node,)
        job_of[node.uid] = host
    for job in jobs:
        found: dict[int, Job] = {}
        for step in job.steps:
            for dep in deps_of[step.uid]:
                producer = job_of[dep.node.uid]
                if producer is not job:
                    found.setdefault(id(producer), producer)
        job.deps = tuple(found.values())
        job.waiting = len(job.deps)
        for producer in job.deps:
            producer.consumers.append(job)
            producer.unsubmitted += 1
    return jobs, job_of
