"""Execution modes ("clusters") of the orchestrator; importing this registers them all.

The dask modes register here too, but their module imports `dask`/`distributed` only when
such a cluster is created, so `import zarr_orch.cluster` stays cheap.
"""

from zarr_orch.cluster import dask_clusters, multiprocessing, sequential
from zarr_orch.cluster.base import AbstractCluster, Option, Outcome, TaskError

__all__ = [
    "AbstractCluster",
    "Option",
    "Outcome",
    "TaskError",
    "dask_clusters",
    "multiprocessing",
    "sequential",
]
