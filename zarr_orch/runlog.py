"""The per-run log file: run id, versions, conf (secrets masked), per-tile failures.

Local out_dirs get ``out_dir/logs/run-<run_id>.log`` (rotating); for object stores the log
is written to a local temporary file and copied to ``out_dir/logs/`` at every breakpoint
and at exit, since objects cannot be appended to.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import platform
import shutil
import sys
import tempfile
from typing import Any

from zarr_orch.storage.core.location import Location

logger = logging.getLogger(__name__)

LOG_DIR = "logs"
FORMAT = "%(asctime)s %(levelname)s [%(processName)s %(process)d] %(name)s: %(message)s"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a product."""
    import dask
    import numcodecs
    import numpy
    import xarray
    import zarr

    from zarr_orch import __version__

    return {
        "zarr_orch": __version__,
        "python": platform.python_version(),
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": numpy.__version__,
        "xarray": xarray.__version__,
        "dask": dask.__version__,
    }


class _QuietFileHandler(logging.handlers.RotatingFileHandler):
    """A full or vanished disk must neither flood stderr nor replace the run's own error."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging API)
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"zarr_orch: cannot write the run log {self.baseFilename} any more\n")

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.failed = True


class _Forward(logging.Handler):
    """Passes records on to the root logger's handlers at the level the application chose."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.threshold:
            logging.getLogger().handle(record)


class RunLog:
    """Attaches a file handler to the ``zarr_orch`` logger for the lifetime of one run."""

    def __init__(self, out_dir: Location, run_id: str, level: int = logging.INFO) -> None:
        self.out_dir = out_dir
        self.name = f"run-{run_id}.log"
        self.target = out_dir.join(LOG_DIR, self.name)
        if out_dir.is_local:
            os.makedirs(os.path.join(out_dir.url, LOG_DIR), exist_ok=True)
            self.path = self.target.url
            self._tmp_dir = None
        else:
            self._tmp_dir = tempfile.mkdtemp(prefix="zarr_orch_log_")
            self.path = os.path.join(self._tmp_dir, self.name)
        self.handler = _QuietFileHandler(
            self.path, maxBytes=20 * 2**20, backupCount=3, encoding="utf-8"
        )
        self.handler.setLevel(level)
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self._logger = logging.getLogger("zarr_orch")
        self._logger.addHandler(self.handler)
        # with our file handler attached, Python's last-resort stderr handler no longer
        # fires: keep warnings visible on stderr when the application configured nothing
        self._console: logging.Handler | None = None
        if not logging.getLogger().handlers:
            self._console = logging.StreamHandler(sys.stderr)
            self._console.setLevel(logging.WARNING)
            self._console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            self._logger.addHandler(self._console)
        self._forward: logging.Handler | None = None
        if self._logger.level == logging.NOTSET or self._logger.level > level:
            # the file wants INFO records; the application's own handlers must still only see
            # what it asked for, so stop propagating and forward at its threshold instead
            threshold = self._logger.getEffectiveLevel()
            self._previous_level = self._logger.level
            self._logger.setLevel(level)
            if logging.getLogger().handlers:
                self._forward = _Forward(threshold)
                self._logger.addHandler(self._forward)
                self._logger.propagate = False
        else:
            self._previous_level = None

    @property
    def url(self) -> str:
        """Where the log ends up (in out_dir)."""
        return self.target.url

    def header(self, run_id: str, conf: dict[str, Any]) -> None:
        """First lines: what ran, with which versions and conf (already masked)."""
        logger.info("run %s on %s (pid %d)", run_id, platform.node(), os.getpid())
        logger.info("versions: %s", versions())
        logger.info("conf: %s", conf)
        logger.info("out_dir: %s", self.out_dir.url)

    def sync(self) -> None:
        """Copy the local log to an object-store out_dir (no-op for local out_dirs)."""
        self.handler.flush()
        if self._tmp_dir is None:
            return
        try:
            with open(self.path, encoding="utf-8") as handle:
                self.target.write_text(handle.read())
        except Exception as exc:  # the log is a convenience; never fail a run for it
            logger.debug("could not copy the run log to %s: %s", self.target, exc)

    def close(self) -> None:
        """Detach the handler, upload a remote copy, remove the local temporary file."""
        self.sync()
        self._logger.removeHandler(self.handler)
        with contextlib.suppress(OSError):  # a full disk must not hide the run's outcome
            self.handler.close()
        if self._console is not None:
            self._logger.removeHandler(self._console)
        if self._forward is not None:
            self._logger.removeHandler(self._forward)
            self._logger.propagate = True
        if self._previous_level is not None:
            self._logger.setLevel(self._previous_level)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
