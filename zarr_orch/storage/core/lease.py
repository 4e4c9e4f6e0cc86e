"""One run at a time per out_dir: a lease object with host, pid, start time and heartbeat.

A second run on the same out_dir is refused, naming the holder. A lease left behind by a
crashed run is taken over automatically: at once when its process is visibly gone on this
host, after `stale_after` seconds without heartbeat otherwise (another host, or a process
we cannot see). Works on any fsspec location (object stores have no file locks).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

import psutil

from zarr_orch.errors import ZarrOrchError
from zarr_orch.storage.core.location import Location

logger = logging.getLogger(__name__)

LEASE_NAME = ".zarr_orch.lease.json"
#: leases held by live Lease objects of this process (run_id -> Lease)
_ACTIVE: weakref.WeakValueDictionary[str, Lease] = weakref.WeakValueDictionary()


class LeaseError(ZarrOrchError, RuntimeError):
    """Another live run holds the out_dir."""


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


class Lease:
    """The lease of one orchestrator run on one out_dir."""

    def __init__(
        self,
        out_dir: Location,
        run_id: str,
        heartbeat: float = 10.0,
        stale_after: float = 60.0,
    ) -> None:
        self.location = out_dir.join(LEASE_NAME)
        self.run_id = run_id
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _content(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "host": self.host,
            "pid": self.pid,
            "pid_started": _process_start(self.pid),
            "started": self.started,
            "heartbeat": time.time(),
        }

    def read(self) -> dict[str, Any] | None:
        """The current lease content, None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.location.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            logger.warning("ignoring unreadable lease %s: %s", self.location, exc)
            return None

    def _holder_alive(self, holder: dict[str, Any]) -> tuple[bool, str]:
        """(alive, why) for an existing lease."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == self.host:
            pid = int(holder.get("pid", -1))
            if pid == self.pid:
                if holder.get("run_id") in _ACTIVE:
                    return True, "held by another orchestrator of this process"
                return False, "left by an orchestrator of this process that was not closed"
            started = _process_start(pid)
            recorded = holder.get("pid_started")
            if started is None:
                return False, f"process {pid} is gone"
            if recorded is not None and abs(started - float(recorded)) > 1.0:
                return False, f"process {pid} is gone (its pid was reused)"
            return True, f"process {pid} is running"
        if self.stale_after is not None and age > self.stale_after:
            return False, f"no heartbeat for {age:.0f} s"
        return True, f"heartbeat {age:.0f} s ago"

    def acquire(self, heartbeat: bool = True) -> None:
        """Take the lease or raise LeaseError naming the live holder; `heartbeat` false
        leaves starting the heartbeat thread to the caller (`start_heartbeat`)."""
        holder = self.read()
        if holder is not None and holder.get("run_id") != self.run_id:
            alive, why = self._holder_alive(holder)
            if alive:
                started = time.localtime(holder.get("started", 0))
                raise LeaseError(
                    f"{self.location.parent.url} is in use by run {holder.get('run_id')} "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', started)}; {why}). Wait for it to "
                    "finish, stop it, or use another out_dir"
                )
            logger.warning(
                "taking over the lease of run %s on %s: %s",
                holder.get("run_id"),
                self.location.parent.url,
                why,
            )
        self.location.write_text(json.dumps(self._content()))
        check = self.read()
        if check is None or check.get("run_id") != self.run_id:
            raise LeaseError(
                f"another run took {self.location.parent.url} at the same moment "
                f"(run {check.get('run_id') if check else '?'}); use another out_dir"
            )
        self.held = True
        _ACTIVE[self.run_id] = self
        if heartbeat:
            self.start_heartbeat()

    def start_heartbeat(self) -> None:
        """Renew the lease every `heartbeat` seconds in a daemon thread (once)."""
        if self._thread is None and self.held:
            self._thread = threading.Thread(target=self._beat, name="zarr_orch-lease", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.location.write_text(json.dumps(self._content()))
            except Exception as exc:  # a missed heartbeat is not fatal; the next one retries
                logger.warning("lease heartbeat on %s failed: %s", self.location, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _ACTIVE.pop(self.run_id, None)
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder is not None and holder.get("run_id") == self.run_id:
            try:
                self.location.rm()
            except Exception as exc:  # leaving a lease behind is harmless: it is taken over
                logger.warning("could not remove lease %s: %s", self.location, exc)
