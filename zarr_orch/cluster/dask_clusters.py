"""Dask modes: a local `distributed` cluster, an existing scheduler, or PBS/SLURM jobs.

Tasks are plain `dask.delayed` calls and sinks are delayed calls on their tile, which dask's
locality rule runs on the worker already holding the tile. `dask`/`distributed` are imported
only when such a cluster is created (importing `distributed` costs about a second), and no
global dask config is changed: our clients never become the default scheduler.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from zarr_orch.cluster.base import AbstractCluster, Option, Outcome, TaskError
from zarr_orch.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: seconds between two checks of the timeout while waiting for a completion
_POLL = 0.1


# -- conf validators -------------------------------------------------------------------------
def _positive_int(name: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        return value

    return check


def _positive_number(name: str, unit: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigurationError(f"{name} must be a number of {unit} > 0, got {value!r}")
        return value

    return check


def _boolean(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be true or false, got {value!r}")
        return value

    return check


def _optional_str(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(f"{name} must be a non-empty string or null, got {value!r}")
        return value

    return check


def _check_address(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"([a-z0-9+]+://)?[^\s/]+(:\d+)?/?", value):
        raise ConfigurationError(
            "mode 'dask' needs `address`, the URL of a running dask scheduler such as "
            f'"tcp://127.0.0.1:8786", got {value!r}'
        )
    return value


def _check_walltime(value: Any) -> str:
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d)", value) if isinstance(value, str) else None
    if match is None:
        raise ConfigurationError(f'walltime must be "HH:MM:SS" (e.g. "00:59:00"), got {value!r}')
    return value


def _check_account(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"mode 'slurm_dask' needs `account`, the SLURM account to charge, got {value!r}"
        )
    return value


def walltime_seconds(walltime: str) -> int:
    """Seconds in a "HH:MM:SS" walltime."""
    hours, minutes, seconds = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _mib(mb: float) -> int:
    return int(mb * 2**20)


def _task_name(key: Any) -> str:
    """A readable task name from a dask key such as 'my_func-1b2c...'."""
    text = key[0] if isinstance(key, tuple) else str(key)
    return re.sub(r"-[0-9a-f]{8,}(-[0-9a-f-]+)?$", "", str(text))


# -- the common part ---------------------------------------------------------------------------
class DaskClusterBase(AbstractCluster):
    """What every dask mode shares: delayed tasks, compute with retries, the future iterator."""

    IN_PROCESS = False
    #: True when we started the cluster (and may restart or close its workers)
    owns_cluster = True

    def __init__(self, conf: dict[str, Any], out_dir: Any, launch_worker: bool = True) -> None:
        conf = dict(conf)
        for key, option in self.CONF_OPTIONS.items():
            conf[key] = option.check(conf.get(key, option.default))
        super().__init__(conf, out_dir, launch_worker)
        self.client: Any = None
        self.cluster: Any = None
        self.max_retries = int(conf.get("max_retries", 0) or 0)
        if launch_worker:
            try:
                self._start()
            except BaseException:
                self.cleanup()
                raise

    def _start(self) -> None:
        """Create `self.client` (and `self.cluster` when we start one)."""
        raise NotImplementedError

    def _client(self) -> Any:
        if self.client is None:
            raise ConfigurationError(
                f"the {self.conf.get('mode')!r} cluster is not running "
                "(created with launch_worker=False, or cleaned up)"
            )
        return self.client

    # -- task API -----------------------------------------------------------------------------
    def create_task_wrapped(self, func: Callable[..., Any], nout: int = 1) -> Callable[..., Any]:
        """A builder of `dask.delayed` calls of `func` (a tuple of Delayed when nout > 1)."""
        import dask

        delayed_func = dask.delayed(func, pure=False, nout=nout)

        def builder(*args: Any, **kwargs: Any) -> Any:
            result = delayed_func(*args, **kwargs)
            return tuple(result) if nout > 1 else result

        builder.__name__ = getattr(func, "__name__", "task")
        return builder

    def get_delayed_type(self) -> type:
        """Lazy objects are `dask.delayed.Delayed`."""
        from dask.delayed import Delayed

        return Delayed

    def attach_sink(self, delayed: Any, sink: Callable[[Any], Any]) -> Any:
        """``sink(value)`` as a delayed call; dask runs it where the value already is."""
        import dask

        return dask.delayed(sink, pure=False)(delayed)

    def start_tasks(self, task_list: list[Any]) -> list[Any]:
        """Submit the graph; failing tasks are retried `max_retries` times by the scheduler."""
        return self._client().compute(list(task_list), retries=self.max_retries)

    def scatter(self, data: Any, broadcast: bool = True) -> Any:
        """Send `data` to the workers once; the future can be passed to many tasks."""
        return self._client().scatter(data, broadcast=broadcast)

    def cancel(self, future_list: Any) -> None:
        """Cancel the futures (running tasks finish in their worker thread)."""
        from distributed import Future

        futures = [f for f in future_list if isinstance(f, Future)]
        if futures and self.client is not None:
            self.client.cancel(futures)

    # -- results ------------------------------------------------------------------------------
    def outcome_iterator(
        self, future_list: list[Any], timeout: float | None = None
    ) -> Iterator[Outcome]:
        """Yield one Outcome per future as it completes, releasing each one once consumed.

        When no task completes for `timeout` seconds, the remaining futures are cancelled and
        yielded as failed with a TimeoutError message.
        """
        from distributed import Future, as_completed

        futures = [f for f in future_list if isinstance(f, Future)]
        for value in future_list:
            if not isinstance(value, Future):  # compute() hands non-dask objects back as is
                yield Outcome(value, value=value)
        if not futures:
            return
        remaining = {f.key: f for f in futures}
        completed = as_completed(futures, with_results=False, loop=self._client().loop)
        del futures
        last = time.monotonic()
        while remaining:
            if not completed.has_ready():
                if timeout is not None and time.monotonic() - last >= timeout:
                    yield from self._time_out(remaining, timeout)
                    return
                with completed.thread_condition:
                    completed.thread_condition.wait(timeout=_POLL)
                continue
            future = next(completed)
            last = time.monotonic()
            remaining.pop(future.key, None)
            outcome = self._outcome(future)
            future.release()  # the scheduler may forget the result now
            yield outcome
            del future, outcome

    def _outcome(self, future: Any) -> Outcome:
        status = future.status
        if status == "finished":
            try:
                return Outcome(future, value=future.result())
            except Exception as exc:  # lost between completion and fetch
                return Outcome(future, error=TaskError.from_exception(exc))
        if status == "error":
            exc = future.exception()
            tb = future.traceback()
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            return Outcome(future, error=TaskError(type(exc).__name__, str(exc), text, exc))
        message = f"task {_task_name(future.key)!r} ({future.key}) was {status}"
        return Outcome(future, error=TaskError("CancelledError", message, message))

    def _time_out(self, remaining: dict[Any, Any], timeout: float) -> Iterator[Outcome]:
        """Cancel the stalled futures and yield them as failed."""
        futures = list(remaining.values())
        remaining.clear()
        stuck = self._processing_workers([f.key for f in futures])
        logger.warning(
            "no task completed for task_timeout=%g s: cancelling %d task(s)", timeout, len(futures)
        )
        self._client().cancel(futures)
        if stuck:
            self._free_workers(stuck)
        for future in futures:
            message = (
                f"task {_task_name(future.key)!r} ({future.key}) did not complete within "
                f"task_timeout={timeout:g} s (no task completed meanwhile); it was cancelled"
            )
            outcome = Outcome(future, error=TaskError("TimeoutError", message, message))
            future.release()
            yield outcome

    def _processing_workers(self, keys: list[Any]) -> list[str]:
        """Workers currently running one of `keys`."""
        try:
            processing = self._client().processing()
        except Exception:  # a best-effort diagnostic
            return []
        wanted = {str(key) for key in keys}
        return [w for w, ks in processing.items() if any(str(k) in wanted for k in ks)]

    def _free_workers(self, workers: list[str]) -> None:
        """Hung tasks keep a worker thread busy: restart those workers if the cluster is ours."""
        if not self.owns_cluster:
            logger.warning(
                "workers %s may still run the timed-out task(s); the cluster is not ours, so "
                "they are not restarted",
                ", ".join(workers),
            )
            return
        logger.warning("restarting workers %s to stop the timed-out task(s)", ", ".join(workers))
        try:
            self._client().restart_workers(workers, timeout=30)
        except Exception as exc:
            logger.warning("could not restart workers %s: %s", workers, exc)

    def cleanup(self, **kwargs: Any) -> None:
        """Close our client, and the cluster if we started it (idempotent)."""
        client, self.client = self.client, None
        cluster, self.cluster = self.cluster, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                logger.warning("closing the dask client failed: %s", exc)
        if cluster is not None:
            try:
                cluster.close()
            except Exception as exc:
                logger.warning("closing the dask cluster failed: %s", exc)


_COMMON_RESOURCES = {
    "nb_workers": Option(2, _positive_int("nb_workers"), "dask worker processes"),
    "max_ram_per_worker": Option(
        2000, _positive_number("max_ram_per_worker", "MB"), "memory limit of each worker (MB)"
    ),
    "activate_dashboard": Option(False, _boolean("activate_dashboard"), "serve dask's dashboard"),
}


@AbstractCluster.register("local_dask")
class LocalDaskCluster(DaskClusterBase):
    """A `distributed.LocalCluster` of worker processes started (and closed) by us."""

    CONF_OPTIONS = {
        **_COMMON_RESOURCES,
        "threads_per_worker": Option(1, _positive_int("threads_per_worker"), "threads per worker"),
    }

    def _start(self) -> None:
        from distributed import Client, LocalCluster

        conf = self.conf
        self.cluster = LocalCluster(
            n_workers=conf["nb_workers"],
            threads_per_worker=conf["threads_per_worker"],
            memory_limit=_mib(conf["max_ram_per_worker"]),
            processes=True,
            dashboard_address=":0" if conf["activate_dashboard"] else None,
        )
        self.client = Client(self.cluster, set_as_default=False)
        logger.info("started a local dask cluster: %s", self.cluster)


@AbstractCluster.register("dask")
class ExistingDaskCluster(DaskClusterBase):
    """A client of a running dask scheduler at conf `address`; we never shut that cluster down."""

    owns_cluster = False
    CONF_OPTIONS = {
        "address": Option(None, _check_address, 'scheduler address, e.g. "tcp://host:8786"'),
        "connect_timeout": Option(
            10, _positive_number("connect_timeout", "seconds"), "seconds to reach the scheduler"
        ),
    }

    def _start(self) -> None:
        from distributed import Client

        address, timeout = self.conf["address"], self.conf["connect_timeout"]
        try:
            self.client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConfigurationError(
                f"cannot connect to the dask scheduler at {address!r} within {timeout:g} s "
                f"({type(exc).__name__}: {exc}); start it or fix `address`"
            ) from exc
        logger.info("connected to the dask scheduler at %s", address)


# -- batch systems (dask-jobqueue) -------------------------------------------------------------
_JOBQUEUE_OPTIONS = {
    **_COMMON_RESOURCES,
    "walltime": Option("00:59:00", _check_walltime, 'job walltime "HH:MM:SS"'),
    "queue": Option(None, _optional_str("queue"), "batch queue (default: the system's)"),
    "python": Option(None, _optional_str("python"), "python executable of the workers"),
}


def jobqueue_kwargs(mode: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Translate our conf into dask-jobqueue `PBSCluster`/`SLURMCluster` keyword arguments.

    One single-threaded worker per job, like CARS; workers retire 5 minutes before the
    walltime (staggered) so the adaptive cluster replaces them before the job is killed.
    """
    if mode not in ("pbs_dask", "slurm_dask"):
        raise ConfigurationError(f"no batch system for mode {mode!r}")
    ram = conf.get("max_ram_per_worker", 2000)
    kwargs: dict[str, Any] = {
        "cores": 1,
        "processes": 1,
        "memory": f"{_mib(ram) // 2**20}MiB",
        "walltime": _check_walltime(conf.get("walltime", "00:59:00")),
        "python": conf.get("python") or sys.executable,
    }
    if conf.get("queue"):
        kwargs["queue"] = conf["queue"]
    if mode == "slurm_dask":
        kwargs["account"] = _check_account(conf.get("account"))
        if conf.get("qos"):
            kwargs["job_extra_directives"] = [f"--qos={conf['qos']}"]
    elif conf.get("account"):
        kwargs["account"] = conf["account"]
    lifetime = walltime_seconds(kwargs["walltime"]) - 300
    if lifetime > 300:
        kwargs["worker_extra_args"] = [
            "--lifetime",
            f"{lifetime}s",
            "--lifetime-stagger",
            "180s",
        ]
    if not conf.get("activate_dashboard", False):
        kwargs["scheduler_options"] = {"dashboard_address": None}
    return kwargs


