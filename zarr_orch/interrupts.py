"""Ctrl-C and SIGTERM during a breakpoint: stop cleanly, then honour the signal.

The first signal only sets a flag: the breakpoint stops consuming results, workers are
stopped (whole-chunk writes plus record-after-data mean an abandoned write never leaves a
record without its data), one line says how far the run got, and a KeyboardInterrupt is raised.
A second signal stops at once. Handlers are installed only in the main thread and restored
afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


def interrupted(message: str, signum: int) -> KeyboardInterrupt:
    """A KeyboardInterrupt saying why the breakpoint stopped, carrying the signal number.

    A plain KeyboardInterrupt (not a subclass): CPython only exits "by SIGINT" (status 130
    in shells) for an uncaught exception of exactly that type.
    """
    exc = KeyboardInterrupt(message)
    exc.signum = signum  # type: ignore[attr-defined]
    return exc


def interrupt_message(signum: int, summary: Any, unrecorded: int = 0) -> str:
    """The one line saying how far an interrupted breakpoint got, in numbers that add up.

    `summary` is the breakpoint's `StageSummary`: computed + failed + left = its total, and a
    rerun reports the computed (and recorded) tiles plus those resumed now as resumed.
    """
    recorded = summary.done - unrecorded
    left = summary.total - recorded - summary.failed
    earlier = f" ({summary.resumed} more were done by an earlier run)" if summary.resumed else ""
    failed = f", {summary.failed} failed" if summary.failed else ""
    return (
        f"interrupted by {signal.Signals(signum).name}: {recorded}/{summary.total} tiles of "
        f"{summary.name} computed and recorded{earlier}{failed}; {left} left to compute. "
        f"Run the same command again to resume: it skips the {recorded + summary.resumed} "
        "done tiles of this breakpoint"
    )


def signal_of(exc: BaseException | None) -> int | None:
    """The signal that caused an `interrupted` exception, else None."""
    return getattr(exc, "signum", None) if isinstance(exc, KeyboardInterrupt) else None


class InterruptGuard:
    """Context manager turning SIGINT/SIGTERM into a flag for the duration of a breakpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise interrupted(f"stopped at once by a second {signal.Signals(signum).name}", signum)
        self.signum = signum
        logger.warning(
            "%s received: finishing the tiles in flight, then stopping (press Ctrl-C again to "
            "stop at once)",
            signal.Signals(signum).name,
        )

    @property
    def triggered(self) -> bool:
        """True once a signal arrived."""
        return self.signum is not None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                # not allowed in some embedded interpreters: then Ctrl-C keeps its default
                with contextlib.suppress(ValueError, OSError):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def terminate_self() -> None:
    """After a clean stop on SIGTERM, die of SIGTERM as the sender asked (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
