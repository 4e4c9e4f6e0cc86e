"""Quick-look pictures of a product, with its tile grid and tile status drawn on top.

Needs matplotlib (the optional ``plot`` extra: ``pip install 'zarr-orch[plot]'``). The
figure is made with matplotlib's object API (no pyplot state, any backend), and the
product is read decimated (one pixel in `step` along each axis, ``max_size`` pixels at
most per side), so a quick look stays cheap in memory even for a large product.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

from zarr_orch import constants as cst
from zarr_orch.errors import ProductError, ZarrOrchError
from zarr_orch.reading import PathLike, find_run_metadata, open_product, read_product_info
from zarr_orch.status import DONE, FAILED, MISSING, product_tile_status
from zarr_orch.storage.core.location import Location

logger = logging.getLogger(__name__)

#: fill colours of the tile status overlay (done tiles are left clear)
STATUS_COLORS = {MISSING: "#7f7f7f", FAILED: "#d62728"}


class MissingDependencyError(ZarrOrchError, ImportError):
    """An optional dependency (an extra) needed by the feature asked for is not installed."""


def _require_matplotlib() -> Any:
    """Import matplotlib's Figure, or say which extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "quicklook needs matplotlib, which is not installed: "
            "pip install 'zarr-orch[plot]' (or pip install matplotlib)"
        ) from None
    return Figure


def _decimated(data: Any, step: int) -> np.ndarray:
    """The 2-D values of a (row, col) or (band, row, col) DataArray, one pixel in `step`."""
    if data.ndim == 3:
        data = data.isel({data.dims[0]: 0})
    return np.asarray(data[::step, ::step].values)


def quicklook(
    path_or_url: PathLike,
    tag: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    max_size: int = 1024,
    figsize: tuple[float, float] = (8.0, 6.0),
    dpi: int = 100,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """A matplotlib Figure of one tag of a product, tile grid and tile status overlaid.

    Missing tiles are greyed and hatched, failed ones red: they show as such, never as data
    (the product is read with `open_product`'s missing-tile mask). `tag` defaults to the
    product's first tag; 3-D tags show their first band. Points and dict products have no
    picture: only their tile status is drawn. With `out`, the figure is also saved there
    (format from the suffix; ``figsize * dpi`` pixels). `metadata`: the run's metadata.json
    content, for failed tiles (default: looked up beside the product). Raises
    `MissingDependencyError` without matplotlib.
    """
    figure_cls = _require_matplotlib()
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    location = Location.parse(path_or_url, storage_options)
    info = read_product_info(location)
    tags = list((info.get("tags") or {}).keys())
    if tag is not None and tag not in tags:
        raise ProductError(
            f"{location.url} has no tag {tag!r}; its tags are: {', '.join(tags) or 'none'}"
        )
    if max_size < 16:
        raise ValueError(f"max_size must be at least 16 pixels, got {max_size}")
    if metadata is None:
        metadata = find_run_metadata(location, info)
    status = product_tile_status(location, info, tag, metadata)
    fig = figure_cls(figsize=figsize, dpi=dpi)
    ax = fig.add_subplot()
    grid_rows, grid_cols = status.shape
    is_raster = info.get("kind") == cst.CARS_DS_TYPE_ARRAY and bool(tags)
    if is_raster:
        tag = tag or tags[0]
        height, width = (int(v) for v in info["extent"])
        tile_h, tile_w = (int(v) for v in info["tile_size"])
        step = max(1, math.ceil(max(height, width) / max_size))
        ds = open_product(location)
        if tag not in ds:
            raise ProductError(f"tag {tag!r} of {location.url} has no data array yet")
        height, width = ds.sizes[cst.ROW], ds.sizes[cst.COL]
        values = _decimated(ds[tag], step)
        _draw_values(fig, ax, values, (height, width), tag)
        subtitle = f"1 pixel in {step}" if step > 1 else "full resolution"
    else:
        tile_h = tile_w = 1
        height, width = grid_rows, grid_cols
        ax.set_facecolor("#c7e9c0")  # done tiles of a product without pixels
        subtitle = f"{info.get('kind')} product: tile status only"
    patches: dict[str, list[Any]] = {MISSING: [], FAILED: []}
    for (r, c), value in np.ndenumerate(status.values):
        if value in patches:
            r0, c0 = r * tile_h, c * tile_w
            patches[str(value)].append(
                Rectangle((c0, r0), min(tile_w, width - c0), min(tile_h, height - r0))
            )
    for state, hatch in ((MISSING, "//"), (FAILED, "xx")):
        if patches[state]:
            ax.add_collection(
                PatchCollection(
                    patches[state],
                    facecolor=STATUS_COLORS[state],
                    edgecolor=STATUS_COLORS[state],
                    alpha=0.55,
                    hatch=hatch,
                    linewidth=0.5,
                    zorder=3,
                )
            )
    if max(grid_rows, grid_cols) <= 256:
        line = {"color": "white", "linewidth": 0.6, "alpha": 0.7, "zorder": 4}
        for r in range(1, grid_rows):
            ax.axhline(r * tile_h, **line)
        for c in range(1, grid_cols):
            ax.axvline(c * tile_w, **line)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xlabel("col (pixels)" if is_raster else "tile col")
    ax.set_ylabel("row (pixels)" if is_raster else "tile row")
    counts = {s: int(status.attrs[f"tiles_{s}"]) for s in (DONE, MISSING, FAILED)}
    ax.legend(
        handles=[
            Patch(facecolor="none", edgecolor="black", label=f"done ({counts[DONE]})"),
            Patch(
                facecolor=STATUS_COLORS[MISSING],
                alpha=0.55,
                hatch="//",
                label=f"missing ({counts[MISSING]})",
            ),
            Patch(
                facecolor=STATUS_COLORS[FAILED],
                alpha=0.55,
                hatch="xx",
                label=f"failed ({counts[FAILED]})",
            ),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=3,
        frameon=False,
        fontsize="small",
    )
    title = location.name + (f" / {tag}" if is_raster else "")
    ax.set_title(f"{title}\n{counts[DONE]}/{status.size} tiles done, {subtitle}", fontsize="medium")
    fig.subplots_adjust(bottom=0.18)
    if out is not None:
        fig.savefig(os.fspath(out), dpi=dpi)
        logger.info("quicklook of %s written to %s", location.url, out)
    return fig


def _draw_values(fig: Any, ax: Any, values: np.ndarray, shape: tuple[int, int], tag: str) -> None:
    """imshow of the decimated values: categories get a qualitative map, else 2-98% stretch."""
    height, width = shape
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    extent = (0, width, height, 0)
    categorical = False
    if finite.size and np.all(np.mod(finite, 1) == 0):
        uniques = np.unique(finite)
        categorical = uniques.size <= 12
    if categorical:
        low, high = float(uniques.min()), float(uniques.max())
        image = ax.imshow(
            values,
            extent=extent,
            cmap="tab10",
            vmin=low - 0.5,
            vmax=low + 9.5,
            interpolation="nearest",
        )
        ticks = [float(v) for v in uniques]
        bar = fig.colorbar(image, ax=ax, shrink=0.8, ticks=ticks)
        bar.ax.set_ylim(low - 0.5, high + 0.5)
    else:
        vmin = vmax = None
        if finite.size:
            vmin, vmax = (float(v) for v in np.percentile(finite, [2, 98]))
            if vmin == vmax:
                vmin, vmax = vmin - 0.5, vmax + 0.5
        image = ax.imshow(
            values, extent=extent, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(tag)


__all__ = ["MissingDependencyError", "quicklook"]
