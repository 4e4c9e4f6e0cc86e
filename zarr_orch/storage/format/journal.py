"""Undo journal of windowed merges: a merge killed half-way is rolled back at start-up.

A windowed tile (`window_writer`) read-modify-writes the chunks its window spans and its
completion record block; a commit (`merge_batch`) stores the merges of one or more tiles.
Merging is not idempotent (a tile merged twice counts twice), so before changing anything
the single writer stores the previous bytes of every key the commit changes, all in one
object (``_zarr_orch/journal/undo.bin``), then a manifest naming each key with its offset
and length in it, and the commit's tiles (``_zarr_orch/journal/merge.json``, one atomic
write: its presence means "a merge may be half-applied"). It then writes the chunks and
the tiles' records, then deletes the manifest (the commit) and the undo object. At
start-up `recover` puts every journaled key back as it was (absent keys are deleted) and
removes the manifest, so the product is exactly as after the previous commit, and the
commit's tiles are merged again. Restoring is idempotent: a recovery killed itself is redone.
Manifests of older versions (one undo object per key) are still rolled back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from zarr_orch.errors import StorageError
from zarr_orch.storage.core.zarr_io import (
    delete_many,
    get_bytes,
    list_keys,
    local_root,
    set_many,
)

logger = logging.getLogger(__name__)

JOURNAL_PREFIX = "_zarr_orch/journal/"
MANIFEST = JOURNAL_PREFIX + "merge.json"
#: the previous bytes of every journaled key, concatenated (offsets in the manifest)
UNDO = JOURNAL_PREFIX + "undo.bin"


def _undo_key(index: int) -> str:
    return f"{JOURNAL_PREFIX}{index}.undo"


@dataclass
class MergeJournal:
    """The journal of one merge transaction, kept in one product's store (the first of the
    products a tile merges into); it may name keys of several products' stores."""

    store: Any

    def __post_init__(self) -> None:
        self._undo: list[str] = []

    def begin(
        self,
        tiles: tuple[int, int] | list[tuple[int, int]],
        entries: list[tuple[str, Any, str]],
        previous: list[bytes | None],
    ) -> None:
        """Save `previous`, the current bytes (None: absent) of every (product url, store,
        key) the merge of `tiles` (one tile, or a batch of them) will change, then the
        manifest naming them: two writes whatever the number of keys."""
        batch = [tiles] if isinstance(tiles, tuple) else list(tiles)
        manifest_entries = []
        parts: list[bytes] = []
        offset = 0
        for (url, _store, key), value in zip(entries, previous, strict=True):
            if value is None:
                manifest_entries.append([url, key, None])
                continue
            manifest_entries.append([url, key, [offset, len(value)]])
            parts.append(value)
            offset += len(value)
        if parts:  # stored before the manifest names it
            set_many(self.store, {UNDO: b"".join(parts)})
        manifest = {
            "tile": list(batch[0]),
            "tiles": [list(tile) for tile in batch],
            "entries": manifest_entries,
        }
        set_many(self.store, {MANIFEST: json.dumps(manifest, sort_keys=True).encode()})
        self._undo = [UNDO] if parts else []

    def commit(self, undo: list[str] | None = None) -> None:
        """The merge is fully applied: drop the manifest first, then the undo copies."""
        delete_many(self.store, [MANIFEST])
        delete_many(self.store, self._undo if undo is None else undo)
        self._undo = []
        root = local_root(self.store)
        if root is not None:  # no empty journal directory for zarr listings to trip on
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, JOURNAL_PREFIX))

    def recover(self, stores: dict[str, Any]) -> tuple[int, int] | None:
        """Roll back a merge left unfinished by a crash; returns its (first) tile, None if
        there was none.

        `stores` maps product URLs to their stores (the products of this run; the manifest
        never holds credentials). A manifest naming a product not among them is refused.
        """
        raw = get_bytes(self.store, MANIFEST)
        if raw is None:
            stray = list_keys(self.store, JOURNAL_PREFIX)
            if stray:  # undo copies of a merge that never began
                self.commit(stray)
            return None
        try:
            manifest = json.loads(raw)
        except ValueError:  # torn while being written: the merge had not changed anything
            self.commit(list_keys(self.store, JOURNAL_PREFIX))
            return None
        entries = manifest["entries"]
        unknown = sorted({url for url, _key, _undo in entries if url not in stores})
        if unknown:
            raise StorageError(
                f"an unfinished merge journaled in this product also changed {', '.join(unknown)}, "
                "which this run does not register: rerun the pipeline that was interrupted "
                "(same products) so it can be rolled back, or rerun with resume: false"
            )
        packed = any(isinstance(undo, list) for _url, _key, undo in entries)
        blob = get_bytes(self.store, UNDO) if packed else None
        for url, key, undo in entries:
            if undo is None:
                delete_many(stores[url], [key])
                continue
            if isinstance(undo, list):  # [offset, length] in the undo object
                start, length = int(undo[0]), int(undo[1])
                short = blob is None or len(blob) < start + length
                value = None if short else blob[start : start + length]
                source = UNDO
            else:  # an older version's one object per key
                value = get_bytes(self.store, undo)
                source = undo
            if value is None:  # undo copies are written before the manifest: tampering
                raise StorageError(
                    f"the merge journal names {source} (previous bytes of {key} in {url}) but "
                    "it is missing or short: the products cannot be rolled back; rerun with "
                    "resume: false to rebuild them"
                )
            set_many(stores[url], {key: value})
        tile = (int(manifest["tile"][0]), int(manifest["tile"][1]))
        tiles = manifest.get("tiles") or [tile]
        self.commit(
            [undo for _url, _key, undo in entries if isinstance(undo, str)]
            + ([UNDO] if packed else [])
        )
        logger.warning(
            "rolled back the unfinished merge of %d tile(s) from tile (%d, %d): %d key(s) "
            "restored; they are merged again",
            len(tiles),
            tile[0],
            tile[1],
            len(entries),
        )
        return tile
