"""Preparing a product before its tasks start: create the group and records, or reuse them."""

from __future__ import annotations

import logging
from typing import Any

import zarr

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError
from zarr_orch.storage.core.atomic_files import sweep_temp_files
from zarr_orch.storage.core.handles import forget_handles
from zarr_orch.storage.core.zarr_io import publish
from zarr_orch.storage.format import records as rec
from zarr_orch.storage.format.consolidated import consolidate
from zarr_orch.storage.format.product import (
    FORMAT_VERSION,
    KINDS,
    ProductPlan,
    check_existing_arrays,
    old_format_message,
    product_info,
)
from zarr_orch.storage.format.tile_descriptions import create_tile_descriptions

logger = logging.getLogger(__name__)


def prepare_product(
    plan: ProductPlan,
    attributes: dict[str, Any],
    reset: bool = False,
    sweep_temps: bool = False,
) -> set[tuple[int, int]]:
    """Create the product group and its completion records (or reuse the existing ones).

    Returns the tiles already recorded as done. With `reset`, an existing product is
    deleted first (the caller decided the user asked for it). Existing arrays whose chunks,
    dtype or nodata differ from the plan are refused: nothing on disk is changed then.
    With `sweep_temps`, the temp files killed writers left in a local product are deleted
    (`sweep_temp_files`): only when no live writer can be using them, i.e. the caller holds
    the out_dir lease and has not started any writer of this run on the product yet.
    """
    if plan.kind not in KINDS:
        raise ProductError(f"unknown product kind {plan.kind!r}")
    info = product_info(plan.location)
    if reset and info is not None:
        logger.warning("deleting %s to recompute it from scratch", plan.location.url)
        plan.location.rm()
        forget_handles(plan.location)
        info = None
    store = plan.location.zarr_store()
    if info is None:
        plan.location.makedirs()
        if sweep_temps:  # a product whose creation was killed may hold temp files
            _sweep(plan)
        # built in memory with zarr's API, then every document stored at once; the group's
        # one document carries its zarr_orch attributes, so a crash never leaves it without
        staged = zarr.storage.MemoryStore()
        group = zarr.create_group(staged, attributes=attributes, zarr_format=3)
        rec.create_records(group, plan.records, plan.grid_shape, plan.tag_names)
        if plan.describe_tiles and plan.kind == cst.CARS_DS_TYPE_ARRAY:
            create_tile_descriptions(group, plan)
        publish(staged, store)
        forget_handles(plan.location)
        return set()  # created just now: nothing is recorded yet
    else:
        if info.get("format_version", 0) < FORMAT_VERSION:
            raise ProductError(
                f"{plan.location.url} cannot be resumed: {old_format_message(info)}; set "
                "resume: false or overwrite: true in the orchestrator conf to recompute it, or use "
                "another out_dir"
            )
        group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
        if info.get("kind", plan.kind) != plan.kind:
            raise ProductError(
                f"{plan.location.url} holds a {info.get('kind')!r} product; it cannot receive "
                f"{plan.kind!r} tiles: choose another file name"
            )
        check_existing_arrays(group, plan)
        if sweep_temps:  # after every refusal: a refused product is left as it was
            _sweep(plan)
        old = dict(group.attrs.get("zarr_orch", {}))
        new = attributes["zarr_orch"]
        merged = {**old, **new}
        merged["tags"] = {**old.get("tags", {}), **new.get("tags", {})}
        merged["records"] = sorted(set(old.get("records", [])) | set(new.get("records", [])))
        merged["fingerprints"] = {**old.get("fingerprints", {}), **new.get("fingerprints", {})}
        merged["created"] = old.get("created", new.get("created"))
        group.attrs["zarr_orch"] = merged
    rec.create_records(group, plan.records, plan.grid_shape, plan.tag_names)
    if plan.describe_tiles and plan.kind == cst.CARS_DS_TYPE_ARRAY:
        create_tile_descriptions(group, plan)
    forget_handles(plan.location)
    if not plan.all_variables and set(plan.tag_names) <= set(group.array_keys()):
        # the attributes changed; consolidated metadata is written only when it lists every
        # array (else at the end of the breakpoint): readers never get a stale layout
        consolidate(plan.location)
    return rec.done_tiles(store, plan.records)


def _sweep(plan: ProductPlan) -> None:
    if plan.location.is_local:  # object stores write with one PUT: no temp files
        sweep_temp_files(plan.location.url)
