"""Small synchronous helpers over zarr's async store API (listing, deleting keys)."""

from __future__ import annotations

from typing import Any

from zarr.core.sync import sync


async def _collect(aiterator: Any) -> list[str]:
    return [item async for item in aiterator]


def list_keys(store: Any, prefix: str) -> list[str]:
    """Every key under `prefix` (one listing; paginated by the store on object stores)."""
    try:
        return sync(_collect(store.list_prefix(prefix)))
    except FileNotFoundError:
        return []


def delete_key(store: Any, key: str) -> None:
    """Delete one key (missing is fine)."""
    sync(store.delete(key))


def set_bytes(store: Any, key: str, data: bytes) -> None:
    """Store raw bytes at `key` (one atomic object write)."""
    from zarr.core.buffer import default_buffer_prototype

    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def get_bytes(store: Any, key: str) -> bytes | None:
    """The raw bytes stored at `key`, or None."""
    from zarr.core.buffer import default_buffer_prototype

    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()
