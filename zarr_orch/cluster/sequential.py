"""Sequential mode: every task runs lazily, in the main process, in the order it was started.

Meant for debugging, notebooks and small jobs: nothing is pickled, a debugger can step into
tasks, and results come back in row-major order. Timeouts cannot be enforced in-process.
Tile functions run in the calling thread; a tile's sink (writing its chunks) runs in one
background thread while the next tile computes, so compute and storage I/O overlap.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from zarr_orch.cluster.base import AbstractCluster, Outcome, TaskError
from zarr_orch.cluster.graph import (
    Delayed,
    GraphTasks,
    TaskNode,
    split_outputs,
    substitute,
    topological_nodes,
)

logger = logging.getLogger(__name__)


class SequentialFuture:
    """A started task of the sequential cluster: just the Delayed it will compute."""

    __slots__ = ("delayed",)

    def __init__(self, delayed: Delayed) -> None:
        self.delayed = delayed

    def __repr__(self) -> str:
        return f"SequentialFuture({self.delayed!r})"


class GraphRunner:
    """Computes Delayed objects in-process, memoising node outputs only while still needed."""

    def __init__(self, roots: list[Delayed], max_retries: int = 0) -> None:
        self.max_retries = max_retries
        self._results: dict[int, list[Any]] = {}
        self._errors: dict[int, TaskError] = {}
        self._pending_uses: Counter[int] = Counter()
        for node in topological_nodes(roots):
            for dep in node.dependencies():
                self._pending_uses[dep.node.uid] += 1
        for root in roots:
            self._pending_uses[root.node.uid] += 1

    def compute(self, root: Delayed) -> tuple[Any, TaskError | None, int]:
        """Return (value, error, attempts) of `root`, computing missing dependencies first."""
        attempts = 1
        for node in self._missing_nodes(root):
            attempts = self._run_node(node)
        error = self._errors.get(root.node.uid)
        value = None if error else self._output(root)
        self._release(root)
        return value, error, attempts

    def _missing_nodes(self, root: Delayed) -> list[TaskNode]:
        """Nodes `root` still needs, dependencies first; the walk stops at held results.

        Stopping there matters: a node whose value was already consumed and released must
        never run again (it would release its own inputs a second time).
        """
        return topological_nodes(
            [root], skip=lambda uid: uid in self._results or uid in self._errors
        )

    def _output(self, delayed: Delayed) -> Any:
        outputs = self._results[delayed.node.uid]
        return outputs[0] if delayed.index is None else outputs[delayed.index]

    def _release(self, delayed: Delayed) -> None:
        uid = delayed.node.uid
        self._pending_uses[uid] -= 1
        if self._pending_uses[uid] <= 0:
            self._results.pop(uid, None)
            self._pending_uses.pop(uid, None)

    def _run_node(self, node: TaskNode) -> int:
        deps = node.dependencies()
        failed = [d for d in deps if d.node.uid in self._errors]
        if failed:
            upstream = self._errors[failed[0].node.uid]
            self._errors[node.uid] = upstream
            return 1
        args = substitute(node.args, self._output)
        kwargs = substitute(node.kwargs, self._output)
        return self._store(node, *self.call(node, args, kwargs))

    def call(self, node: TaskNode, args: Any, kwargs: Any) -> tuple[Any, TaskError | None, int]:
        """Run one node's function with retries: (outputs, error, attempts); thread-safe."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return split_outputs(node, node.func(*args, **kwargs)), None, attempt
            except Exception as exc:  # a task's own error: report it, never crash the loop
                if attempt <= self.max_retries:
                    logger.warning(
                        "task %s failed (%s: %s), retry %d/%d",
                        node.name,
                        type(exc).__name__,
                        exc,
                        attempt,
                        self.max_retries,
                    )
                    continue
                return None, TaskError.from_exception(exc), attempt

    def _store(self, node: TaskNode, outputs: Any, error: TaskError | None, attempts: int) -> int:
        if error is None:
            self._results[node.uid] = outputs
        else:
            self._errors[node.uid] = error
        for dep in node.dependencies():
            self._release(dep)
        return attempts

    def split(self, root: Delayed) -> tuple[Any, Any] | None:
        """Compute what `root` needs here; return the (args, kwargs) of `root`'s own call.

        None when there is nothing left to call (its result is held, or an input failed:
        `finish` then reports it). Lets the caller run the root itself elsewhere.
        """
        nodes = self._missing_nodes(root)
        if not nodes or nodes[-1] is not root.node:
            return None
        for node in nodes[:-1]:
            self._run_node(node)
        if any(d.node.uid in self._errors for d in root.node.dependencies()):
            self._run_node(root.node)  # records the upstream error
            return None
        return substitute(root.node.args, self._output), substitute(root.node.kwargs, self._output)

    def finish(
        self, root: Delayed, called: tuple[Any, TaskError | None, int] | None
    ) -> tuple[Any, TaskError | None, int]:
        """Book `root`'s call made elsewhere (or nothing); the same result as `compute`."""
        attempts = self._store(root.node, *called) if called is not None else 1
        error = self._errors.get(root.node.uid)
        value = None if error else self._output(root)
        self._release(root)
        return value, error, attempts


@AbstractCluster.register("sequential")
class SequentialCluster(GraphTasks, AbstractCluster):
    """Runs tasks one by one in the main process when their futures are iterated."""

    CONF_OPTIONS = {}
    IN_PROCESS = True

    def start_tasks(self, task_list: list[Any]) -> list[SequentialFuture]:
        """Wrap the tasks; nothing runs until `outcome_iterator` is consumed."""
        return [SequentialFuture(task) for task in task_list]

    def outcome_iterator(
        self, future_list: list[SequentialFuture], timeout: float | None = None
    ) -> Iterator[Outcome]:
        """Compute the futures in order, yielding an Outcome for each."""
        runner = GraphRunner([f.delayed for f in future_list], self.conf.get("max_retries", 0))
        # write-behind: a tile's sink (its store write) runs in one background thread while
        # the next tile computes here; outcomes still come back in order, one write at a time
        pool = ThreadPoolExecutor(1, thread_name_prefix="zarr_orch-sink")
        behind: tuple[SequentialFuture, Future[Any] | None] | None = None
        try:
            for future in future_list:
                root = future.delayed
                if not root.node.fused:
                    if behind is not None:
                        yield self._outcome(runner, *behind)
                        behind = None
                    value, error, attempts = runner.compute(root)
                    yield Outcome(future, value=value, error=error, attempts=attempts)
                    continue
                call = runner.split(root)
                ready = self._outcome(runner, *behind) if behind is not None else None
                submitted = None
                if call is not None:  # started before the previous outcome is booked
                    submitted = pool.submit(runner.call, root.node, *call)
                behind = (future, submitted)
                if ready is not None:
                    yield ready
            if behind is not None:
                yield self._outcome(runner, *behind)
                behind = None
        finally:  # stopped early (error, Ctrl-C): the write in progress ends, unbooked
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _outcome(
        runner: GraphRunner, future: SequentialFuture, submitted: Future[Any] | None
    ) -> Outcome:
        called = submitted.result() if submitted is not None else None
        value, error, attempts = runner.finish(future.delayed, called)
        return Outcome(future, value=value, error=error, attempts=attempts)

    def scatter(self, data: Any, broadcast: bool = True) -> Any:
        """In-process: the data itself."""
        return data

    def cleanup(self, **kwargs: Any) -> None:
        """Nothing to release."""
