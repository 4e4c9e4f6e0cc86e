"""The worker process: its main loop, and the job payload and reply it exchanges with the main
process (steps in, outputs wanted back and step errors out, all pickled)."""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import sys
import threading
import types
from typing import Any

import psutil

from zarr_orch.cluster.base import TaskError
from zarr_orch.cluster.graph import split_outputs
from zarr_orch.cluster.multiprocessing.scatter import cache_scattered_objects

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: the first message of a worker: imports done, ready to run tasks (timeouts start then)
READY = b""


class Ref:
    """In a job payload: the output of an earlier step of the same job."""

    __slots__ = ("index", "uid")

    def __init__(self, uid: int, index: int | None) -> None:
        self.uid = uid
        self.index = index

    def __reduce__(self) -> tuple[type[Ref], tuple[int, int | None]]:
        return (Ref, (self.uid, self.index))


def _resolve_refs(obj: Any, values: dict[int, list[Any]]) -> Any:
    if isinstance(obj, Ref):
        outputs = values[obj.uid]
        return outputs[0] if obj.index is None else outputs[obj.index]
    if isinstance(obj, list):
        return [_resolve_refs(item, values) for item in obj]
    if isinstance(obj, tuple):
        items = [_resolve_refs(item, values) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, set | frozenset):
        return type(obj)(_resolve_refs(item, values) for item in obj)
    if isinstance(obj, dict):
        return {key: _resolve_refs(value, values) for key, value in obj.items()}
    return obj


def task_error(exc: BaseException) -> TaskError:
    """A TaskError that is sure to pickle (the exception object is dropped if it cannot)."""
    error = TaskError.from_exception(exc)
    try:
        pickle.loads(pickle.dumps(exc, protocol=PICKLE_PROTOCOL))
    except Exception:
        error.exception = None
    return error


def _run_job(data: bytes) -> tuple[Any, dict[int, list[Any]], dict[Any, tuple[str, Any]], dict]:
    """Run one job payload: (job id, outputs wanted back, step errors, step names)."""
    try:
        job_id, steps, wanted = pickle.loads(data)
    except BaseException as exc:  # e.g. a task function the worker cannot import
        error = task_error(exc)
        error.message = (
            f"the worker process could not load the task ({type(exc).__name__}: {exc}); task "
            "functions and arguments must be importable by name in a fresh process"
        )
        return None, {}, {None: ("error", error)}, {}
    del data
    names = {step[0]: step[1] for step in steps}
    values: dict[int, list[Any]] = {}
    errors: dict[Any, tuple[str, Any]] = {}
    while steps:
        uid, name, func, args, kwargs, nout, in_job_deps = steps.pop(0)
        failed = next((dep for dep in in_job_deps if dep not in values), None)
        if failed is not None:
            errors[uid] = ("upstream", failed)
            continue
        result = None
        try:
            if in_job_deps:
                args = _resolve_refs(args, values)
                kwargs = _resolve_refs(kwargs, values)
            result = func(*args, **kwargs)
            values[uid] = split_outputs(types.SimpleNamespace(name=name, nout=nout), result)
        except BaseException as exc:  # a task's own failure must never kill the worker
            errors[uid] = ("error", task_error(exc))
        del args, kwargs, result
    outputs = {uid: values[uid] for uid in wanted if uid in values}
    return job_id, outputs, errors, names


def _dump_reply(job_id: Any, outputs: dict, errors: dict, names: dict, rss: int) -> bytes:
    """Pickle a reply; outputs that cannot be pickled become errors of their task."""
    try:
        return pickle.dumps((job_id, outputs, errors, rss), PICKLE_PROTOCOL)
    except Exception as exc:
        for uid, value in outputs.items():
            try:
                pickle.dumps(value, PICKLE_PROTOCOL)
            except Exception as item_exc:
                err = task_error(item_exc)
                err.message = f"the result of task {names.get(uid)!r} cannot be pickled: {item_exc}"
                errors[uid] = ("error", err)
        if not any(kind == "error" for kind, _ in errors.values()):
            errors[None] = ("error", task_error(exc))
        return pickle.dumps((job_id, {}, errors, rss), PICKLE_PROTOCOL)


def _keep_freed_memory() -> None:
    """Let this worker reuse the memory it frees instead of handing it back to the kernel.

    Tile tasks allocate and free the same large temporaries tile after tile; glibc returns
    them (mmap/trim) and every tile then pays page faults on fresh pages, which on VMs that
    reclaim guest memory costs a few ms per MB. Keeping them costs nothing extra: the worker's
    RSS stays at its peak tile, which max_ram_per_worker already bounds.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 31)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


def worker_main(
    task_conn: Any, result_conn: Any, sys_path: list[str], inherited: list[int] | None = None
) -> None:
    """Loop of a worker process: run jobs in arrival order until told to stop or orphaned.

    A reader thread drains the task pipe continuously, so the main process never blocks on a
    send while this process is itself blocked sending a large result (no pipe deadlock).
    `inherited` are the main process's pipe ends a forked worker holds: closed first, so
    the task pipe ends (EOF) when the main process is gone.
    """
    for fd in inherited or ():
        with contextlib.suppress(OSError):
            os.close(fd)
    cache_scattered_objects()
    _keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    for path in sys_path:
        if path not in sys.path:
            sys.path.append(path)
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read_tasks() -> None:
        try:
            while True:
                data = task_conn.recv_bytes()
                if not data:
                    break
                inbox.put(data)
        except (EOFError, OSError):
            pass
        inbox.put(None)

    threading.Thread(target=read_tasks, name="zarr-orch-task-reader", daemon=True).start()
    process = psutil.Process()
    try:
        result_conn.send_bytes(READY)
    except OSError:
        return
    while True:
        data = inbox.get()
        if data is None:
            break
        job_id, outputs, errors, names = _run_job(data)
        del data
        reply = _dump_reply(job_id, outputs, errors, names, process.memory_info().rss)
        del outputs
        try:
            result_conn.send_bytes(reply)
        except OSError:  # the main process is gone
            break
        del reply
