"""The Orchestrator: CARS's API, with every tile streamed into a Zarr chunk.

Applications register datasets (save / replace / compute), then `breakpoint()` runs them:
each registered tile task gets a sink that writes the tile where it was computed and sends
back a receipt; the orchestrator only does bookkeeping (done tiles, replaced tiles,
metadata). Names and parameters follow ``cars.orchestrator.orchestrator``.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import tempfile
import time
import uuid
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.breakpoint.book import (
    Ledger,
    failure_error,
    run_info,
    unrecorded_error,
)
from zarr_orch.breakpoint.layouts import WindowLayouts
from zarr_orch.breakpoint.plan import plan_tiles
from zarr_orch.breakpoint.prepare import prepare_products, switch_to_windowed
from zarr_orch.breakpoint.rounds import RoundRunner
from zarr_orch.breakpoint.serve import (
    clear_unfinished,
    read_saved,
    recompute_tasks,
    serve_resumed,
)
from zarr_orch.breakpoint.state import RunState, emit_to
from zarr_orch.cars_compat import (
    CROPPED_WARNING,
    CarsApiMixin,
    cars_worker_preload,
    flatten_object,
    get_disparity_range_cropped,
    merge_dicts,
    resolve_init_args,
    update_saving_infos,
)
from zarr_orch.cluster.base import AbstractCluster
from zarr_orch.conf import validate_conf
from zarr_orch.data.documents import dump_document, format_for
from zarr_orch.errors import ConfigurationError
from zarr_orch.geotiff_outputs import GeoTiffOptions, GeoTiffOutputs
from zarr_orch.interrupts import InterruptGuard, signal_of, terminate_self
from zarr_orch.out_dir import check_out_dir, claim_out_dir, release_out_dir, remove_dir
from zarr_orch.progress import Callback, default_callbacks
from zarr_orch.registry.ids import IdGenerator
from zarr_orch.registry.merge_order import MergeOrder
from zarr_orch.registry.plan import product_location
from zarr_orch.registry.registries import Registries
from zarr_orch.secrets import mask_secrets
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.retry import StorageSettings
from zarr_orch.storage.core.run_dir import name_in
from zarr_orch.storage.format.records import RecordWriter

logger = logging.getLogger(__name__)

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
        self._conf = cars_worker_preload(self._conf)
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
        check_out_dir(self.out_location)
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
        #: products, done tiles, failures and statistics (`zarr_orch.breakpoint.state`)
        self._state = RunState()
        self._stats = self._state.stats
        self._closed = False
        self.callbacks: list[Callback] = default_callbacks(self._conf["progress"])
        self._guard: InterruptGuard | None = None
        self._interrupted = False
        self._records = RecordWriter()
        self._runlog, self._lease = claim_out_dir(
            self.out_location, self.run_id, self._conf, launch_worker
        )
        try:
            self.cluster: AbstractCluster = cluster_cls(
                self._conf, self.out_location, launch_worker
            )
        except BaseException:  # a cluster that cannot start: leave nothing attached
            release_out_dir(self._runlog, self._lease)
            raise
        if self._lease is not None:  # after the cluster: its workers fork before any thread
            self._lease.start_heartbeat()
        mode, where = self._conf["mode"], self.out_location
        logger.info("orchestrator %s started: mode %s, out_dir %s", self.run_id, mode, where)

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
        log_file = name_in(self.out_dir, self._runlog.url) if self._runlog is not None else None
        return run_info(
            self._state,
            run_id=self.run_id,
            started=self._started,
            out_dir=self.out_dir,
            conf=self.get_conf(),
            log_file=log_file,
        )

    @property
    def stats(self) -> dict[str, Any]:
        """Run statistics so far: breakpoints, tiles computed, resumed, failed, bytes, ..."""
        return dict(self._stats)

    @property
    def products(self) -> dict[str, str]:
        """{file name as registered: product URL} of every product written so far."""
        return {state.file_name: url for (url, _records), state in self._state.products.items()}

    # -- reading back ------------------------------------------------------------------------
    def get_data(self, tag: str, future_object: Any) -> tuple[Any, Any]:
        """Data already on disk at the tile's core window: ``(array, nodata)`` or (None, None)."""
        return read_saved(self._state, tag, future_object)

    # -- execution ---------------------------------------------------------------------------
    def compute_futures(self, only_remaining_delayed: list[Any] | None = None) -> bool:
        """Compute all futures from registries: write saved tiles, replace replaced ones.

        Tiles already recorded as done in their products (an earlier run, when `resume` is
        on) are not submitted; replaced ones are rebuilt from the store once the breakpoint's
        own tiles are written (their overlaps may come from them), and only recomputed when
        that cannot be exact. Registered GeoTIFF names are written last. Returns what CARS
        returns: whether any tile says its disparity range was cropped.
        `only_remaining_delayed` restricts the run to those delayed objects (CARS's second pass).
        The steps live in `zarr_orch.breakpoint`.
        """
        if not self.launch_worker:
            logger.info("launch_worker is false: nothing is computed")
            return False
        start = time.perf_counter()
        self._state.cropped = False
        tracked = self.registries.ordered()
        plans = prepare_products(
            tracked, self.registries, self._conf, self.out_location, self.run_id, self._state
        )
        delayed_type = self.cluster.get_delayed_type()
        self._merge_order = MergeOrder()
        tiles = plan_tiles(
            tracked,
            self.registries,
            plans,
            self._state,
            resume=self._conf["resume"],
            delayed_type=delayed_type,
            attach_sink=self.cluster.attach_sink,
            merge_order=self._merge_order,
            only=only_remaining_delayed,
        )
        summary = tiles.stage(tracked, self._stats["breakpoints"])
        self._emit("on_stage_start", summary.name, summary.total)
        if tiles.resumed:
            self._emit("on_tiles_resumed", tiles.resumed)
        ledger = Ledger(self._state, self._records, self.registries, self._emit)
        rounds = RoundRunner(
            self.cluster,
            self,
            ledger,
            plans,
            summary,
            self._emit,
            timeout=self._conf["task_timeout"],
            merge_order=self._merge_order,
            layouts=WindowLayouts(
                self._state, plans, self._switch_to_windowed, resume=self._conf["resume"]
            ),
        )
        self._guard = rounds.guard = InterruptGuard().__enter__()
        try:
            rounds.write_local(tiles.local)
            rounds.run(tiles.tasks, tiles.sinks)
            tiles.sinks.clear()
            # done tiles of replaced datasets: rebuilt from the store now that this
            # breakpoint's tiles (their neighbours' cores) are written; else recomputed
            again, again_sinks = recompute_tasks(
                serve_resumed(tiles.to_serve, self._state), self.cluster.attach_sink
            )
            summary.total += len(again)
            rounds.run(again, again_sinks)
            clear_unfinished(tracked, self.registries.replace_keys, delayed_type)
        finally:
            self._guard.__exit__(None, None, None)
            self._guard = None
            self._interrupted = self._interrupted or rounds.interrupted
            unrecorded = ledger.finish(plans, summary, start, rounds.failures)
        if rounds.failures:
            raise failure_error(rounds.failures, summary.done)
        if unrecorded:
            raise unrecorded_error(unrecorded)
        self._geotiffs.export(ledger.saved_products(plans))
        if self._state.cropped:
            logger.warning(CROPPED_WARNING)
        return self._state.cropped

    def _switch_to_windowed(self, key_plans: list[Any], key: int) -> list[Any]:
        """Make a dataset's products windowed (its tiles carry windows of their own)."""
        item = self.registries.datasets[key]
        return switch_to_windowed(key_plans, item, self._conf["run_key"], self.run_id, self._state)

    def _emit(self, event: str, *args: Any) -> None:
        emit_to(self.callbacks, event, *args)

    def add_callback(self, callback: Callback) -> None:
        """Receive breakpoint events (see `zarr_orch.progress.Callback`)."""
        self.callbacks.append(callback)

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
            terminate_self()
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
            release_out_dir(self._runlog, self._lease, held_only=False)
            for path in self.tmp_dir_list:
                remove_dir(path, self._storage_options)

    def __repr__(self) -> str:
        return (
            f"Orchestrator(mode={self._conf['mode']!r}, out_dir={self.out_location!r}, "
            f"run_id={self.run_id!r})"
        )