class _JobqueueCluster(DaskClusterBase):
    """Workers as batch jobs through the optional `dask_jobqueue` package."""

    _CLASS_NAME = ""

    def _start(self) -> None:
        try:
            import dask_jobqueue
        except ImportError as exc:
            raise ConfigurationError(
                f"mode {self.conf.get('mode')!r} needs the optional package dask-jobqueue: "
                "pip install dask-jobqueue"
            ) from exc
        from distributed import Client

        mode = "slurm_dask" if self._CLASS_NAME == "SLURMCluster" else "pbs_dask"
        cluster_class = getattr(dask_jobqueue, self._CLASS_NAME)
        self.cluster = cluster_class(**jobqueue_kwargs(mode, self.conf))
        nb_workers = self.conf["nb_workers"]
        self.cluster.adapt(minimum=nb_workers, maximum=nb_workers)
        self.client = Client(self.cluster, set_as_default=False)
        logger.info("started %s with %d worker job(s)", self._CLASS_NAME, nb_workers)


@AbstractCluster.register("pbs_dask")
class PbsDaskCluster(_JobqueueCluster):
    """Dask workers as PBS jobs."""

    _CLASS_NAME = "PBSCluster"
    CONF_OPTIONS = {
        **_JOBQUEUE_OPTIONS,
        "account": Option(None, _optional_str("account"), "PBS account (optional)"),
    }


@AbstractCluster.register("slurm_dask")
class SlurmDaskCluster(_JobqueueCluster):
    """Dask workers as SLURM jobs (`account` is required)."""

    _CLASS_NAME = "SLURMCluster"
    CONF_OPTIONS = {
        **_JOBQUEUE_OPTIONS,
        "account": Option(None, _check_account, "SLURM account to charge (required)"),
        "qos": Option(None, _optional_str("qos"), "SLURM quality of service"),
    }
