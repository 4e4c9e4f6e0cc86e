"""Sequential mode's write-behind: a tile's sink runs in one background thread while the
next tile computes in the caller's thread; outcomes still come back in order."""

from __future__ import annotations

import threading
import time
from typing import Any

from zarr_orch.cluster.sequential import SequentialCluster

CONF = {"mode": "sequential", "max_retries": 1}


def test_sinks_overlap_the_next_tile_and_outcomes_stay_in_order():
    cluster = SequentialCluster(dict(CONF), None)
    computed = [threading.Event() for _ in range(4)]
    log: list[tuple[str, int, str]] = []

    def tile(i: int) -> int:
        log.append(("tile", i, threading.current_thread().name))
        computed[i].set()
        return i * 10

    def sink(value: int) -> dict[str, Any]:
        i = value // 10
        log.append(("sink", i, threading.current_thread().name))
        # the next tile computes while this write is in progress (no wait for the last one)
        overlapped = i == 3 or computed[i + 1].wait(timeout=10)
        return {"tile": i, "overlapped": overlapped}

    task = cluster.create_task(tile)
    futures = cluster.start_tasks([cluster.attach_sink(task(i), sink) for i in range(4)])
    outcomes = list(cluster.outcome_iterator(futures))
    assert [o.value["tile"] for o in outcomes] == [0, 1, 2, 3]
    assert all(o.value["overlapped"] for o in outcomes)
    assert {name for kind, _, name in log if kind == "tile"} == {"MainThread"}
    assert {name for kind, _, name in log if kind == "sink"} == {"zarr_orch-sink_0"}


def test_a_failing_sink_is_retried_and_reported_without_stopping_the_others():
    cluster = SequentialCluster(dict(CONF), None)
    calls: dict[int, int] = {}

    def tile(i: int) -> int:
        return i

    def sink(i: int) -> int:
        calls[i] = calls.get(i, 0) + 1
        if i == 1:
            raise OSError(28, "No space left on device")
        return i

    task = cluster.create_task(tile)
    futures = cluster.start_tasks([cluster.attach_sink(task(i), sink) for i in range(3)])
    outcomes = list(cluster.outcome_iterator(futures))
    assert [o.value for o in outcomes] == [0, None, 2]
    assert outcomes[1].error is not None and "No space left" in str(outcomes[1].error)
    assert outcomes[1].attempts == 2 and calls == {0: 1, 1: 2, 2: 1}


def test_stopping_early_waits_for_the_write_in_progress():
    cluster = SequentialCluster(dict(CONF), None)
    finished: list[int] = []

    def tile(i: int) -> int:
        return i

    def sink(i: int) -> int:
        finished.append(i)
        return i

    task = cluster.create_task(tile)
    futures = cluster.start_tasks([cluster.attach_sink(task(i), sink) for i in range(5)])
    iterator = cluster.outcome_iterator(futures)
    assert next(iterator).value == 0  # tile 1's write is now queued or in flight
    iterator.close()  # e.g. Ctrl-C in the consumer
    # the write in flight (if it had started) ended; nothing else starts afterwards
    assert finished in ([0], [0, 1])
    assert not [t for t in threading.enumerate() if t.name.startswith("zarr_orch-sink")]
    done = list(finished)
    time.sleep(0.2)
    assert finished == done
