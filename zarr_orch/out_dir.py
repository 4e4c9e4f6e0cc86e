"""The run's output directory: checked and claimed (run log, lease) before any task runs.

Temporary directories registered with add_to_clean are removed at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

from zarr_orch.conf import mask_secrets
from zarr_orch.errors import ConfigurationError
from zarr_orch.runlog import RunLog
from zarr_orch.storage.lease import Lease
from zarr_orch.storage.location import Location

logger = logging.getLogger(__name__)

C = TypeVar("C")


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
    location: Location,
    run_id: str,
    conf: dict[str, Any],
    launch_worker: bool,
    start_cluster: Callable[[], C],
) -> tuple[RunLog | None, Lease | None, C]:
    """Open the run log, take the out_dir lease (when computing), then start the cluster.

    A refused lease or a cluster that cannot start leaves nothing attached.
    """
    runlog: RunLog | None = None
    lease: Lease | None = None
    if launch_worker:
        runlog = RunLog(location, run_id)
        runlog.header(run_id, mask_secrets(conf))
    try:
        if launch_worker:
            lease = Lease(location, run_id, stale_after=conf["lease_timeout"])
            lease.acquire()
        return runlog, lease, start_cluster()
    except BaseException:
        if lease is not None and lease.held:
            lease.release()
        if runlog is not None:
            runlog.close()
        raise
