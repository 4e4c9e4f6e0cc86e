"""Step 3 of a breakpoint: run tasks on the cluster and settle every outcome as it comes.

Windowed datasets merge in tile order (`MergeOrder`): an early tile waits for the ones
before it, and a failure breaks the chain after it. A signal stops the round cleanly.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from zarr_orch.breakpoint.book import Ledger, lost_tiles
from zarr_orch.breakpoint.layouts import WindowLayouts
from zarr_orch.breakpoint.state import Emit
from zarr_orch.cluster.base import AbstractCluster, Outcome, TaskError
from zarr_orch.errors import TileError
from zarr_orch.interrupts import InterruptGuard, interrupt_message, interrupted
from zarr_orch.progress import StageSummary
from zarr_orch.registry.merge_order import MergeOrder
from zarr_orch.registry.sink import Receipt, TileSink
from zarr_orch.storage.format.product import ProductPlan

logger = logging.getLogger(__name__)
failures_logger = logging.getLogger("zarr_orch.failures")


class RoundRunner:
    """Runs rounds of tasks for one breakpoint and books each outcome in merge order.

    `owner` is what a dataset's ``final_function(owner, tile)`` receives (the orchestrator).
    """

    def __init__(
        self,
        cluster: AbstractCluster,
        owner: Any,
        ledger: Ledger,
        plans: dict[int, list[ProductPlan]],
        summary: StageSummary,
        emit: Emit,
        *,
        timeout: float | None,
        merge_order: MergeOrder,
        guard: InterruptGuard | None = None,
        layouts: WindowLayouts | None = None,
    ) -> None:
        self.cluster = cluster
        self.owner = owner
        self.ledger = ledger
        self.plans = plans
        self.summary = summary
        self.emit = emit
        self.timeout = timeout
        self.merge_order = merge_order
        #: who writes tiles that carry their own windows (None: only final_function ones)
        self.layouts = layouts
        #: the breakpoint's signal guard: a caught signal stops the round cleanly
        self.guard = guard
        self.failures: list[tuple[TileSink, TaskError]] = []
        #: set when a signal stopped the round
        self.interrupted = False

    def write_local(self, local: list[tuple[TileSink, Any]]) -> None:
        """Write concrete tiles (e.g. replaced earlier, now saved) in this process."""
        for sink, obj in local:
            self.ledger.done_tile(sink, sink(obj), self.summary)

    def run(self, tasks: list[Any], sinks: list[TileSink]) -> None:
        """Start `tasks` and book every outcome as it completes (receipts only).

        `tasks` is emptied once started, so the graphs are freed as tiles finish.
        """
        if not tasks:
            return
        futures = self.cluster.start_tasks(tasks)
        sink_of = {id(f): s for f, s in zip(futures, sinks, strict=True)}
        order = list(sinks)  # creation order (tile order within a dataset)
        tasks.clear()
        for outcome in self.cluster.outcome_iterator(futures, timeout=self.timeout):
            sink = sink_of.pop(id(outcome.future))
            if self.guard is not None and self.guard.triggered:
                self._book_if_done(sink, outcome)
                self._stop_for_signal()
            if outcome.attempts > 1:
                self.summary.retried += 1
                self.emit("on_tile_retried", sink.name, sink.row, sink.col, outcome.attempts)
            if self.layouts is not None and self.layouts.switches(sink, outcome):
                # its first tile with a window of its own: the rest now merge in tile order
                pending = {id(s) for s in sink_of.values()} | {id(sink)}
                for other in order:
                    if other.key == sink.key and id(other) in pending:
                        self.merge_order.expect(other.key, other.row, other.col)
            # windowed datasets merge in tile order: an early tile waits for the ones before
            for ready_sink, ready_outcome in self.merge_order.ready(sink, outcome):
                self.settle(ready_sink, ready_outcome)

    def settle(self, sink: TileSink, outcome: Outcome) -> None:
        """Book one outcome (merging it first for windowed datasets), or its failure."""
        broken = self.merge_order.broken_by(sink.key)
        if broken is not None:
            error = TileError(f"not merged: {broken} failed before it; a rerun merges it in order")
            self.failures.append((sink, TaskError.from_exception(error)))
            receipt = None
        else:
            receipt = self.receive(outcome, sink)
        if receipt is None:
            if broken is None:
                self.merge_order.break_chain(sink.key, sink.what)
            self.summary.failed += 1
            self.summary.failures.append(sink.what)
            self.emit("on_tile_failed", sink.name, sink.row, sink.col, str(self.failures[-1][1]))
            return
        self.ledger.done_tile(sink, receipt, self.summary)

    def receive(self, outcome: Outcome, sink: TileSink) -> Receipt | None:
        """Turn an outcome into a receipt; run a final_function in the main process if any."""
        if not outcome.ok:
            self.failures.append((sink, outcome.error))
            logger.error("%s failed: %s", sink.what, outcome.error)
            failures_logger.info(
                "%s failed after %d attempt(s); original traceback:\n%s",
                sink.what,
                outcome.attempts,
                outcome.error.traceback,
            )
            return None
        receipt: Receipt = outcome.value
        item = self.ledger.registries.datasets[sink.key]
        final_function = item.cars_ds.final_function
        try:
            if self.layouts is not None:
                in_main = self.layouts.main_writes(sink, receipt, final_function is not None)
            else:
                in_main = final_function is not None and receipt.tile is not None
            if not in_main:
                return receipt
            tile = receipt.tile
            if final_function is not None:
                tile = final_function(self.owner, tile)
            elif self.layouts is not None:
                self.layouts.note_overlap(sink, tile)
            writer = TileSink(
                sink.key,
                sink.name,
                sink.row,
                sink.col,
                sink.dataset_type,
                tuple(self.plans.get(sink.key, ())),
                sink.keep_tile,
            )
            return writer(tile)
        except Exception as exc:
            self.failures.append((sink, TaskError.from_exception(exc)))
            if final_function is not None:
                logger.error("%s: final_function failed: %s", sink.what, exc)
            else:
                logger.error("%s failed: %s", sink.what, exc)
            return None

    def _book_if_done(self, sink: TileSink, outcome: Outcome) -> None:
        """Book (and count) a tile that finished while we were being interrupted: it is on
        disk, so the summary the user reads must include it."""
        receipt = outcome.value
        if not outcome.ok or not isinstance(receipt, Receipt) or receipt.misfit:
            return
        if sink.plans or not self.plans.get(sink.key):  # else the main process merges it
            self.ledger.done_tile(sink, receipt, self.summary)

    def _stop_for_signal(self) -> None:
        """Stop the workers, write the records, raise Interrupted with one line of counts."""
        signum = self.guard.signum if self.guard is not None else signal.SIGINT
        self.cluster.cleanup()  # abandons in-flight tiles: no record is ever written first
        # the counts below are what is on disk
        self.summary.done -= lost_tiles(self.ledger.flush_records(), self.plans)
        message = interrupt_message(signum, self.summary)
        logger.warning(message)
        self.interrupted = True
        raise interrupted(message, signum)
