"""Progress callbacks: what a breakpoint reports while it runs.

`Callback` is a small interface with no-op methods (stage begin/end, tile done, failed,
retried, resumed); the orchestrator calls every registered callback. Built-ins: a tqdm
progress bar on stderr (only when stderr is a terminal, or when asked for) and the
one-line-per-breakpoint log summary.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("zarr_orch.progress")


@dataclass
class StageSummary:
    """What one breakpoint did."""

    name: str
    total: int = 0
    done: int = 0
    resumed: int = 0
    failed: int = 0
    retried: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line summary logged at the end of a breakpoint."""
        mbs = self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.name}: {self.done}/{self.total} tiles computed, {self.resumed} resumed, "
            f"{self.failed} failed, {self.retried} retried; {self.nbytes / 1e6:.1f} MB in "
            f"{self.seconds:.2f} s ({mbs:.0f} MB/s)"
        )


class Callback:
    """Receives breakpoint events; override what you need (all methods are no-ops)."""

    def on_stage_start(self, name: str, total: int) -> None:
        """A breakpoint starts with `total` tiles to compute."""

    def on_tile_done(self, dataset: str, row: int, col: int, nbytes: int, seconds: float) -> None:
        """A tile was computed and written."""

    def on_tile_failed(self, dataset: str, row: int, col: int, error: str) -> None:
        """A tile failed for good (after its retries)."""

    def on_tile_retried(self, dataset: str, row: int, col: int, attempts: int) -> None:
        """A tile succeeded or failed after more than one attempt."""

    def on_tiles_resumed(self, count: int) -> None:
        """`count` tiles were found done by an earlier run and skipped."""

    def on_stage_end(self, summary: StageSummary) -> None:
        """The breakpoint finished (successfully or not)."""


class LogSummary(Callback):
    """Logs one INFO line per breakpoint (WARNING when tiles failed)."""

    def on_stage_end(self, summary: StageSummary) -> None:
        level = logging.WARNING if summary.failed else logging.INFO
        logger.log(level, summary.line())


class TqdmProgress(Callback):
    """A tqdm bar on stderr, one per breakpoint."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_stage_start(self, name: str, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=name, unit="tile", file=sys.stderr, leave=True)

    def on_tile_done(self, dataset: str, row: int, col: int, nbytes: int, seconds: float) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_tile_failed(self, dataset: str, row: int, col: int, error: str) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"failed: {dataset} ({row}, {col})")

    def on_stage_end(self, summary: StageSummary) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def default_callbacks(progress: bool | str) -> list[Callback]:
    """The log summary, plus a bar when `progress` is true or "auto" on a terminal."""
    callbacks: list[Callback] = [LogSummary()]
    show = progress is True or (progress == "auto" and sys.stderr.isatty())
    if show:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            logger.info("tqdm is not installed: no progress bar")
        else:
            callbacks.append(TqdmProgress())
    return callbacks
