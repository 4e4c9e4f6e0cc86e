"""Whole-chunk writes without zarr's per-call machinery, byte-identical to what zarr stores.

A tile is exactly one chunk, so writing it needs no read-modify-write, no indexing and no
hop through zarr's event loop: encode the chunk with the array's own codec chain and store
it as one object (a temp file + rename on local disk, one PUT elsewhere). On this class of
machine zarr's ``array[region] = tile`` costs 3-4 ms per chunk of fixed overhead; this path
costs the encoding and the file write. Only codec chains whose encoding we reproduce exactly
(bytes + optional zstd + optional crc32c) take it; any other chain, order or key encoding
falls back to zarr. ``tests/test_chunk_writer.py`` checks the bytes against zarr's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from zarr_orch.errors import StorageError
from zarr_orch.storage.core.atomic_files import atomic_write
from zarr_orch.storage.core.handles import store_handle
from zarr_orch.storage.core.location import Location
from zarr_orch.storage.core.zarr_io import delete_key, set_bytes

logger = logging.getLogger(__name__)


def remove_file(path: str) -> None:
    """Delete a local file; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class ChunkWriter:
    """Stores whole chunks of one zarr array, encoded exactly as zarr would encode them."""

    def __init__(
        self,
        location: Location,
        array_path: str,
        array: Any,
        compress: Callable[[Any], bytes] | None,
        crc32c: bool,
    ) -> None:
        self.location = location
        self.array_path = array_path
        self.metadata = array.metadata
        self.compress = compress
        self.crc32c = crc32c
        self.dtype = np.dtype(array.dtype)
        self.chunk_shape = tuple(int(n) for n in self.metadata.chunk_grid.chunk_shape)
        self.fill = np.asarray(self.metadata.fill_value, dtype=self.dtype)
        self.fill_is_nan = self.dtype.kind == "f" and bool(np.isnan(self.fill))

    @classmethod
    def for_array(cls, location: Location, array_path: str, array: Any) -> ChunkWriter | None:
        """A writer for `array`, or None when its layout needs zarr's general write path."""
        try:
            metadata = array.metadata
            if getattr(metadata, "zarr_format", None) != 3:
                return None
            chain = _chain(metadata.codecs)
            if chain is None or not hasattr(metadata.chunk_grid, "chunk_shape"):
                return None
            config = array.config
            if getattr(config, "order", "C") != "C" or getattr(config, "write_empty_chunks", 1):
                return None
            return cls(location, array_path, array, *chain)
        except Exception as exc:  # an unknown codec or metadata layout: zarr writes the chunk
            logger.debug("chunks of %s go through zarr: %s", array_path, exc)
            return None

    def key(self, chunk_coords: tuple[int, ...]) -> str:
        """The chunk's store key relative to the product group."""
        return f"{self.array_path}/{self.metadata.encode_chunk_key(chunk_coords)}"

    def write(self, chunk_coords: tuple[int, ...], data: np.ndarray) -> None:
        """Store `data` (the chunk's values, short only at the array's far edges) as one chunk.

        As zarr does with ``write_empty_chunks=False``: an edge chunk is padded with the fill
        value, and a chunk that is all fill value is not stored (and a stale one is removed).
        """
        self.put(chunk_coords, self.encode(data))

    def encode(self, data: np.ndarray) -> bytes | None:
        """The stored bytes of a chunk holding `data` (None: all fill value, not stored)."""
        if data.dtype != self.dtype or data.ndim != len(self.chunk_shape):
            raise TypeError(
                f"chunk {data.dtype} {data.shape} does not fit the array's {self.dtype} "
                f"{self.chunk_shape} chunks"
            )
        if self._all_fill(data):
            return None
        if data.shape != self.chunk_shape:
            full = np.full(self.chunk_shape, self.fill, dtype=self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        raw = np.ascontiguousarray(data)
        if raw.dtype.byteorder == ">":  # the bytes codec stores little-endian values
            raw = raw.astype(raw.dtype.newbyteorder("<"))
        payload: Any = raw.reshape(-1).view("B")
        if self.compress is not None:
            payload = self.compress(payload)
        payload = bytes(payload)
        if self.crc32c:
            import google_crc32c

            payload += int(google_crc32c.value(payload)).to_bytes(4, "little")
        return payload

    def decode(self, raw: bytes | None) -> np.ndarray:
        """A whole chunk's values from its stored bytes (`encode`'s inverse; the fill value
        when the chunk is absent): a fresh, writable array."""
        if raw is None:
            return np.full(self.chunk_shape, self.fill, dtype=self.dtype)
        payload = raw
        if self.crc32c:
            import google_crc32c

            payload, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
            if int(google_crc32c.value(payload)) != stored:
                raise StorageError(
                    f"a chunk of {self.location.url}/{self.array_path} fails its CRC32C "
                    "check: the product is damaged (zarr-orch verify lists it); rebuild it "
                    "with resume: false"
                )
        if self.compress is not None:
            from numcodecs.zstd import Zstd

            payload = Zstd().decode(payload)
        values = np.frombuffer(payload, dtype=self.dtype.newbyteorder("<"))
        return values.astype(self.dtype).reshape(self.chunk_shape)

    def put(self, chunk_coords: tuple[int, ...], payload: bytes | None) -> None:
        """Store encoded chunk bytes (`encode`), or remove the chunk for None."""
        if payload is None:
            self._delete(self.key(chunk_coords))
        else:
            self._store(self.key(chunk_coords), [payload])

    def _all_fill(self, data: np.ndarray) -> bool:
        if self.fill_is_nan:
            return bool(np.isnan(data).all())
        return bool((data == self.fill).all())

    def _store(self, key: str, parts: list[Any]) -> None:
        if self.location.is_local:
            atomic_write(os.path.join(self.location.url, *key.split("/")), *parts)
            return
        set_bytes(self._store_handle(), key, b"".join(parts))

    def _delete(self, key: str) -> None:
        if self.location.is_local:
            remove_file(os.path.join(self.location.url, *key.split("/")))
            return
        delete_key(self._store_handle(), key)

    def _store_handle(self) -> Any:
        return store_handle(self.location)


def _chain(codecs: Any) -> tuple[Callable[[Any], bytes] | None, bool] | None:
    """(compressor, crc32c) reproducing zarr's codec chain, None when it is not covered.

    Covered: ``bytes`` (little-endian or single-byte) + optional ``zstd`` + optional
    ``crc32c``, the chains `compressors_for` builds for codec "none", "zstd" and "zstd-1".
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    codecs = list(codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if endian not in (None, "little"):
        return None
    rest = codecs[1:]
    crc = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    if crc:
        rest = rest[:-1]
    if not rest:
        return None, crc
    if len(rest) == 1 and isinstance(rest[0], ZstdCodec):
        from numcodecs.zstd import Zstd

        return Zstd(level=rest[0].level, checksum=rest[0].checksum).encode, crc
    return None
