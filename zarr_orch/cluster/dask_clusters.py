"""Dask modes: a local `distributed` cluster, an existing scheduler, or PBS/SLURM jobs.

Tasks are nodes of zarr_orch's own lazy graph, run by `dask_runner.DaskRunner`: a tile task
and its sink are one distributed task, submitted in bounded batches. `dask`/`distributed` are
imported only when such a cluster is created (importing `distributed` costs about a second),
no global dask config is changed (our clients never become the default scheduler), and
distributed's log lines go to the run log, not the console (`dask_logs`).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from zarr_orch.cluster import dask_logs
from zarr_orch.cluster.base import AbstractCluster, Option, Outcome
from zarr_orch.cluster.dask_runner import DaskRunner
from zarr_orch.cluster.graph import GraphTasks
from zarr_orch.errors import ConfigurationError

logger = logging.getLogger(__name__)


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


# -- the common part ---------------------------------------------------------------------------
class DaskClusterBase(GraphTasks, AbstractCluster):
    """What every dask mode shares: our lazy graph, run by `DaskRunner` on a distributed client.

    A tile task and its sink are one distributed task (see `zarr_orch.cluster.dask_runner`);
    distributed retries failed tasks `max_retries` times and reruns those of lost workers.
    """

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
        self.runner: DaskRunner | None = None
        self.max_retries = int(conf.get("max_retries", 0) or 0)
        self._logs_captured = False
        if launch_worker:
            try:
                dask_logs.capture()
                self._logs_captured = True
                self._start()
                self.runner = DaskRunner(
                    self.client, self.max_retries, conf.get("max_in_flight"), self._free_workers
                )
            except BaseException:
                self.cleanup()
                raise

    def _start(self) -> None:
        """Create `self.client` (and `self.cluster` when we start one)."""
        raise NotImplementedError

    def _runner(self) -> DaskRunner:
        if self.runner is None or self.client is None:
            raise ConfigurationError(
                f"the {self.conf.get('mode')!r} cluster is not running "
                "(created with launch_worker=False, or cleaned up)"
            )
        return self.runner

    # -- task API -----------------------------------------------------------------------------
    def start_tasks(self, task_list: list[Any]) -> list[Any]:
        """Plan one distributed task per job and submit the first batch of them."""
        return self._runner().start(list(task_list))

    def scatter(self, data: Any, broadcast: bool = True) -> Any:
        """Send `data` to the workers once; the future can be passed to many tasks."""
        self._runner()
        return self.client.scatter(data, broadcast=broadcast)

    def cancel(self, future_list: Any) -> None:
        """Drop the jobs only these futures wanted (running tasks finish in their thread)."""
        if self.runner is not None and self.client is not None:
            self.runner.cancel(future_list)

    # -- results ------------------------------------------------------------------------------
    def outcome_iterator(
        self, future_list: list[Any], timeout: float | None = None
    ) -> Iterator[Outcome]:
        """Yield one Outcome per future as it completes, submitting more jobs meanwhile.

        When no task completes for `timeout` seconds, the running tasks are cancelled and
        yielded as failed with a TimeoutError message; the others go on.
        """
        yield from self._runner().iterate(future_list, timeout)

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
            self.client.restart_workers(workers, timeout=30)
        except Exception as exc:
            logger.warning("could not restart workers %s: %s", workers, exc)

    def cleanup(self, **kwargs: Any) -> None:
        """Close our client, and the cluster if we started it (idempotent)."""
        runner, self.runner = self.runner, None
        client, self.client = self.client, None
        cluster, self.cluster = self.cluster, None
        try:
            if runner is not None:
                runner.close()
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
        finally:
            if self._logs_captured:
                self._logs_captured = False
                dask_logs.release()


def _optional_positive_int(name: str) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        return None if value is None else _positive_int(name)(value)

    return check


_IN_FLIGHT = Option(
    None,
    _optional_positive_int("max_in_flight"),
    "tasks submitted and not finished at once (null: 4 per worker thread)",
)

_COMMON_RESOURCES = {
    "nb_workers": Option(2, _positive_int("nb_workers"), "dask worker processes"),
    "max_ram_per_worker": Option(
        2000, _positive_number("max_ram_per_worker", "MB"), "memory limit of each worker (MB)"
    ),
    "activate_dashboard": Option(False, _boolean("activate_dashboard"), "serve dask's dashboard"),
    "max_in_flight": _IN_FLIGHT,
}


@AbstractCluster.register("local_dask")
class LocalDaskCluster(DaskClusterBase):
    """A `distributed.LocalCluster` of worker processes started (and closed) by us."""

    CONF_OPTIONS = {
        **_COMMON_RESOURCES,
        "threads_per_worker": Option(1, _positive_int("threads_per_worker"), "threads per worker"),
    }

    def _start(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        conf = self.conf
        # our runner bounds what is submitted, so the scheduler may hand every submitted
        # task to a worker at once: a worker then starts its next tile without waiting for
        # a scheduler round trip (read when the scheduler and nannies are created)
        settings = {
            "distributed.scheduler.worker-saturation": math.inf,
            # keep freed memory in the workers (as multiprocessing mode does): tiles allocate
            # and free the same temporaries, and returned pages fault again on every tile
            "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 2**31,
            "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 2**30,
        }
        with dask.config.set(settings):
            self.cluster = LocalCluster(
                n_workers=conf["nb_workers"],
                threads_per_worker=conf["threads_per_worker"],
                memory_limit=_mib(conf["max_ram_per_worker"]),
                processes=True,
                host="127.0.0.1",
                # the scheduler serves HTTP (health, metrics) even without a dashboard: on a
                # free port, so that two runs on one machine do not fight over 8787
                dashboard_address="127.0.0.1:0",
                scheduler_kwargs={"dashboard": conf["activate_dashboard"]},
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
        "max_in_flight": _IN_FLIGHT,
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
