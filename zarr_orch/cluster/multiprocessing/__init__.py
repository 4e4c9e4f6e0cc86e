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

Modules, imported one way (cluster -> pool -> worker -> scatter; planner imports none of them):
`cluster` (the facade: conf checks, scatter, the scheduler loop), `pool` (worker processes and
their start-up, timeout and RAM watchdog), `worker` (the worker main loop and the job wire
format), `planner` (jobs over the task graph and their queue), `scatter` (scattered objects).
"""

from zarr_orch.cluster.multiprocessing.cluster import MultiprocessingCluster, resolve_nb_workers
from zarr_orch.cluster.multiprocessing.planner import MpFuture
from zarr_orch.cluster.multiprocessing.scatter import ScatterHandle

__all__ = ["MpFuture", "MultiprocessingCluster", "ScatterHandle", "resolve_nb_workers"]
