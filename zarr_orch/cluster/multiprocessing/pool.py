"""The worker processes of the multiprocessing mode: starting, stopping and watching them
(start-up, task timeout and RSS limits), each with its task and result pipes."""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from zarr_orch.cluster.base import TaskError
from zarr_orch.cluster.multiprocessing.worker import worker_main

if TYPE_CHECKING:  # type hints only: the pool does not depend on the planner
    from zarr_orch.cluster.multiprocessing.planner import Job

#: the mode's logger, one name for the whole package (as before it was split into modules)
logger = logging.getLogger(__package__)

#: seconds between two RSS samples of busy workers (when max_ram_per_worker is set)
RAM_CHECK_INTERVAL = 0.5
#: seconds a new worker may take to import its modules and say it is ready
STARTUP_TIMEOUT = 120.0


class Worker:
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

    def __init__(self, ctx: Any, name: str, others: list[Worker] | None = None) -> None:
        task_recv, self.task_conn = ctx.Pipe(duplex=False)
        self.result_conn, result_send = ctx.Pipe(duplex=False)
        inherited: list[int] = []
        if ctx.get_start_method() == "fork":
            # a forked child holds every descriptor of this process: it closes the main
            # process's ends of its own pipes and of the other workers', so that each
            # worker sees EOF (and exits) when the main process is gone
            for conn in [self.task_conn, self.result_conn] + [
                c for w in others or () for c in (w.task_conn, w.result_conn)
            ]:
                with contextlib.suppress(OSError, ValueError):
                    inherited.append(conn.fileno())
        self.process = ctx.Process(
            target=worker_main,
            args=(task_recv, result_send, list(sys.path), inherited),
            name=name,
            daemon=True,
        )
        self.process.start()
        task_recv.close()
        result_send.close()
        self.name = name
        self.jobs: deque[Job] = deque()
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


class WorkerPool:
    """The worker processes, their scratch dir and the watchdog over their start, time and RAM.

    It holds no reference to the cluster, so the cluster's finalizer can stop the workers.
    """

    def __init__(self, ctx: Any, max_ram_per_worker: float | None) -> None:
        self.workers: list[Worker] = []
        self.tmp_dir: str | None = None
        self._ctx = ctx
        self._worker_ids = itertools.count()
        #: the limit as configured (MB), for messages, and in bytes
        self.max_ram_per_worker = max_ram_per_worker
        self.max_rss = None if max_ram_per_worker is None else int(max_ram_per_worker * 1024 * 1024)
        self._last_ram_check = 0.0

    def start_worker(self, ctx: Any = None) -> Worker:
        """Start one more worker process (with `ctx`, default the pool's) and add it."""
        name = f"zarr-orch-worker-{next(self._worker_ids)}"
        worker = Worker(ctx or self._ctx, name, self.workers)
        self.workers.append(worker)
        logger.debug("started worker %s (pid %s)", worker.name, worker.pid)
        return worker

    def pids(self) -> list[int]:
        """Process ids of the current worker processes."""
        return [w.pid for w in self.workers if w.pid is not None]

    def forget(self, worker: Worker) -> None:
        """Drop a finished worker from the set (its process has exited or is exiting)."""
        if worker in self.workers:
            self.workers.remove(worker)
        with contextlib.suppress(OSError):
            worker.task_conn.close()
        worker.process.join(1.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(1.0)
        worker.result_conn.close()

    def kill(self, worker: Worker, error: TaskError) -> None:
        """Kill a worker's process for `error` and wait for it (the caller then forgets it)."""
        logger.warning("%s: killing worker process %s", error.message, worker.pid)
        worker.process.kill()
        worker.process.join(2.0)

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

    def check_stalls(
        self,
        timeout: float | None,
        last_completion: float,
        kill: Callable[[Worker, TaskError], None],
    ) -> float | None:
        """Call `kill` on workers that hang at start-up, run a task past `timeout` seconds with
        no completion since `last_completion`, or exceed the RAM limit; return seconds until
        the next check is due."""
        now = time.monotonic()
        wait: float | None = None
        busy = [w for w in self.workers if w.jobs and w.ready]
        for worker in [w for w in self.workers if not w.ready]:
            deadline = worker.started + STARTUP_TIMEOUT
            if now >= deadline:
                message = (
                    f"worker process {worker.pid} did not start within {STARTUP_TIMEOUT:g} s "
                    "(importing the task modules?)"
                )
                if worker.jobs:
                    message += f"; it was to run {worker.jobs[0].name}"
                kill(worker, TaskError("TimeoutError", message, message))
            else:
                wait = deadline - now if wait is None else min(wait, deadline - now)
        if timeout is not None:
            for worker in busy:
                deadline = max(last_completion, worker.head_start) + timeout
                if now >= deadline:
                    job = worker.jobs[0]
                    message = (
                        f"{job.name} did not complete within task_timeout={timeout:g} s "
                        f"(no task completed meanwhile); its worker process was killed"
                    )
                    kill(worker, TaskError("TimeoutError", message, message))
                else:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
        if self.max_rss is not None and busy:
            if now - self._last_ram_check >= RAM_CHECK_INTERVAL:
                self._last_ram_check = now
                for worker in [w for w in self.workers if w.jobs and w.ps is not None]:
                    try:
                        rss = worker.ps.memory_info().rss
                    except psutil.Error:
                        continue  # exiting: the sentinel will tell
                    if rss > self.max_rss:
                        job = worker.jobs[0]
                        message = (
                            f"{job.name} pushed its worker process to {rss / 2**20:.0f} MB RSS, "
                            f"above max_ram_per_worker={self.max_ram_per_worker} MB; "
                            "the worker was killed (use smaller tiles or raise the limit)"
                        )
                        kill(worker, TaskError("MemoryError", message, message))
            ram_wait = max(0.0, self._last_ram_check + RAM_CHECK_INTERVAL - now)
            wait = ram_wait if wait is None else min(wait, ram_wait)
        return wait
