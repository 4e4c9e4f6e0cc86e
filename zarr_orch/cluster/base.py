"""The cluster interface: how the orchestrator runs tasks, whatever executes them.

A cluster turns functions into lazy tasks (`create_task`), starts a batch of them
(`start_tasks`) and hands results back as they complete (`outcome_iterator`), one `Outcome`
per started task, successes and failures alike, so one failed tile never hides the others.
`future_iterator` is CARS's view of the same stream: the results themselves.
Modes register themselves with `AbstractCluster.register`; the orchestrator only sees this API.
"""

from __future__ import annotations

import logging
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zarr_orch.errors import ConfigurationError, TaskFailedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    """One conf key of a mode: its default, a validator returning the cleaned value, a doc line."""

    default: Any
    check: Callable[[Any], Any]
    doc: str = ""


@dataclass
class TaskError:
    """A picklable description of an exception raised by a task, with its original traceback."""

    exc_type: str
    message: str
    traceback: str
    exception: BaseException | None = field(default=None, repr=False)

    @classmethod
    def from_exception(cls, exc: BaseException) -> TaskError:
        """Capture `exc` (and its traceback) while it is being handled."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc), text, exc)

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}"


@dataclass
class Outcome:
    """What `outcome_iterator` yields for each started task: its future and value, or an error."""

    future: Any
    value: Any = None
    error: TaskError | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """True when the task returned a value."""
        return self.error is None


class AbstractCluster(ABC):
    """Base of every execution mode; subclasses declare `CONF_OPTIONS` and implement the API."""

    _modes: ClassVar[dict[str, type[AbstractCluster]]] = {}
    #: conf keys specific to this mode (the common keys live in `zarr_orch.conf`)
    CONF_OPTIONS: ClassVar[dict[str, Option]] = {}
    #: True when tasks run in other processes (data must be picklable)
    IN_PROCESS: ClassVar[bool] = True

    def __init__(self, conf: dict[str, Any], out_dir: Any, launch_worker: bool = True) -> None:
        self.conf = conf
        self.out_dir = out_dir
        self.launch_worker = launch_worker
        #: CARS carries it from a cluster to the one `reset_cluster` starts (nothing here)
        self.data_to_propagate: Any = None

    @property
    def checked_conf_cluster(self) -> dict[str, Any]:
        """CARS's name of the checked conf (pipelines read e.g. its max_ram_per_worker)."""
        return self.conf

    # -- registration -------------------------------------------------------------------------
    @classmethod
    def register(cls, *modes: str) -> Callable[[type[AbstractCluster]], type[AbstractCluster]]:
        """Class decorator making a cluster available under the given mode names."""

        def decorator(subclass: type[AbstractCluster]) -> type[AbstractCluster]:
            for mode in modes:
                cls._modes[mode] = subclass
            return subclass

        return decorator

    @classmethod
    def modes(cls) -> dict[str, type[AbstractCluster]]:
        """The registered modes and their classes."""
        return dict(cls._modes)

    @classmethod
    def for_mode(cls, mode: str) -> type[AbstractCluster]:
        """The class of `mode`, or a ConfigurationError listing the known modes."""
        try:
            return cls._modes[mode]
        except KeyError:
            known = ", ".join(sorted(cls._modes))
            raise ConfigurationError(
                f"unknown orchestrator mode {mode!r}; choose one of: {known}"
            ) from None

    # -- conf -----------------------------------------------------------------------------------
    @classmethod
    def resolve_conf(cls, conf: dict[str, Any]) -> dict[str, Any]:
        """The validated conf with automatic values made concrete (CARS's get_conf semantics)."""
        return conf

    def get_conf(self) -> dict[str, Any]:
        """The validated, fully defaulted conf this cluster runs with (a copy)."""
        return dict(self.conf)

    # -- tasks ----------------------------------------------------------------------------------
    def create_task(self, func: Callable[..., Any], nout: int = 1) -> Callable[..., Any]:
        """Return a builder: calling it with arguments gives delayed output(s) of `func`."""
        if not callable(func):
            raise TypeError(f"create_task needs a callable, got {type(func).__name__}")
        if not isinstance(nout, int) or isinstance(nout, bool) or nout < 1:
            raise ValueError(f"nout must be a positive integer, got {nout!r}")
        self.check_task_function(func)
        return self.create_task_wrapped(func, nout)

    def check_task_function(self, func: Callable[..., Any]) -> None:  # noqa: B027 (optional hook)
        """Refuse functions this mode cannot run (e.g. unpicklable ones across processes)."""

    @abstractmethod
    def create_task_wrapped(self, func: Callable[..., Any], nout: int = 1) -> Callable[..., Any]:
        """Mode-specific builder behind `create_task`."""

    @abstractmethod
    def get_delayed_type(self) -> type | tuple[type, ...]:
        """The type(s) of the lazy objects `create_task` builders return."""

    @abstractmethod
    def attach_sink(self, delayed: Any, sink: Callable[[Any], Any]) -> Any:
        """A new delayed computing ``sink(value of delayed)`` where that value was computed.

        This is how tiles are written by the worker that computed them: only the sink's small
        return value (a receipt) travels back to the main process.
        """

    @abstractmethod
    def start_tasks(self, task_list: list[Any]) -> list[Any]:
        """Start computing the delayed objects; return one future per task, same order."""

    def future_iterator(
        self, future_list: list[Any], timeout: float | None = None
    ) -> Iterator[Any]:
        """Yield each task's result as it completes, as CARS's clusters do.

        A failed task raises its TaskFailedError here (with the original traceback), after the
        results completed before it were yielded.
        """
        for outcome in self.outcome_iterator(future_list, timeout=timeout):
            if not outcome.ok:
                error = outcome.error
                raise TaskFailedError(
                    f"task failed: {error}\n\nOriginal traceback:\n{error.traceback}",
                    original_traceback=error.traceback,
                )
            yield outcome.value

    @abstractmethod
    def outcome_iterator(
        self, future_list: list[Any], timeout: float | None = None
    ) -> Iterator[Outcome]:
        """Yield one `Outcome` per future as it completes (any order).

        `timeout` is the longest time without any completed task; a mode that can enforce it
        turns the stalled tasks into failed outcomes instead of hanging.
        """

    @abstractmethod
    def scatter(self, data: Any, broadcast: bool = True) -> Any:
        """Ship `data` to the workers once; the handle can be passed to many tasks."""

    @abstractmethod
    def cleanup(self, **kwargs: Any) -> None:
        """Release what this cluster started (pools, clients). Safe to call twice."""

    def cancel(self, future_list: Iterable[Any]) -> None:  # noqa: B027 - optional hook
        """Stop futures that have not run yet (best effort)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.conf.get('mode')!r})"
