"""Step 2 of a breakpoint: decide, tile by tile, what runs, what is resumed, what is served.

Delayed tiles done in every product of their dataset are resumed (not submitted); the
others get a `TileSink` and are attached to the cluster as tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zarr_orch.breakpoint.state import Cell, RunState, product_key
from zarr_orch.data.cars_dataset import is_concrete_tile
from zarr_orch.progress import StageSummary
from zarr_orch.registry.merge_order import MergeOrder
from zarr_orch.registry.registries import Registries, TrackedDataset
from zarr_orch.registry.sink import TileSink
from zarr_orch.storage.format.product import ProductPlan


class ServeEntry(NamedTuple):
    """A resumed tile of a replaced dataset: its cell gets the tile back from the store."""

    item: TrackedDataset
    plans: tuple[ProductPlan, ...]
    row: int
    col: int
    delayed: Any


@dataclass
class TilePlan:
    """What one breakpoint does with each registered tile."""

    #: delayed tiles attached to their sinks, to start on the cluster
    tasks: list[Any] = field(default_factory=list)
    sinks: list[TileSink] = field(default_factory=list)
    #: concrete tiles (e.g. replaced earlier, now saved): written in the main process
    local: list[tuple[TileSink, Any]] = field(default_factory=list)
    #: resumed tiles of replaced datasets, to serve from the store
    to_serve: list[ServeEntry] = field(default_factory=list)
    #: tiles not submitted because an earlier run finished them
    resumed: int = 0

    def stage(self, tracked: list[TrackedDataset], breakpoints: int) -> StageSummary:
        """The summary the breakpoint starts with: its number, dataset names, tile counts."""
        names = "+".join(dict.fromkeys(item.name for item in tracked)) or "nothing"
        return StageSummary(
            name=f"breakpoint {breakpoints + 1} ({names})",
            total=len(self.tasks) + len(self.local),
            resumed=self.resumed,
        )


def resumable_tiles(key_plans: tuple[ProductPlan, ...], state: RunState, resume: bool) -> set[Cell]:
    """Tiles done in every product of a dataset (empty when it saves nothing)."""
    if not key_plans or not resume:
        return set()
    sets = [state.resumable.get(product_key(p), set()) for p in key_plans]
    return set.intersection(*sets)


def plan_tiles(
    tracked: list[TrackedDataset],
    registries: Registries,
    plans: dict[int, list[ProductPlan]],
    state: RunState,
    *,
    resume: bool,
    delayed_type: Any,
    attach_sink: Callable[[Any, TileSink], Any],
    merge_order: MergeOrder,
    only: Collection[Any] | None = None,
) -> TilePlan:
    """Sort every tile of `tracked` into tasks, local writes, resumed and served tiles.

    `only` (delayed objects) limits the tasks to those (CARS's second pass);
    windowed tiles to run are announced to `merge_order`, which merges them in this order.
    """
    out = TilePlan()
    restrict = None if only is None else {id(d) for d in only}
    for item in tracked:
        key_plans = tuple(plans.get(item.key, ()))
        windowed = any(p.windowed for p in key_plans)
        final = item.cars_ds.final_function is not None
        # windowed tiles travel back: only the main process writes their chunks
        keep = item.key in registries.replace_keys or final or windowed
        worker_plans = () if final or windowed else key_plans
        done = resumable_tiles(key_plans, state, resume)
        for row, line in enumerate(item.cars_ds.tiles):
            for col, obj in enumerate(line):
                if obj is None:
                    continue
                is_delayed = isinstance(obj, delayed_type)
                if is_delayed and restrict is not None and id(obj) not in restrict:
                    continue
                if is_delayed and (row, col) in done:
                    out.resumed += 1
                    # a windowed tile was merged into its neighbours: nothing to serve
                    if item.key in registries.replace_keys and not windowed:
                        out.to_serve.append(ServeEntry(item, key_plans, row, col, obj))
                    continue
                sink = TileSink(
                    item.key,
                    item.name,
                    row,
                    col,
                    item.cars_ds.dataset_type,
                    worker_plans,
                    bool(keep),
                )
                if is_delayed:
                    out.tasks.append(attach_sink(obj, sink))
                    out.sinks.append(sink)
                    if windowed:  # merges depend on their order (sums, overlaps)
                        merge_order.expect(item.key, row, col)
                elif item.key in registries.save_entries and is_concrete_tile(obj):
                    out.local.append((sink, obj))
    return out
