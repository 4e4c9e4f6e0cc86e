"""Keeps `distributed`'s chatter off the console while a dask cluster of ours is open.

distributed logs a dozen INFO lines when a LocalCluster starts and stops (scheduler,
nannies, client connections), either through its own stderr handler or, when the
application configured logging first, through the root logger's. While at least one of our
clusters is open, records of the ``distributed`` logger are handed to the ``zarr_orch``
logger instead (record names unchanged), so the run log keeps them all and the console
shows what zarr_orch shows: warnings and errors, unless the application asked zarr_orch for
more. The previous handlers and propagation are restored when the last cluster closes.
"""

from __future__ import annotations

import logging
import threading

_LOGGER = "distributed"
_lock = threading.Lock()
_users = 0
_saved: tuple[bool, list[logging.Handler]] | None = None


class _ToZarrOrch(logging.Handler):
    """Passes distributed's records to the handlers of the ``zarr_orch`` logger."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("zarr_orch.distributed").handle(record)


_relay = _ToZarrOrch()


def capture() -> None:
    """Route distributed's records to zarr_orch's logging (reference counted)."""
    global _users, _saved
    with _lock:
        _users += 1
        if _users > 1:
            return
        import distributed  # noqa: F401 (it installs its own handler when first imported)

        target = logging.getLogger(_LOGGER)
        _saved = (target.propagate, list(target.handlers))
        for handler in _saved[1]:
            if type(handler) is logging.StreamHandler:  # its stderr handler, not user files
                target.removeHandler(handler)
        target.addHandler(_relay)
        target.propagate = False


def release() -> None:
    """Undo `capture` once the last cluster using it is closed."""
    global _users, _saved
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users or _saved is None:
            return
        target = logging.getLogger(_LOGGER)
        target.removeHandler(_relay)
        propagate, handlers = _saved
        for handler in handlers:
            if handler not in target.handlers:
                target.addHandler(handler)
        target.propagate = propagate
        _saved = None
