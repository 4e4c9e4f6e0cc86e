"""Step 3 of a breakpoint: run tasks on the cluster and settle every outcome as it comes.

Windowed datasets merge in tile order (`MergeOrder`): an early tile waits for the ones
before it, and a failure breaks the chain after it. A signal stops the round cleanly.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from zarr_orch.breakpoint.book import Ledger
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
    ) -> None:
        self.cluster = cluster
        self.owner = owner
        self.ledger = ledger
        self.plans = plans
        self.summary = summary
        self.emit = emit
        self.timeout = timeout
        self.merge_order = merge_order
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
        tasks.clear()
        for outcome in self.cluster.outcome_iterator(futures, timeout=self.timeout):
            sink = sink_of.pop(id(outcome.future))
            if self.guard is not None and self.guard.triggered:
                self._book_if_done(sink, outcome)
                self._stop_for_signal()
            if outcome.attempts > 1:
                self.summary.retried += 1
                self.emit("on_tile_retried", sink.name, sink.row, sink.col, outcome.attempts)
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
        if final_function is not None and receipt.tile is not None:
            try:
                tile = final_function(self.owner, receipt.tile)
                writer = TileSink(
                    sink.key,
                    sink.name,
                    sink.row,
                    sink.col,
                    sink.dataset_type,
                    tuple(self.plans.get(sink.key, ())),
                    sink.keep_tile,
                )
                receipt = writer(tile)
            except Exception as exc:
                self.failures.append((sink, TaskError.from_exception(exc)))
                logger.error("%s: final_function failed: %s", sink.what, exc)
                return None
        return receipt

    def _book_if_done(self, sink: TileSink, outcome: Outcome) -> None:
        """Book (and count) a tile that finished while we were being interrupted: it is on
        disk, so the summary the user reads must include it."""
        if outcome.ok and isinstance(outcome.value, Receipt):
            self.ledger.done_tile(sink, outcome.value, self.summary)

    def _stop_for_signal(self) -> None:
        """Stop the workers, write the records, raise Interrupted with one line of counts."""
        signum = self.guard.signum if self.guard is not None else signal.SIGINT
        self.cluster.cleanup()  # abandons in-flight tiles: no record is ever written first
        unrecorded = len(self.ledger.flush_records())  # the counts below are what is on disk
        message = interrupt_message(signum, self.summary, unrecorded)
        logger.warning(message)
        self.interrupted = True
        raise interrupted(message, signum)
