"""A tiny lazy task graph shared by the in-house clusters (sequential, multiprocessing).

A `TaskNode` is one call ``func(*args, **kwargs)``; a `Delayed` names one of its outputs.
Delayed objects may appear (nested in lists, tuples and dicts) in other tasks' arguments,
which is how CARS applications chain stages without a breakpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

_node_ids = itertools.count()


class TaskNode:
    """One function call of the graph; `fused` nodes run in the process of their dependency."""

    __slots__ = ("args", "func", "fused", "kwargs", "nout", "uid")

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        nout: int = 1,
        fused: bool = False,
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.nout = nout
        self.fused = fused
        self.uid = next(_node_ids)

    @property
    def name(self) -> str:
        """The task function's name, for messages."""
        return getattr(self.func, "__name__", type(self.func).__name__)

    def dependencies(self) -> list[Delayed]:
        """Delayed objects this node consumes, in argument order (with repeats)."""
        found: list[Delayed] = []
        _collect_delayed(self.args, found)
        _collect_delayed(self.kwargs, found)
        return found

    def __repr__(self) -> str:
        return f"TaskNode({self.name}, nout={self.nout}, uid={self.uid})"


class Delayed:
    """A lazy output of a `TaskNode` (``index`` is None for single-output tasks)."""

    __slots__ = ("__weakref__", "index", "node")

    def __init__(self, node: TaskNode, index: int | None = None) -> None:
        self.node = node
        self.index = index

    def __repr__(self) -> str:
        suffix = "" if self.index is None else f"[{self.index}]"
        return f"Delayed({self.node.name}#{self.node.uid}{suffix})"

    def __getstate__(self) -> tuple[TaskNode, int | None]:
        return (self.node, self.index)

    def __setstate__(self, state: tuple[TaskNode, int | None]) -> None:
        self.node, self.index = state


def make_delayed(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], nout: int
) -> Delayed | tuple[Delayed, ...]:
    """Build a node and return its output(s), a tuple of `nout` Delayed when nout > 1."""
    node = TaskNode(func, args, kwargs, nout=nout)
    if nout == 1:
        return Delayed(node, None)
    return tuple(Delayed(node, i) for i in range(nout))


def iter_delayed(obj: Any) -> Iterator[Delayed]:
    """Yield every Delayed nested in lists, tuples, sets and dict values of `obj`."""
    if isinstance(obj, Delayed):
        yield obj
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            yield from iter_delayed(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_delayed(item)


#: exact types that never hold a Delayed: skipped without a call (tile args are mostly these)
_LEAF_TYPES = frozenset({int, float, str, bytes, bool, type(None)})


def _collect_delayed(obj: Any, found: list[Delayed]) -> None:
    """Append to `found` what `iter_delayed(obj)` yields, in order, without nested generators.

    Every scheduler walks every node's arguments, so this runs for each tile of a breakpoint.
    """
    if isinstance(obj, Delayed):
        found.append(obj)
        return
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, list | tuple | set | frozenset):
        return
    for item in obj:
        if type(item) not in _LEAF_TYPES:
            _collect_delayed(item, found)


def substitute(obj: Any, resolve: Callable[[Delayed], Any]) -> Any:
    """Return `obj` with every nested Delayed replaced by ``resolve(delayed)``."""
    if isinstance(obj, Delayed):
        return resolve(obj)
    if isinstance(obj, list):
        return [substitute(item, resolve) for item in obj]
    if isinstance(obj, tuple):
        items = [substitute(item, resolve) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, set | frozenset):
        return type(obj)(substitute(item, resolve) for item in obj)
    if isinstance(obj, dict):
        return {key: substitute(value, resolve) for key, value in obj.items()}
    return obj


def split_outputs(node: TaskNode, result: Any) -> list[Any]:
    """Return the node's outputs as a list, checking that an nout>1 task returned nout values."""
    if node.nout == 1:
        return [result]
    if not isinstance(result, tuple | list) or len(result) != node.nout:
        got = (
            f"{type(result).__name__} of length {len(result)}"
            if isinstance(result, tuple | list)
            else type(result).__name__
        )
        raise TypeError(
            f"task {node.name!r} was created with nout={node.nout} and must return a tuple "
            f"of {node.nout} values, but returned a {got}"
        )
    return list(result)


def topological_nodes(
    roots: list[Delayed], skip: Callable[[int], bool] | None = None
) -> list[TaskNode]:
    """Every node needed by `roots`, dependencies first (iterative, no recursion limit).

    The walk stops at nodes for which ``skip(uid)`` is true (e.g. results already held).
    """
    order: list[TaskNode] = []
    seen: set[int] = set()
    for root in roots:
        stack: list[tuple[TaskNode, bool]] = [(root.node, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node.uid in seen or (skip is not None and skip(node.uid)):
                continue
            seen.add(node.uid)
            stack.append((node, True))
            for dep in reversed(node.dependencies()):
                if dep.node.uid not in seen:
                    stack.append((dep.node, False))
    return order


class GraphTasks:
    """Mixin of the in-house clusters: tasks are nodes of this module's lazy graph."""

    def create_task_wrapped(self, func: Callable[..., Any], nout: int = 1) -> Callable[..., Any]:
        """A builder of lazy `Delayed` calls of `func`."""

        def builder(*args: Any, **kwargs: Any) -> Delayed | tuple[Delayed, ...]:
            return make_delayed(func, args, kwargs, nout)

        builder.__name__ = getattr(func, "__name__", "task")
        return builder

    def get_delayed_type(self) -> type:
        """Lazy objects are `zarr_orch.cluster.graph.Delayed`."""
        return Delayed

    def attach_sink(self, delayed: Delayed, sink: Callable[[Any], Any]) -> Delayed:
        """A node applying `sink` to `delayed`'s value, fused: it runs in the same process."""
        return Delayed(TaskNode(sink, (delayed,), {}, nout=1, fused=True), None)
