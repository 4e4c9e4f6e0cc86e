"""Multiprocessing mode: a dependency-aware scheduler over local worker processes we own."""

from zarr_orch.cluster.multiprocessing.cluster import (
    MpFuture,
    MultiprocessingCluster,
    ScatterHandle,
    resolve_nb_workers,
)

__all__ = ["MpFuture", "MultiprocessingCluster", "ScatterHandle", "resolve_nb_workers"]
