"""Verification of windowed products: every chunk decodes, and no merge is left half-done.

A windowed product's pixels are merges of several tiles, so a tile's record cannot be
compared with one chunk (a later tile changed it) and a damaged chunk cannot be redone by
recomputing one tile. What can be checked: every stored chunk of every tag decodes (its
CRC32C codec fails loudly on damage) and the merge journal holds no unfinished merge.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from zarr_orch.storage.core.zarr_io import get_bytes
from zarr_orch.storage.format.journal import MANIFEST


def windowed_problems(group: Any, store: Any, tags: list[str]) -> Iterator[tuple[str, str]]:
    """(tag, problem) of every chunk that does not decode, and ("", ...) for a pending merge.

    The chunks are read one by one (bounded memory: one chunk decoded at a time).
    """
    if get_bytes(store, MANIFEST) is not None:
        yield (
            "",
            (
                "the merge journal holds a merge a killed run did not finish: the next run "
                "with resume on rolls it back and merges that tile again"
            ),
        )
    names = set(group.array_keys())
    for tag in tags:
        if tag not in names:
            continue
        array = group[tag]
        sizes = [int(c) for c in array.chunks]
        grid = [range(-(-int(n) // c)) for n, c in zip(array.shape, sizes, strict=True)]
        for index in itertools.product(*grid):
            box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, sizes, strict=True))
            try:
                array[box]
            except Exception as exc:  # a damaged chunk: reported, the next chunk is read
                key = f"{tag}/{array.metadata.encode_chunk_key(index)}"
                yield tag, f"{key} ({type(exc).__name__}: {exc})"
