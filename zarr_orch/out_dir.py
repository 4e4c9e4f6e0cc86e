"""The run's output directory: checked and claimed (run log, lease) before any task runs.

Temporary directories registered with add_to_clean are removed at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from zarr_orch.errors import ConfigurationError
from zarr_orch.runlog import RunLog
from zarr_orch.secrets import mask_secrets
from zarr_orch.storage.core.lease import Lease
from zarr_orch.storage.core.location import Location

logger = logging.getLogger(__name__)


def check_out_dir(location: Location) -> None:
    """Create a local out_dir and make sure it is a writable directory; probe a remote one.

    A remote out_dir gets a write+delete probe, so a missing bucket, denied access or an
    unreachable endpoint fails here, with the URL in the message, before any task runs.
    """
    if not location.is_local:
        location.check_writable()
        return
    if os.path.exists(location.url) and not os.path.isdir(location.url):
        raise ConfigurationError(f"out_dir {location.url} exists and is not a directory")
    try:
        os.makedirs(location.url, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create out_dir {location.url}: {exc.strerror}") from None
    if not os.access(location.url, os.W_OK | os.X_OK):
        raise ConfigurationError(f"out_dir {location.url} is not writable; choose another one")


def remove_dir(path: Any, storage_options: dict[str, Any]) -> None:
    """Remove a directory registered with add_to_clean; a failure is logged, never raised."""
    try:
        location = Location.parse(path, storage_options)
        if location.is_local:
            shutil.rmtree(location.url, ignore_errors=True)
        else:
            location.rm()
    except Exception as exc:  # cleanup must not mask the run's own outcome
        logger.warning("could not remove %s: %s", path, exc)


def claim_out_dir(
    location: Location, run_id: str, conf: dict[str, Any], launch_worker: bool
) -> tuple[RunLog | None, Lease | None]:
    """Open the run log and take the out_dir lease (when computing); neither otherwise.

    A refused lease leaves nothing attached (the run log is closed again). The lease's
    heartbeat thread is started by the caller (`Lease.start_heartbeat`) once its cluster
    is up: multiprocessing workers are forked while the process has no other thread.
    """
    if not launch_worker:
        return None, None
    runlog = RunLog(location, run_id)
    runlog.header(run_id, mask_secrets(conf))
    lease: Lease | None = None
    try:
        lease = Lease(location, run_id, stale_after=conf["lease_timeout"])
        lease.acquire(heartbeat=False)
    except BaseException:
        release_out_dir(runlog, lease)
        raise
    return runlog, lease


def release_out_dir(runlog: RunLog | None, lease: Lease | None, held_only: bool = True) -> None:
    """Release the lease (only if held, unless `held_only` is false) and close the run log."""
    if lease is not None and (lease.held or not held_only):
        lease.release()
    if runlog is not None:
        runlog.close()
