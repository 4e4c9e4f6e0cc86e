"""The Orchestrator: CARS's API, with every tile streamed into a Zarr chunk.

Applications register datasets (save / replace / compute), then `breakpoint()` runs them:
each registered tile task gets a sink that writes the tile where it was computed and sends
back a receipt; the orchestrator only does bookkeeping (done tiles, replaced tiles,
metadata). Names and parameters follow ``cars.orchestrator.orchestrator``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from typing import Any

from zarr_orch import __version__
from zarr_orch import constants as cst
from zarr_orch.cars_compat import (
    CarsApiMixin,
    flatten_object,
    get_disparity_range_cropped,
    merge_dicts,
    resolve_init_args,
    update_saving_infos,
)
from zarr_orch.cluster.base import AbstractCluster, Outcome, TaskError
from zarr_orch.conf import validate_conf
from zarr_orch.data.cars_dataset import is_concrete_tile
from zarr_orch.data.documents import dump_document, format_for
from zarr_orch.errors import (
    ConfigurationError,
    ProductError,
    StorageError,
    TaskFailedError,
    TileError,
)
from zarr_orch.geotiff_outputs import GeoTiffOptions, GeoTiffOutputs
from zarr_orch.interrupts import InterruptGuard, interrupt_message, interrupted, signal_of
from zarr_orch.progress import Callback, StageSummary, default_callbacks
from zarr_orch.registry.fingerprint import digest as fingerprint_digest
from zarr_orch.registry.fingerprint import fingerprint_components
from zarr_orch.registry.ids import IdGenerator
from zarr_orch.registry.merge_order import MergeOrder
from zarr_orch.registry.plan import (
    build_plans,
    intermediate_plan,
    product_attributes,
    product_location,
)
from zarr_orch.registry.registries import Registries, TrackedDataset
from zarr_orch.registry.sink import Receipt, TileSink
from zarr_orch.runlog import RunLog
from zarr_orch.secrets import mask_secrets
from zarr_orch.storage.core.lease import Lease
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.retry import StorageSettings
from zarr_orch.storage.core.run_dir import name_in, place
from zarr_orch.storage.format.consolidated import consolidate_all
from zarr_orch.storage.format.product import ProductPlan, product_differences
from zarr_orch.storage.format.records import RecordWriter
from zarr_orch.storage.readers.windows import read_window
from zarr_orch.storage.writers.prepare import prepare_product
from zarr_orch.storage.writers.window_writer import read_merged, recover_merges

logger = logging.getLogger(__name__)


class _ProductState:
    """What the main process knows of one product: where it is and which tiles are done."""

    __slots__ = ("done", "file_name", "plan")

    def __init__(self, plan: ProductPlan, file_name: str, done: set[tuple[int, int]]) -> None:
        self.plan = plan
        self.file_name = file_name
        self.done = done


__all__ = [
    "Orchestrator",
    "flatten_object",
    "get_disparity_range_cropped",
    "merge_dicts",
    "update_saving_infos",
]


class Orchestrator(CarsApiMixin):
    """Orchestrator: registers CarsDatasets and computes them at breakpoints into Zarr.

    Both constructor conventions work: the seed API's ``(orchestrator_conf, out_dir,
    launch_worker, out_json_path)`` and CARS 1.3's ``(orchestrator_conf, out_dir, log_dir,
    launch_worker, out_yaml_path)``; a bool third argument is launch_worker, a path or None
    is log_dir (`zarr_orch.cars_compat.resolve_init_args`).
    """

    def __init__(
        self,
        orchestrator_conf: dict[str, Any] | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        init = resolve_init_args(args, kwargs)
        launch_worker, out_json_path = init.launch_worker, init.metadata_path
        cluster_cls, self._conf = validate_conf(orchestrator_conf)
        self._storage_options = self._conf["storage_options"]
        self.tmp_dir_list: list[Any] = []
        if out_dir is None:
            out_dir = tempfile.mkdtemp(prefix="zarr_orch_")
            self.add_to_clean(out_dir)
            logger.info("no out_dir given: using temporary directory %s (removed at exit)", out_dir)
        self.out_location = Location.parse(
            out_dir, self._storage_options, settings=StorageSettings.from_conf(self._conf)
        )
        self.out_dir = self.out_location.url
        _check_out_dir(self.out_location)
        if out_json_path is None:
            self.out_json_location = self.out_location.join("metadata.json")
        else:
            self.out_json_location = Location.parse(out_json_path, base=self.out_location)
        self.out_json_path = self.out_json_location.url
        self._geotiffs = GeoTiffOutputs(self.out_location, self._conf["geotiff_outputs"])
        self.launch_worker = launch_worker
        self.run_id = uuid.uuid4().hex[:12]
        self.out_json: dict[str, Any] = {}
        self.init_cars_api(init.log_dir)
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.id_generator = IdGenerator()
        self.registries = Registries()
        self._products: dict[tuple[str, str], _ProductState] = {}
        self._saved_tags: dict[int, dict[str, tuple[str, str]]] = {}
        self._prepared: set[str] = set()
        #: tiles each (product, records) had done when this run first prepared it: the only
        #: ones resume may skip (tiles written by this run's own breakpoints are not reused)
        self._resumable: dict[tuple[str, str], set[tuple[int, int]]] = {}
        self._failed_tiles: dict[tuple[str, int, int], str] = {}
        self._stats = {
            "breakpoints": 0,
            "tiles": 0,
            "resumed": 0,
            "bytes": 0,
            "failed": 0,
            "seconds": 0.0,
            "record_requests": 0,
        }
        self._closed = False
        self._cropped = False
        self.callbacks: list[Callback] = default_callbacks(self._conf["progress"])
        self._guard: InterruptGuard | None = None
        self._interrupted = False
        self._runlog: RunLog | None = None
        if launch_worker:
            self._runlog = RunLog(self.out_location, self.run_id)
            self._runlog.header(self.run_id, self.get_conf())
        self._records = RecordWriter()
        self._merge_order = MergeOrder()
        self._lease: Lease | None = None
        try:
            if launch_worker:
                self._lease = Lease(
                    self.out_location, self.run_id, stale_after=self._conf["lease_timeout"]
                )
                self._lease.acquire()
            self.cluster: AbstractCluster = cluster_cls(
                self._conf, self.out_location, launch_worker
            )
        except BaseException:
            # a refused lease or a cluster that cannot start: leave nothing attached
            if self._lease is not None and self._lease.held:
                self._lease.release()
            if self._runlog is not None:
                self._runlog.close()
            raise
        logger.info(
            "orchestrator %s started: mode %s, out_dir %s",
            self.run_id,
            self._conf["mode"],
            self.out_location,
        )

    # -- configuration -----------------------------------------------------------------------
    def get_conf(self) -> dict[str, Any]:
        """Get orchestrator conf: the validated conf with every default filled (secrets masked)."""
        return mask_secrets(self._conf)

    def add_to_clean(self, tmp_dir: str | os.PathLike[str]) -> None:
        """Register a directory to remove when the orchestrator exits."""
        self.tmp_dir_list.append(tmp_dir)

    # -- registration ------------------------------------------------------------------------
    def add_to_save_lists(
        self,
        file_name: str,
        tag: str,
        cars_ds: Any,
        dtype: Any = "float32",
        nodata: Any = 0,
        cars_ds_name: str | None = None,
        optional_data: bool = False,
        save_by_pair: bool = False,
        rio_tags: Any = None,
        rio_band_description: Any = None,
        nbits: int | None = None,
        *,
        save_points_cloud_by_pair: bool | None = None,
    ) -> None:
        """Save `tag` of every tile of `cars_ds` into the Zarr product of `file_name`.

        A ``.tif``/``.tiff`` name also gets its GeoTIFF after the breakpoint, with CARS's
        `rio_band_description`, `rio_tags` and `nbits` (`zarr_orch.geotiff_outputs`).
        `save_points_cloud_by_pair` is the seed API's name of `save_by_pair`.
        """
        if save_points_cloud_by_pair is not None:
            save_by_pair = save_points_cloud_by_pair
        options = GeoTiffOptions.from_cars(rio_band_description, rio_tags, nbits)
        if isinstance(file_name, str | os.PathLike) and os.fspath(file_name).strip():
            # a name climbing out of out_dir fails here, at the call that gave it
            product_location(os.fspath(file_name), self.out_location)
        key = self.id_generator.get_id(cars_ds)
        self.registries.add_save(
            cars_ds,
            key,
            cars_ds_name,
            file_name,
            tag,
            dtype,
            nodata,
            optional_data,
            save_by_pair,
        )
        self._geotiffs.register(key, file_name, tag, options)

    def add_to_replace_lists(self, cars_ds: Any, cars_ds_name: str | None = None) -> None:
        """Bring computed tiles back into `cars_ds` at the breakpoint."""
        self.registries.add_replace(cars_ds, self.id_generator.get_id(cars_ds), cars_ds_name)

    def add_to_compute_lists(self, cars_ds: Any, cars_ds_name: str | None = None) -> None:
        """Compute `cars_ds` for the tasks' side effects; results are not kept."""
        self.registries.add_compute(cars_ds, self.id_generator.get_id(cars_ds), cars_ds_name)

    def get_saving_infos(self, cars_ds_list: list[Any]) -> list[dict[str, int]]:
        """Saving infos ``{"cars_ds_key": id}`` of each dataset (stable ids)."""
        return [{cst.CARS_DS_KEY: self.id_generator.get_id(cds)} for cds in cars_ds_list]

    # -- metadata ----------------------------------------------------------------------------
    def update_out_info(self, new_dict: dict[str, Any]) -> None:
        """Deep-merge `new_dict` into the run's metadata (written to out_json_path)."""
        if not isinstance(new_dict, dict):
            raise ConfigurationError(f"update_out_info needs a dict, got {type(new_dict).__name__}")
        merge_dicts(self.out_json, copy.deepcopy(new_dict))

    def save_out_json(self) -> None:
        """Write the run's metadata (user info + products + run summary); .yaml/.yml: YAML."""
        content = {**self.out_json, "zarr_orch": self._run_info()}
        fmt = format_for(self.out_json_location.name)
        self.out_json_location.write_text(dump_document(content, fmt))

    def _run_info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "run_id": self.run_id,
            "started": self._started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "out_dir": self.out_dir,
            "conf": self.get_conf(),
            "stats": dict(self._stats),
            "products": {
                state.file_name: {
                    **place(self.out_dir, url),
                    "kind": state.plan.kind,
                    "dataset": state.plan.dataset_name,
                    "tags": list(state.plan.tag_names),
                    "tiles_done": len(state.done),
                    "tiles_total": state.plan.grid_shape[0] * state.plan.grid_shape[1],
                }
                for (url, _records), state in self._products.items()
            },
            "log_file": (
                name_in(self.out_dir, self._runlog.url) if self._runlog is not None else None
            ),
            "failed_tiles": [
                {"dataset": name, "row": row, "col": col, "error": error}
                for (name, row, col), error in self._failed_tiles.items()
            ],
        }

    @property
    def stats(self) -> dict[str, Any]:
        """Run statistics so far: breakpoints, tiles computed, resumed, failed, bytes, ..."""
        return dict(self._stats)

    @property
    def products(self) -> dict[str, str]:
        """{file name as registered: product URL} of every product written so far."""
        return {state.file_name: url for (url, _records), state in self._products.items()}

    # -- reading back ------------------------------------------------------------------------
    def get_data(self, tag: str, future_object: Any) -> tuple[Any, Any]:
        """Data already on disk at the tile's core window: ``(array, nodata)`` or (None, None)."""
        attrs = getattr(future_object, "attrs", None) or {}
        info = attrs.get(cst.SAVING_INFO) or {}
        key = info.get(cst.CARS_DS_KEY)
        product = self._saved_tags.get(key, {}).get(tag)
        window = attrs.get(cst.WINDOW)
        if product is None or (window is None and not self._products[product].plan.windowed):
            return None, None
        state = self._products[product]
        if state.plan.windowed:  # CARS: the window as on disk once any tile was merged
            return read_merged(state.plan, bool(state.done), tag, future_object)
        tile = (info.get(cst.CARS_DS_ROW), info.get(cst.CARS_DS_COL))
        if tile not in state.done:
            return None, None
        spec = next(t for t in state.plan.tags if t.name == tag)
        return read_window(state.plan.location, tag, window), spec.nodata

    # -- execution ---------------------------------------------------------------------------
    def compute_futures(self, only_remaining_delayed: list[Any] | None = None) -> bool:
        """Compute all futures from registries: write saved tiles, replace replaced ones.

        Tiles already recorded as done in their products (an earlier run, when `resume` is
        on) are not submitted; replaced ones are rebuilt from the store once the breakpoint's
        own tiles are written (their overlaps may come from them), and only recomputed when
        that cannot be exact. Registered GeoTIFF names are written last. Returns what CARS
        returns: whether any tile says its disparity range was cropped.
        `only_remaining_delayed` restricts the run to those delayed objects (CARS's second pass).
        """
        if not self.launch_worker:
            logger.info("launch_worker is false: nothing is computed")
            return False
        start = time.perf_counter()
        self._cropped = False
        tracked = self.registries.ordered()
        plans = self._prepare_products(tracked)
        delayed_type = self.cluster.get_delayed_type()
        restrict = (
            None if only_remaining_delayed is None else {id(d) for d in only_remaining_delayed}
        )
        tasks, sinks, local, to_serve = [], [], [], []
        self._merge_order = MergeOrder()
        resumed = 0
        for item in tracked:
            keep = item.key in self.registries.replace_keys or item.cars_ds.final_function
            key_plans = tuple(plans.get(item.key, ()))
            worker_plans = () if item.cars_ds.final_function else key_plans
            done = self._done_for(key_plans)
            windowed = any(p.windowed for p in key_plans)
            for row, line in enumerate(item.cars_ds.tiles):
                for col, obj in enumerate(line):
                    if obj is None:
                        continue
                    is_delayed = isinstance(obj, delayed_type)
                    if is_delayed and restrict is not None and id(obj) not in restrict:
                        continue
                    if is_delayed and (row, col) in done:
                        resumed += 1
                        # a windowed tile was merged into its neighbours: nothing to serve
                        if item.key in self.registries.replace_keys and not windowed:
                            to_serve.append((item, key_plans, row, col, obj))
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
                        tasks.append(self.cluster.attach_sink(obj, sink))
                        sinks.append(sink)
                        if windowed:
                            self._merge_order.expect(item.key, row, col)
                    elif item.key in self.registries.save_entries and is_concrete_tile(obj):
                        local.append((sink, obj))
        names = "+".join(dict.fromkeys(item.name for item in tracked)) or "nothing"
        summary = StageSummary(
            name=f"breakpoint {self._stats['breakpoints'] + 1} ({names})",
            total=len(tasks) + len(local),
            resumed=resumed,
        )
        self._emit("on_stage_start", summary.name, summary.total)
        if resumed:
            self._emit("on_tiles_resumed", resumed)
        failures: list[tuple[TileSink, TaskError]] = []
        self._guard = InterruptGuard().__enter__()
        try:
            for sink, obj in local:  # concrete tiles (e.g. replaced earlier, now saved)
                self._done_tile(sink, sink(obj), summary)
            self._run_round(tasks, sinks, plans, summary, failures)
            del tasks, sinks
            # done tiles of replaced datasets: rebuilt from the store now that this
            # breakpoint's tiles (their neighbours' cores) are written; else recomputed
            again, again_sinks = [], []
            for item, _plans, row, col, obj in self._serve_tiles(to_serve):
                sink = TileSink(item.key, item.name, row, col, item.cars_ds.dataset_type, (), True)
                again.append(self.cluster.attach_sink(obj, sink))
                again_sinks.append(sink)
            if again:
                logger.info(
                    "%d done tile(s) of replaced datasets could not be rebuilt "
                    "exactly from the store: recomputing them",
                    len(again),
                )
                summary.total += len(again)
                self._run_round(again, again_sinks, plans, summary, failures)
            self._clear_unfinished(tracked, delayed_type)
        finally:
            self._guard.__exit__(None, None, None)
            self._guard = None
            unrecorded = self._flush_records()
            # raster arrays created by workers during the breakpoint: readers' view of them
            # (points products, one group per tile, are read by read_points only)
            consolidate_all(
                p.location
                for key_plans in plans.values()
                for p in key_plans
                if p.kind == cst.CARS_DS_TYPE_ARRAY
            )
            summary.seconds = time.perf_counter() - start
            self._stats["breakpoints"] += 1
            self._stats["tiles"] += summary.done
            self._stats["resumed"] += resumed
            self._stats["bytes"] += summary.nbytes
            self._stats["failed"] += summary.failed
            self._stats["seconds"] += summary.seconds
            for sink, error in failures:
                self._failed_tiles[(sink.name, sink.row, sink.col)] = str(error)
            self._emit("on_stage_end", summary)
        if failures:
            raise _failure_error(failures, summary.done)
        if unrecorded:
            url, row, col, exc = unrecorded[0]
            raise StorageError(
                f"{len(unrecorded)} tile(s) were written but their completion record could not "
                f"be stored (first: tile ({row}, {col}) of {url}: {exc}); their data is on "
                "disk, and rerunning recomputes exactly those tiles"
            )
        self._geotiffs.export(
            [
                (key, state.file_name, plan, bool(state.done))
                for key, key_plans in plans.items()
                if key in self.registries.save_entries
                for plan in key_plans
                for state in [self._products[(plan.location.url, plan.records)]]
            ]
        )
        if self._cropped:
            logger.warning(
                "Disparity range was cropped in DenseMatching, due to a lack of available "
                "memory for estimated disparity range"
            )
        return self._cropped

    def _flush_records(self) -> list[tuple[str, int, int, BaseException]]:
        """Wait for the background record writes; un-book the tiles whose record failed."""
        failed = self._records.flush()
        self._stats["record_requests"] = self._records.requests
        for url, row, col, exc in failed:
            logger.error("could not record tile (%d, %d) of %s: %s", row, col, url, exc)
            for (product_url, _records), state in self._products.items():
                if product_url == url:
                    state.done.discard((row, col))
        return failed

    def _run_round(
        self,
        tasks: list[Any],
        sinks: list[TileSink],
        plans: dict[int, list[ProductPlan]],
        summary: StageSummary,
        failures: list[tuple[TileSink, TaskError]],
    ) -> None:
        """Start `tasks` and book every outcome as it completes (receipts only)."""
        if not tasks:
            return
        futures = self.cluster.start_tasks(tasks)
        sink_of = {id(f): s for f, s in zip(futures, sinks, strict=True)}
        tasks.clear()
        timeout = self._conf["task_timeout"]
        for outcome in self.cluster.outcome_iterator(futures, timeout=timeout):
            sink = sink_of.pop(id(outcome.future))
            if self._guard is not None and self._guard.triggered:
                self._book_if_done(sink, outcome, summary)
                self._stop_for_signal(summary)
            if outcome.attempts > 1:
                summary.retried += 1
                self._emit("on_tile_retried", sink.name, sink.row, sink.col, outcome.attempts)
            # windowed datasets merge in tile order: an early tile waits for the ones before
            for ready_sink, ready_outcome in self._merge_order.ready(sink, outcome):
                self._settle(ready_sink, ready_outcome, plans, summary, failures)

    def _settle(
        self,
        sink: TileSink,
        outcome: Outcome,
        plans: dict[int, list[ProductPlan]],
        summary: StageSummary,
        failures: list[tuple[TileSink, TaskError]],
    ) -> None:
        """Book one outcome (merging it first for windowed datasets), or its failure."""
        broken = self._merge_order.broken_by(sink.key)
        if broken is not None:
            error = TileError(f"not merged: {broken} failed before it; a rerun merges it in order")
            failures.append((sink, TaskError.from_exception(error)))
            receipt = None
        else:
            receipt = self._receive(outcome, sink, plans, failures)
        if receipt is None:
            if broken is None:
                self._merge_order.break_chain(sink.key, sink.what)
            summary.failed += 1
            summary.failures.append(sink.what)
            self._emit("on_tile_failed", sink.name, sink.row, sink.col, str(failures[-1][1]))
            return
        self._done_tile(sink, receipt, summary)

    def _book_if_done(self, sink: TileSink, outcome: Outcome, summary: StageSummary) -> None:
        """Book (and count) a tile that finished while we were being interrupted: it is on
        disk, so the summary the user reads must include it."""
        if outcome.ok and isinstance(outcome.value, Receipt):
            self._done_tile(sink, outcome.value, summary)

    def _stop_for_signal(self, summary: StageSummary) -> None:
        """Stop the workers, write the records, raise Interrupted with one line of counts."""
        signum = self._guard.signum if self._guard is not None else signal.SIGINT
        self.cluster.cleanup()  # abandons in-flight tiles: no record is ever written first
        unrecorded = len(self._flush_records())  # the counts below are what is on disk
        message = interrupt_message(signum, summary, unrecorded)
        logger.warning(message)
        self._interrupted = True
        raise interrupted(message, signum)

    def _done_tile(self, sink: TileSink, receipt: Receipt, summary: StageSummary) -> None:
        self._failed_tiles.pop((sink.name, sink.row, sink.col), None)
        nbytes = self._book(receipt)
        summary.done += 1
        summary.nbytes += nbytes
        self._emit("on_tile_done", sink.name, sink.row, sink.col, nbytes, receipt.seconds)

    def _emit(self, event: str, *args: Any) -> None:
        """Call `event` on every callback; a failing callback is logged, never fatal."""
        for callback in self.callbacks:
            try:
                getattr(callback, event)(*args)
            except Exception as exc:
                logger.warning("progress callback %r failed in %s: %s", callback, event, exc)

    def add_callback(self, callback: Callback) -> None:
        """Receive breakpoint events (see `zarr_orch.progress.Callback`)."""
        self.callbacks.append(callback)

    def _done_for(self, key_plans: tuple[ProductPlan, ...]) -> set[tuple[int, int]]:
        """Tiles done in every product of a dataset (empty when it saves nothing)."""
        if not key_plans or not self._conf["resume"]:
            return set()
        sets = [self._resumable.get((p.location.url, p.records), set()) for p in key_plans]
        return set.intersection(*sets)

    def _serve_tiles(self, to_serve: list[tuple]) -> list[tuple]:
        """Put done replaced tiles, served by the store, in their cells.

        Cells get lazy tiles, read and checked only when used (`tile_store.serve_tiles`).
        Returns the entries that could not be rebuilt exactly (they are recomputed).
        """
        from zarr_orch.storage.readers.tile_store import serve_tiles

        groups: dict[int, list[tuple]] = {}
        for entry in to_serve:
            groups.setdefault(entry[0].key, []).append(entry)
        left: list[tuple] = []
        for entries in groups.values():
            item, key_plans = entries[0][0], entries[0][1]
            pending = {(row, col): entry for entry in entries for row, col in [entry[2:4]]}
            for plan in key_plans:
                if not pending:
                    break
                state = self._products[(plan.location.url, plan.records)]
                try:
                    tiles = serve_tiles(plan, list(pending), state.done)
                except Exception as exc:  # a damaged description only costs recomputation
                    logger.warning(
                        "tiles of %s cannot be served from %s (%s)",
                        item.name,
                        plan.location.url,
                        exc,
                    )
                    tiles = {}
                for (row, col), tile in tiles.items():
                    item.cars_ds.tiles[row][col] = tile
                    del pending[(row, col)]
            left.extend(pending.values())
        return left

    def _prepare_products(self, tracked: list[TrackedDataset]) -> dict[int, list[ProductPlan]]:
        """Check grids and fingerprints, create products and records, read done tiles.

        Every product is checked before any is touched, so a refused rerun changes nothing.
        """
        plans: dict[int, list[ProductPlan]] = {}
        file_names: dict[tuple[str, str], str] = {}
        for item in tracked:
            entries = self.registries.save_entries.get(item.key)
            if not entries:
                if self._conf["save_intermediate"] and item.key in self.registries.replace_keys:
                    plan = intermediate_plan(item, self.out_location, self._conf["codec"])
                    if plan is not None:
                        plans[item.key] = [plan]
                        file_names[(plan.location.url, plan.records)] = (
                            f"intermediate/{plan.location.name}"
                        )
                continue
            plans[item.key] = build_plans(
                item,
                entries,
                self.out_location,
                self._conf["codec"],
                describe_tiles=item.key in self.registries.replace_keys,
            )
            for plan in plans[item.key]:
                file_names[(plan.location.url, plan.records)] = next(
                    e.file_name
                    for e in entries
                    if product_location(e.file_name, self.out_location).url == plan.location.url
                )
        if self._conf["checksum"]:  # opt-in crc32c codec (GDAL cannot read it)
            plans = {
                key: [dataclasses.replace(p, checksum=True) for p in key_plans]
                for key, key_plans in plans.items()
            }
        seen: dict[str, int] = {}
        for key, key_plans in plans.items():
            for plan in key_plans:
                _check_shared(plan.location, self._conf["mode"])
                for tag in plan.tag_names:
                    owner = seen.setdefault(f"{plan.location.url}::{tag}", key)
                    if owner != key:
                        raise ConfigurationError(
                            f"tag {tag!r} of {plan.location.url} is saved by two datasets "
                            f"({self.registries.datasets[owner].name} and "
                            f"{self.registries.datasets[key].name}); one writer per chunk: "
                            "save them to different file names or tags"
                        )
        decisions = []
        for key, key_plans in plans.items():
            item = self.registries.datasets[key]
            for plan in key_plans:
                file_name = file_names[(plan.location.url, plan.records)]
                components = fingerprint_components(plan, item.cars_ds, self._conf["run_key"])
                reset = self._decide_reset(plan, components)
                decisions.append((key, item, plan, file_name, components, reset))
        # merges a killed run left half-applied are undone before any record is read
        recover_merges([d[2] for d in decisions if d[2].windowed])
        for key, item, plan, file_name, components, reset in decisions:
            attributes = product_attributes(plan, item.cars_ds, file_name)
            attributes["zarr_orch"]["fingerprints"] = {
                plan.records: {"digest": fingerprint_digest(components), "components": components}
            }
            attributes["zarr_orch"]["run_id"] = self.run_id
            done = prepare_product(plan, attributes, reset=reset)
            self._prepared.add(plan.location.url)
            # tiles recorded on disk (earlier breakpoints or runs) count as done, so that
            # get_data reads them back and a rerun skips them
            self._products[(plan.location.url, plan.records)] = _ProductState(
                plan, file_name, set(done)
            )
            # a later breakpoint re-registering this product (e.g. CARS's read-modify-write
            # through final_function and get_data) recomputes its tiles: resume is for the
            # tiles an earlier run finished, not those another dataset of this run wrote
            self._resumable.setdefault((plan.location.url, plan.records), set(done))
            for tag in plan.tag_names if not plan.all_variables else ():
                self._saved_tags.setdefault(key, {})[tag] = (plan.location.url, plan.records)
            logger.debug("%s: %d tiles already recorded", plan.location, len(done))
        return plans

    def _decide_reset(self, plan: ProductPlan, components: dict[str, Any]) -> bool:
        """Whether to delete an existing product first; refuse a mismatch nobody allowed."""
        first_use = plan.location.url not in self._prepared
        if first_use and self._conf["overwrite"]:
            return True
        differences = product_differences(plan, components)
        if not differences:
            return False
        if first_use and not self._conf["resume"]:
            return True
        what = "; ".join(differences)
        raise ProductError(
            f"{plan.location.url} already holds {plan.dataset_name} tiles made with another "
            f"configuration ({what}). Its finished tiles cannot be reused. To recompute it, set "
            "resume: false (this product is rebuilt, other products in out_dir are kept) or "
            "overwrite: true (every product of this run is deleted and rebuilt) in the "
            "orchestrator conf, or use another out_dir"
        )

    def _receive(
        self,
        outcome: Outcome,
        sink: TileSink,
        plans: dict[int, list[ProductPlan]],
        failures: list[tuple[TileSink, TaskError]],
    ) -> Receipt | None:
        """Turn an outcome into a receipt; run a final_function in the main process if any."""
        if not outcome.ok:
            failures.append((sink, outcome.error))
            logger.error("%s failed: %s", sink.what, outcome.error)
            logging.getLogger("zarr_orch.failures").info(
                "%s failed after %d attempt(s); original traceback:\n%s",
                sink.what,
                outcome.attempts,
                outcome.error.traceback,
            )
            return None
        receipt: Receipt = outcome.value
        item = self.registries.datasets[sink.key]
        final_function = item.cars_ds.final_function
        if final_function is not None and receipt.tile is not None:
            try:
                tile = final_function(self, receipt.tile)
                writer = TileSink(
                    sink.key,
                    sink.name,
                    sink.row,
                    sink.col,
                    sink.dataset_type,
                    tuple(plans.get(sink.key, ())),
                    sink.keep_tile,
                )
                receipt = writer(tile)
            except Exception as exc:
                failures.append((sink, TaskError.from_exception(exc)))
                logger.error("%s: final_function failed: %s", sink.what, exc)
                return None
        return receipt

    def _book(self, receipt: Receipt) -> int:
        """Bookkeeping of one finished tile: done sets, replaced cell, cropped flag."""
        self._cropped = self._cropped or receipt.cropped
        for product, write in receipt.writes.items():
            state = self._products[product]
            if write.record is not None:
                self._records.submit(state.plan.location, receipt.row, receipt.col, write.record)
            state.done.add((receipt.row, receipt.col))
        if receipt.key in self.registries.replace_keys:
            cars_ds = self.registries.datasets[receipt.key].cars_ds
            cars_ds.tiles[receipt.row][receipt.col] = receipt.tile
        return receipt.nbytes

    def _clear_unfinished(self, tracked: list[TrackedDataset], delayed_type: Any) -> None:
        """Replaced datasets hold concrete tiles or None after a breakpoint, never delayed."""
        for item in tracked:
            if item.key not in self.registries.replace_keys:
                continue
            for line in item.cars_ds.tiles:
                for col, obj in enumerate(line):
                    if obj is not None and isinstance(obj, delayed_type):
                        line[col] = None

    def breakpoint(self) -> bool:
        """Breakpoint: compute all delayed, save and replace data in CarsDatasets.

        Registries are emptied afterwards, whether the computation succeeded or not.
        """
        if not self.registries:
            logger.debug("breakpoint: nothing registered")
            return False
        try:
            return self.compute_futures()
        finally:
            self.reset_registries()
            if self.launch_worker:
                self._save_metadata_quietly()
            if self._runlog is not None:
                self._runlog.sync()

    def reset_registries(self) -> None:
        """Forget every registration (ids stay unique for the orchestrator's lifetime)."""
        self.registries = Registries()
        self._geotiffs.clear()

    def reset_cluster(self) -> None:
        """Stop the cluster and start a fresh one with the same conf."""
        self.cluster.cleanup()
        self.cluster = type(self.cluster)(self._conf, self.out_location, self.launch_worker)

    def _save_metadata_quietly(self) -> None:
        try:
            self.save_out_json()
            self.save_index()
        except Exception as exc:  # never hide the real outcome of a run behind metadata I/O
            logger.error("could not write %s: %s", self.out_json_location, exc)

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> Orchestrator:
        """Function run on enter."""
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback_msg: Any) -> bool:
        """Compute what is still registered (unless the body raised), then clean up."""
        try:
            if exc_type is None:
                self.breakpoint()
                if self.launch_worker:
                    self.save_out_json()
            elif self.registries:
                logger.info("the with-block raised: registered tasks are not started")
        finally:
            self.cleanup()
        if signal_of(exc_value) == signal.SIGTERM:
            _terminate_self()
        return False

    def cleanup(self) -> None:
        """Stop the cluster and remove the directories registered with add_to_clean."""
        if self._closed:
            return
        self._closed = True
        try:
            self.cluster.cleanup()
        finally:
            self._records.close()
            if self._lease is not None:
                self._lease.release()
            if self._runlog is not None:
                self._runlog.close()
            for path in self.tmp_dir_list:
                _remove(path, self._storage_options)

    def __repr__(self) -> str:
        return (
            f"Orchestrator(mode={self._conf['mode']!r}, out_dir={self.out_location!r}, "
            f"run_id={self.run_id!r})"
        )


