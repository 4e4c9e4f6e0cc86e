"""What the main process keeps across breakpoints: products, done tiles, statistics.

Every breakpoint step reads or updates one `RunState`; the facade reads it for get_data
and metadata.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zarr_orch.storage.format.product import ProductPlan

logger = logging.getLogger(__name__)

#: a product as the run knows it: (product URL, records name)
ProductKey = tuple[str, str]
#: a tile of a dataset grid: (row, col)
Cell = tuple[int, int]
#: calls one progress event on every callback: ``emit("on_tile_done", name, row, ...)``
Emit = Callable[..., None]


def emit_to(callbacks: Iterable[Any], event: str, *args: Any) -> None:
    """Call `event` on every callback; a failing callback is logged, never fatal."""
    for callback in callbacks:
        try:
            getattr(callback, event)(*args)
        except Exception as exc:
            logger.warning("progress callback %r failed in %s: %s", callback, event, exc)


def product_key(plan: ProductPlan) -> ProductKey:
    """The key of `plan`'s product in `RunState.products`."""
    return (plan.location.url, plan.records)


class ProductState:
    """What the main process knows of one product: where it is and which tiles are done."""

    __slots__ = ("done", "file_name", "plan")

    def __init__(self, plan: ProductPlan, file_name: str, done: set[Cell]) -> None:
        self.plan = plan
        self.file_name = file_name
        self.done = done


def new_stats() -> dict[str, Any]:
    """Run statistics before the first breakpoint (the keys metadata.json reports)."""
    return {
        "breakpoints": 0,
        "tiles": 0,
        "resumed": 0,
        "bytes": 0,
        "failed": 0,
        "seconds": 0.0,
        "record_requests": 0,
    }


@dataclass
class RunState:
    """Products prepared so far, their done tiles, failures and statistics of the run."""

    products: dict[ProductKey, ProductState] = field(default_factory=dict)
    #: {dataset key: {tag: product}}: where get_data finds a saved tag
    saved_tags: dict[int, dict[str, ProductKey]] = field(default_factory=dict)
    #: product URLs prepared by this run (a later use is not a "first use")
    prepared: set[str] = field(default_factory=set)
    #: tiles each product had done when this run first prepared it: the only ones resume
    #: may skip (tiles written by this run's own breakpoints are not reused)
    resumable: dict[ProductKey, set[Cell]] = field(default_factory=dict)
    #: how many breakpoints of this run merged each windowed product (its passes)
    passes: dict[ProductKey, int] = field(default_factory=dict)
    failed_tiles: dict[tuple[str, int, int], str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=new_stats)
    #: whether a tile of the current breakpoint said its disparity range was cropped
    cropped: bool = False

    def of(self, plan: ProductPlan) -> ProductState:
        """The state of `plan`'s product (prepared earlier by `prepare_products`)."""
        return self.products[product_key(plan)]
