"""Step 1 of a breakpoint: check and create every product, read the tiles already done.

Every product is checked before any is touched, so a refused rerun changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.breakpoint.state import ProductKey, ProductState, RunState, product_key
from zarr_orch.errors import ConfigurationError, ProductError
from zarr_orch.registry.fingerprint import digest as fingerprint_digest
from zarr_orch.registry.fingerprint import fingerprint_components
from zarr_orch.registry.plan import (
    as_windowed,
    build_plans,
    intermediate_plan,
    product_attributes,
    product_location,
)
from zarr_orch.registry.registries import Registries, TrackedDataset
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.run_dir import relative_path
from zarr_orch.storage.format.product import ProductPlan, product_differences, product_info
from zarr_orch.storage.writers.merge_batch import BATCH
from zarr_orch.storage.writers.prepare import prepare_product
from zarr_orch.storage.writers.window_writer import recover_merges

logger = logging.getLogger(__name__)


def prepare_products(
    tracked: list[TrackedDataset],
    registries: Registries,
    conf: dict[str, Any],
    out_location: Location,
    run_id: str,
    state: RunState,
) -> dict[int, list[ProductPlan]]:
    """Plans of every tracked dataset's products, created on disk with their records.

    Grids, writers and fingerprints are checked first; then each product is created (or
    reset) and its recorded done tiles enter `state`, so get_data reads them back and a
    rerun skips them.
    """
    plans, file_names = _plans_of(tracked, registries, conf, out_location)
    _check_writers(plans, registries, conf["mode"])
    decisions = []
    for key, key_plans in plans.items():
        item = registries.datasets[key]
        if item.cars_ds.final_function is None and _switched_before(key_plans):
            # an earlier run found this dataset's tiles carry windows of their own
            key_plans[:] = [as_windowed(plan) for plan in key_plans]
        names = [file_names[product_key(plan)] for plan in key_plans]
        key_plans[:] = [merge_pass(plan, state) for plan in key_plans]
        for plan, file_name in zip(key_plans, names, strict=True):
            components = fingerprint_components(plan, item.cars_ds, conf["run_key"])
            reset = decide_reset(plan, components, conf, state.prepared)
            decisions.append((key, item, plan, file_name, components, reset))
    # merges a killed run left half-applied are undone before any record is read
    BATCH.start(conf["merge_commit_seconds"])
    recover_merges([d[2] for d in decisions if d[2].windowed])
    for key, item, plan, file_name, components, reset in decisions:
        sweep = sweeps_temps(plan.location, out_location, state.prepared)
        done = _write_product(plan, item, file_name, components, run_id, reset, sweep)
        state.prepared.add(plan.location.url)
        state.products[product_key(plan)] = ProductState(plan, file_name, set(done))
        # a later breakpoint re-registering this product (e.g. CARS's read-modify-write
        # through final_function and get_data) recomputes its tiles: resume is for the
        # tiles an earlier run finished, not those another dataset of this run wrote
        state.resumable.setdefault(product_key(plan), set(done))
        for tag in plan.tag_names if not plan.all_variables else ():
            state.saved_tags.setdefault(key, {})[tag] = product_key(plan)
        logger.debug("%s: %d tiles already recorded", plan.location, len(done))
    return plans


def merge_pass(plan: ProductPlan, state: RunState) -> ProductPlan:
    """The plan of this breakpoint's merge pass over a windowed product.

    A later breakpoint of the same run may merge into a windowed product again (a second
    read-modify-write pass). Its tiles are recorded apart (records ``<name>_pass<k>``), so
    a rerun after a kill resumes each pass exactly: the first pass is skipped as done, the
    second merges only the tiles it had not merged, on top of the same bytes.
    """
    if not plan.windowed:
        return plan
    base = (plan.location.url, plan.records)
    count = state.passes.get(base, 0) + 1
    state.passes[base] = count
    return plan if count == 1 else dataclasses.replace(plan, records=f"{plan.records}_pass{count}")


def _write_product(
    plan: ProductPlan,
    item: TrackedDataset,
    file_name: str,
    components: dict[str, Any],
    run_id: str,
    reset: bool,
    sweep: bool = False,
) -> set[tuple[int, int]]:
    """Create (or reuse) one product with its attributes and fingerprint; its done tiles.
    `sweep` removes the temp files killed writers left in it (its first use in a run)."""
    attributes = product_attributes(plan, item.cars_ds, file_name)
    attributes["zarr_orch"]["fingerprints"] = {
        plan.records: {"digest": fingerprint_digest(components), "components": components}
    }
    attributes["zarr_orch"]["run_id"] = run_id
    return prepare_product(plan, attributes, reset=reset, sweep_temps=sweep)


def _switched_before(key_plans: list[ProductPlan]) -> bool:
    """Whether the grid products of a dataset were made windowed by an earlier run."""
    for plan in key_plans:
        if plan.windowed or plan.kind != cst.CARS_DS_TYPE_ARRAY or plan.all_variables:
            continue
        info = product_info(plan.location)
        if info is not None and info.get("windowed"):
            return True
    return False


def switch_to_windowed(
    key_plans: list[ProductPlan],
    item: TrackedDataset,
    run_key: str | None,
    run_id: str,
    state: RunState,
) -> list[ProductPlan]:
    """Make a dataset's grid products windowed (its first tile follows no chunk grid).

    Called by the main process before anything of the dataset was written in this run; the
    attributes and fingerprint say so, so verify checks it as windowed and a rerun merges
    in the main process again (`_switched_before`).
    """
    switched = []
    for plan in key_plans:
        windowed = as_windowed(plan)
        file_name = state.of(plan).file_name
        components = fingerprint_components(windowed, item.cars_ds, run_key)
        done = _write_product(windowed, item, file_name, components, run_id, reset=False)
        state.products[product_key(windowed)] = ProductState(windowed, file_name, set(done))
        switched.append(windowed)
        logger.info(
            "%s: tiles carry windows of their own; %s is merged by the main process",
            item.name,
            plan.location.url,
        )
    return switched


def _plans_of(
    tracked: list[TrackedDataset],
    registries: Registries,
    conf: dict[str, Any],
    out_location: Location,
) -> tuple[dict[int, list[ProductPlan]], dict[ProductKey, str]]:
    """Product plans per dataset key, and the file name each product was registered as."""
    plans: dict[int, list[ProductPlan]] = {}
    file_names: dict[ProductKey, str] = {}
    for item in tracked:
        entries = registries.save_entries.get(item.key)
        if not entries:
            if conf["save_intermediate"] and item.key in registries.replace_keys:
                plan = intermediate_plan(item, out_location, conf["codec"])
                if plan is not None:
                    plans[item.key] = [plan]
                    file_names[product_key(plan)] = f"intermediate/{plan.location.name}"
            continue
        plans[item.key] = build_plans(
            item,
            entries,
            out_location,
            conf["codec"],
            describe_tiles=item.key in registries.replace_keys,
        )
        for plan in plans[item.key]:
            file_names[product_key(plan)] = next(
                e.file_name
                for e in entries
                if product_location(e.file_name, out_location).url == plan.location.url
            )
    if conf["checksum"]:  # opt-in crc32c codec (GDAL cannot read it)
        plans = {
            key: [dataclasses.replace(p, checksum=True) for p in key_plans]
            for key, key_plans in plans.items()
        }
    return plans, file_names


def _check_writers(plans: dict[int, list[ProductPlan]], registries: Registries, mode: str) -> None:
    """Refuse products workers cannot share, and a tag two datasets would both write."""
    seen: dict[str, int] = {}
    for key, key_plans in plans.items():
        for plan in key_plans:
            check_shared(plan.location, mode)
            for tag in plan.tag_names:
                owner = seen.setdefault(f"{plan.location.url}::{tag}", key)
                if owner != key:
                    raise ConfigurationError(
                        f"tag {tag!r} of {plan.location.url} is saved by two datasets "
                        f"({registries.datasets[owner].name} and "
                        f"{registries.datasets[key].name}); one writer per chunk: "
                        "save them to different file names or tags"
                    )


def sweeps_temps(location: Location, out_location: Location, prepared: set[str]) -> bool:
    """Whether preparing the product at `location` may delete the temp files killed writers
    left in it: on its first use in this run (no writer of this run has touched it yet) and
    only inside out_dir, whose lease this run holds (no other run writes there)."""
    first_use = location.url not in prepared
    return first_use and relative_path(out_location.url, location.url) is not None


def decide_reset(
    plan: ProductPlan, components: dict[str, Any], conf: dict[str, Any], prepared: set[str]
) -> bool:
    """Whether to delete an existing product first; refuse a mismatch nobody allowed."""
    first_use = plan.location.url not in prepared
    if first_use and conf["overwrite"]:
        return True
    differences = product_differences(plan, components)
    if not differences:
        return False
    if first_use and not conf["resume"]:
        return True
    what = "; ".join(differences)
    raise ProductError(
        f"{plan.location.url} already holds {plan.dataset_name} tiles made with another "
        f"configuration ({what}). Its finished tiles cannot be reused. To recompute it, set "
        "resume: false (this product is rebuilt, other products in out_dir are kept) or "
        "overwrite: true (every product of this run is deleted and rebuilt) in the "
        "orchestrator conf, or use another out_dir"
    )


def check_shared(location: Location, mode: str) -> None:
    """Refuse a product in this process's memory when other processes write its tiles."""
    if location.protocol == "memory" and mode != "sequential":
        raise ConfigurationError(
            f"{location.url} is in the memory of this process, but mode {mode!r} writes "
            "tiles in worker processes, each with its own memory: the tiles would be lost. "
            "Use mode 'sequential', or a local path or object store URL that every worker "
            "reaches"
        )
