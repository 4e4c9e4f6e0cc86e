"""Scattered objects: pickled once to a scratch file by the main process, loaded once per worker.

A `ScatterHandle` turns back into its object when unpickled, wherever it sits in a task's
arguments; worker processes keep what they loaded in a per-process cache.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

_CACHING = False
_SCATTER_CACHE: dict[str, Any] = {}


def cache_scattered_objects() -> None:
    """Keep every scattered object this process loads (called once in each worker process)."""
    global _CACHING
    _CACHING = True


def load_scattered(path: str, key: str) -> Any:
    """Unpickle a scattered object (once per worker process, then from the cache)."""
    if key in _SCATTER_CACHE:
        return _SCATTER_CACHE[key]
    with open(path, "rb") as file:
        obj = pickle.load(file)
    if _CACHING:
        _SCATTER_CACHE[key] = obj
    return obj


class ScatterHandle:
    """A small stand-in for a scattered object; it turns back into the object when unpickled.

    Because the resolution happens at unpickling time, the handle works wherever it is nested
    in a task's arguments (even inside user objects), and each worker loads it only once.
    """

    __slots__ = ("key", "path", "type_name")

    def __init__(self, path: str, key: str, type_name: str) -> None:
        self.path = path
        self.key = key
        self.type_name = type_name

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (load_scattered, (self.path, self.key))

    def __copy__(self) -> ScatterHandle:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ScatterHandle:
        return self

    def __repr__(self) -> str:
        return f"ScatterHandle({self.type_name}, key={self.key})"
