"""Step 5 of a breakpoint: book finished tiles, then flush records and metadata.

A tile counts as done once its receipt is booked and its completion record is stored;
after the rounds, records are flushed, raster products consolidated and statistics updated.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from zarr_orch import __version__
from zarr_orch import constants as cst
from zarr_orch.breakpoint.state import Emit, RunState, product_key
from zarr_orch.cluster.base import TaskError
from zarr_orch.errors import StorageError, TaskFailedError
from zarr_orch.progress import StageSummary
from zarr_orch.registry.registries import Registries
from zarr_orch.registry.sink import Receipt, TileSink
from zarr_orch.storage.core.run_dir import place
from zarr_orch.storage.format.consolidated import consolidate_all
from zarr_orch.storage.format.product import ProductPlan
from zarr_orch.storage.format.records import RecordWriter
from zarr_orch.storage.writers.merge_batch import BATCH

logger = logging.getLogger(__name__)

#: a record write that failed: (product URL, row, col, error)
Unrecorded = tuple[str, int, int, BaseException]


class Ledger:
    """Books the finished tiles of one breakpoint into the run state and the records."""

    def __init__(
        self, state: RunState, records: RecordWriter, registries: Registries, emit: Emit
    ) -> None:
        self.state = state
        self.records = records
        self.registries = registries
        self.emit = emit

    def book(self, receipt: Receipt) -> int:
        """Bookkeeping of one finished tile: done sets, replaced cell, cropped flag."""
        self.state.cropped = self.state.cropped or receipt.cropped
        for product, write in receipt.writes.items():
            product_state = self.state.products[product]
            if write.record is not None:
                self.records.submit(
                    product_state.plan.location, receipt.row, receipt.col, write.record
                )
            product_state.done.add((receipt.row, receipt.col))
        if receipt.key in self.registries.replace_keys:
            cars_ds = self.registries.datasets[receipt.key].cars_ds
            cars_ds.tiles[receipt.row][receipt.col] = receipt.tile
        return receipt.nbytes

    def done_tile(self, sink: TileSink, receipt: Receipt, summary: StageSummary) -> None:
        """Book a finished tile and count it in `summary` (and forget an earlier failure)."""
        self.state.failed_tiles.pop((sink.name, sink.row, sink.col), None)
        nbytes = self.book(receipt)
        summary.done += 1
        summary.nbytes += nbytes
        self.emit("on_tile_done", sink.name, sink.row, sink.col, nbytes, receipt.seconds)

    def flush_records(self) -> list[Unrecorded]:
        """Commit the pending windowed merges, wait for the background record writes;
        un-book the tiles whose merge or record could not be stored."""
        with contextlib.suppress(Exception):  # rolled back, logged, reported by take_lost
            BATCH.commit()
        lost = BATCH.take_lost()  # logged once per failed commit, by the batch
        failed = self.records.flush()
        self.state.stats["record_requests"] = self.records.requests
        for url, row, col, exc in failed:
            logger.error("could not record tile (%d, %d) of %s: %s", row, col, url, exc)
        failed = lost + failed
        for url, row, col, _exc in failed:
            for (product_url, _records), product_state in self.state.products.items():
                if product_url == url:
                    product_state.done.discard((row, col))
        return failed

    def finish(
        self,
        plans: dict[int, list[ProductPlan]],
        summary: StageSummary,
        started: float,
        failures: list[tuple[TileSink, TaskError]],
    ) -> list[Unrecorded]:
        """End of a breakpoint, even an interrupted one: records, metadata, statistics.

        Returns the tiles whose record could not be stored (`unrecorded_error`).
        """
        unrecorded = self.flush_records()
        summary.done -= lost_tiles(unrecorded, plans)  # booked, but not stored: not done
        # raster arrays created by workers during the breakpoint: readers' view of them
        # (points products, one group per tile, are read by read_points only)
        consolidate_all(
            p.location
            for key_plans in plans.values()
            for p in key_plans
            if p.kind == cst.CARS_DS_TYPE_ARRAY
        )
        summary.seconds = time.perf_counter() - started
        stats = self.state.stats
        stats["breakpoints"] += 1
        stats["tiles"] += summary.done
        stats["resumed"] += summary.resumed
        stats["bytes"] += summary.nbytes
        stats["failed"] += summary.failed
        stats["seconds"] += summary.seconds
        for sink, error in failures:
            self.state.failed_tiles[(sink.name, sink.row, sink.col)] = str(error)
        self.emit("on_stage_end", summary)
        return unrecorded

    def saved_products(
        self, plans: dict[int, list[ProductPlan]]
    ) -> list[tuple[int, str, ProductPlan, bool]]:
        """(dataset key, file name, plan, any tile done) of every saved product: GeoTIFF jobs."""
        return [
            (key, product_state.file_name, plan, bool(product_state.done))
            for key, key_plans in plans.items()
            if key in self.registries.save_entries
            for plan in key_plans
            for product_state in [self.state.products[product_key(plan)]]
        ]


def lost_tiles(unrecorded: list[Unrecorded], plans: dict[int, list[ProductPlan]]) -> int:
    """How many tiles `unrecorded` names (it has one entry per product of a tile)."""
    key_of = {plan.location.url: key for key, key_plans in plans.items() for plan in key_plans}
    return len({(key_of.get(url, url), row, col) for url, row, col, _exc in unrecorded})


def failure_error(failures: list[tuple[TileSink, TaskError]], done: int) -> TaskFailedError:
    """The error a breakpoint with failed tiles raises: the first failure, with its traceback."""
    sink, error = failures[0]
    others = f" ({len(failures) - 1} other tile(s) failed too)" if len(failures) > 1 else ""
    message = (
        f"task for {sink.what} failed: {error.exc_type}: {error.message}{others}; "
        f"{done} tile(s) finished and are kept on disk.\n\nOriginal traceback:\n{error.traceback}"
    )
    exc = TaskFailedError(
        message,
        dataset_name=sink.name,
        row=sink.row,
        col=sink.col,
        original_traceback=error.traceback,
    )
    exc.failures = [(s.name, s.row, s.col, str(e)) for s, e in failures]
    return exc


def unrecorded_error(unrecorded: list[Unrecorded]) -> StorageError:
    """The error a breakpoint raises when tiles were written but their records were not."""
    url, row, col, exc = unrecorded[0]
    return StorageError(
        f"{len(unrecorded)} tile write(s) could not be completed with their completion record "
        f"(first: tile ({row}, {col}) of {url}: {exc}); they are not recorded, and rerunning "
        "recomputes exactly those tiles"
    )


def run_info(
    state: RunState,
    *,
    run_id: str,
    started: str,
    out_dir: str,
    conf: dict[str, Any],
    log_file: str | None,
) -> dict[str, Any]:
    """The ``zarr_orch`` section of metadata.json: run, statistics, products, failed tiles."""
    return {
        "version": __version__,
        "run_id": run_id,
        "started": started,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "out_dir": out_dir,
        "conf": conf,
        "stats": dict(state.stats),
        "products": {
            product.file_name: {
                **place(out_dir, url),
                "kind": product.plan.kind,
                "dataset": product.plan.dataset_name,
                "tags": list(product.plan.tag_names),
                "tiles_done": len(product.done),
                "tiles_total": product.plan.grid_shape[0] * product.plan.grid_shape[1],
            }
            for (url, _records), product in state.products.items()
        },
        "log_file": log_file,
        "failed_tiles": [
            {"dataset": name, "row": row, "col": col, "error": error}
            for (name, row, col), error in state.failed_tiles.items()
        ],
    }