def _terminate_self() -> None:
    """After a clean stop on SIGTERM, die of SIGTERM as the sender asked (main thread only)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _failure_error(failures: list[tuple[TileSink, TaskError]], done: int) -> TaskFailedError:
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


def _check_shared(location: Location, mode: str) -> None:
    """Refuse a product in this process's memory when other processes write its tiles."""
    if location.protocol == "memory" and mode != "sequential":
        raise ConfigurationError(
            f"{location.url} is in the memory of this process, but mode {mode!r} writes "
            "tiles in worker processes, each with its own memory: the tiles would be lost. "
            "Use mode 'sequential', or a local path or object store URL that every worker "
            "reaches"
        )


def _check_out_dir(location: Location) -> None:
    """Create a local out_dir and make sure it is a writable directory; probe a remote one.

    A remote out_dir gets a write+delete probe, so a missing bucket, denied access or an
    unreachable endpoint fails here, with the URL in the message, before any task runs.
    """
    if not location.is_local:
        location.check_writable()
        return
    if os.path.exists(location.url) and not os.path.isdir(location.url):
        raise ConfigurationError(f"out_dir {location.url} exists and is not a directory")
    try:
        os.makedirs(location.url, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create out_dir {location.url}: {exc.strerror}") from None
    if not os.access(location.url, os.W_OK | os.X_OK):
        raise ConfigurationError(f"out_dir {location.url} is not writable; choose another one")


def _remove(path: Any, storage_options: dict[str, Any]) -> None:
    try:
        location = Location.parse(path, storage_options)
        if location.is_local:
            shutil.rmtree(location.url, ignore_errors=True)
        else:
            location.rm()
    except Exception as exc:  # cleanup must not mask the run's own outcome
        logger.warning("could not remove %s: %s", path, exc)
