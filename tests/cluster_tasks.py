"""Task functions for tests/test_cluster_parallel.py.

They live at module level in an importable module so that forkserver/spawn workers and dask
workers can import them by name.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np


def inc(x: int) -> int:
    """x + 1."""
    return x + 1


def add(a: int, b: int) -> int:
    """a + b."""
    return a + b


def pair(x: int) -> tuple[int, int]:
    """Two outputs: x and 2x."""
    return x, 2 * x


def combine(data: dict[str, Any], scale: int = 1) -> int:
    """Sum of nested values (inputs nested in dicts, lists and tuples)."""
    return scale * (sum(data["xs"]) + sum(data["first"]))


def pid_value(x: Any) -> tuple[int, Any]:
    """The value with the PID of the process that computed it."""
    return os.getpid(), x


class PidCheckSink:
    """A sink: says whether it runs in the process that computed its input."""

    def __call__(self, tile: tuple[int, Any]) -> dict[str, Any]:
        pid, value = tile
        return {"same_pid": pid == os.getpid(), "value": value, "sink_pid": os.getpid()}


def use_scattered(obj: dict[str, Any], i: int) -> float:
    """Use a scattered object (the real object, not a handle)."""
    return float(obj["array"].sum()) + i


def fail_once(marker: str, x: int) -> int:
    """Fail on the first attempt only (a marker file remembers it)."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("transient failure on first attempt")
    return x


def always_fail(x: int) -> int:
    """Always raise, with a recognisable message."""
    raise ValueError(f"boom {x}")


def hang(seconds: float) -> float:
    """Sleep for a long time (a hung task)."""
    time.sleep(seconds)
    return seconds


def kill_once(marker: str, x: int) -> int:
    """SIGKILL our own process on the first attempt only."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    return x


def allocate(megabytes: int, hold: float) -> int:
    """Touch `megabytes` of memory and keep it for `hold` seconds."""
    block = np.ones(megabytes * 2**20, dtype=np.uint8)
    time.sleep(hold)
    return int(block[-1])


def big_bytes(megabytes: int) -> bytes:
    """A large result."""
    return b"x" * (megabytes * 2**20)


def length(data: bytes) -> int:
    """Length of a (large) input."""
    return len(data)


def noop(i: int) -> int:
    """Return the argument (for overhead measurements)."""
    return i


def pid_pair(x: Any) -> tuple[tuple[int, Any], tuple[int, Any]]:
    """Two outputs, each tagged with the PID of the process that computed them."""
    return (os.getpid(), x), (os.getpid(), 2 * x)


def unwrap(tile: tuple[int, Any]) -> Any:
    """The value of a PID-tagged tile (a downstream consumer of a sinked tile)."""
    return tile[1]
