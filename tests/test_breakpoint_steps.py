"""The breakpoint's steps one by one, on real local products and a real sequential cluster.

`prepare_products` reads which tiles an earlier run recorded, `plan_tiles` submits only the
others (or all of them without resume), `serve_resumed` rebuilds replaced tiles from the
store, and `RoundRunner` + `Ledger` compute and book the rest, so a third run resumes all.
"""

from __future__ import annotations

import numpy as np
import pytest
from app_tasks import array_tile, arrays_dataset, profile_for, schedule

from zarr_orch import Orchestrator
from zarr_orch.breakpoint.book import Ledger, run_info
from zarr_orch.breakpoint.plan import plan_tiles
from zarr_orch.breakpoint.prepare import prepare_products
from zarr_orch.breakpoint.rounds import RoundRunner
from zarr_orch.breakpoint.serve import serve_resumed
from zarr_orch.breakpoint.state import RunState
from zarr_orch.data.tiling import overlap_array_to_dict, window_array_to_dict
from zarr_orch.registry.merge_order import MergeOrder
from zarr_orch.storage.format.records import RecordWriter

H, W, TILE = 64, 128, (32, 64)  # a 2 x 2 grid
CONF = {"mode": "sequential", "progress": False, "max_retries": 0}
SKIPPED = {(0, 1), (1, 0)}


def _register(orch: Orchestrator, skip: set[tuple[int, int]] = frozenset(), replace=False):
    """Save (and optionally replace) one dataset; cells in `skip` get no task."""
    cds = arrays_dataset(H, W, TILE, overlap=1, name="dem")
    orch.add_to_save_lists("dem.tif", "hgt", cds, dtype="float32", nodata=-9999)
    if replace:
        orch.add_to_replace_lists(cds)
    schedule(orch, cds, array_tile, profile_for(H, W))
    for row, col in skip:
        cds[row, col] = None
    return cds


@pytest.fixture(params=[False, True], ids=["saved", "saved+replaced"])
def half_done(request, tmp_path):
    """An out_dir whose dem product has every tile but SKIPPED recorded as done."""
    out = str(tmp_path / "out")
    with Orchestrator(CONF, out_dir=out) as orch:
        _register(orch, skip=SKIPPED, replace=request.param)
    return out, request.param


def _prepare(orch: Orchestrator, state: RunState):
    tracked = orch.registries.ordered()
    plans = prepare_products(
        tracked, orch.registries, orch.get_conf(), orch.out_location, orch.run_id, state
    )
    return tracked, plans


def _plan(orch, tracked, plans, state, resume=True, merge_order=None):
    return plan_tiles(
        tracked,
        orch.registries,
        plans,
        state,
        resume=resume,
        delayed_type=orch.cluster.get_delayed_type(),
        attach_sink=orch.cluster.attach_sink,
        merge_order=merge_order or MergeOrder(),
    )


def test_prepare_reads_the_done_tiles_and_plan_submits_only_the_others(half_done):
    out, _replaced = half_done
    with Orchestrator(CONF, out_dir=out) as orch:
        _register(orch)
        state = RunState()
        tracked, plans = _prepare(orch, state)
        [product] = state.products.values()
        assert product.file_name == "dem.tif"
        assert product.done == {(0, 0), (1, 1)}

        tiles = _plan(orch, tracked, plans, state)
        assert {(s.row, s.col) for s in tiles.sinks} == SKIPPED
        assert len(tiles.tasks) == 2
        assert tiles.resumed == 2
        assert tiles.to_serve == []  # saved only: nothing to put back in the dataset
        assert tiles.stage(tracked, 0).name == "breakpoint 1 (dem)"

        everything = _plan(orch, tracked, plans, state, resume=False)
        assert len(everything.tasks) == 4
        assert everything.resumed == 0
        orch.reset_registries()


def _runner(orch, plans, summary, state, records, events, merge_order):
    ledger = Ledger(state, records, orch.registries, lambda event, *a: events.append(event))
    rounds = RoundRunner(
        orch.cluster,
        orch,
        ledger,
        plans,
        summary,
        ledger.emit,
        timeout=None,
        merge_order=merge_order,
    )
    return ledger, rounds


def test_serve_resumed_puts_replaced_tiles_back_from_the_store(tmp_path):
    out = str(tmp_path / "out")
    with Orchestrator(CONF, out_dir=out) as orch:
        _register(orch, skip=SKIPPED, replace=True)
    records = RecordWriter()
    with Orchestrator(CONF, out_dir=out) as orch:
        cds = _register(orch, replace=True)
        state = RunState()
        tracked, plans = _prepare(orch, state)
        merge_order = MergeOrder()
        tiles = _plan(orch, tracked, plans, state, merge_order=merge_order)
        assert sorted((e.row, e.col) for e in tiles.to_serve) == [(0, 0), (1, 1)]
        summary = tiles.stage(tracked, 0)
        ledger, rounds = _runner(orch, plans, summary, state, records, [], merge_order)
        rounds.run(tiles.tasks, tiles.sinks)  # the neighbours first, as compute_futures does

        assert serve_resumed(tiles.to_serve, state) == []  # every one rebuilt exactly
        for row, col in [(0, 0), (1, 1)]:
            tile = cds.tiles[row][col]
            assert not isinstance(tile, orch.cluster.get_delayed_type())
            expected = array_tile(
                window_array_to_dict(cds.tiling_grid[row, col]),
                overlap_array_to_dict(cds.overlaps[row, col]),
                {},
            )
            np.testing.assert_array_equal(tile["hgt"].values, expected["hgt"].values)
        ledger.finish(plans, summary, 0.0, rounds.failures)
        orch.reset_registries()
    records.close()


def test_rounds_compute_and_ledger_books_the_rest(half_done):
    out, _replaced = half_done
    records = RecordWriter()
    with Orchestrator(CONF, out_dir=out) as orch:
        _register(orch)
        state = RunState()
        tracked, plans = _prepare(orch, state)
        merge_order = MergeOrder()
        tiles = _plan(orch, tracked, plans, state, merge_order=merge_order)
        summary = tiles.stage(tracked, 0)
        events: list[str] = []
        ledger, rounds = _runner(orch, plans, summary, state, records, events, merge_order)
        rounds.run(tiles.tasks, tiles.sinks)
        assert tiles.tasks == []  # started tasks are let go
        assert rounds.failures == []
        assert ledger.finish(plans, summary, 0.0, rounds.failures) == []
        assert (summary.done, summary.resumed, summary.failed) == (2, 2, 0)
        assert events == ["on_tile_done", "on_tile_done", "on_stage_end"]
        assert state.stats["breakpoints"] == 1 and state.stats["tiles"] == 2
        [product] = state.products.values()
        assert product.done == {(0, 0), (0, 1), (1, 0), (1, 1)}
        info = run_info(
            state, run_id="r", started="s", out_dir=orch.out_dir, conf={}, log_file=None
        )
        assert info["products"]["dem.tif"]["tiles_done"] == 4
        orch.reset_registries()
    records.close()

    with Orchestrator(CONF, out_dir=out) as orch:  # the records reached the disk
        _register(orch)
        state = RunState()
        tracked, plans = _prepare(orch, state)
        tiles = _plan(orch, tracked, plans, state)
        assert (len(tiles.tasks), tiles.resumed) == (0, 4)
        orch.reset_registries()
