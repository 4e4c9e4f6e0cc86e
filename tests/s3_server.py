"""Pytest plugin: a local S3 server (moto_server) on 127.0.0.1 for object-storage tests.

Loaded with ``pytest_plugins = ["s3_server"]``. The server is a subprocess on a free
loopback port, started once per test module (moto keeps every object in memory, so a
fresh server per module bounds its RSS) and stopped by its PID. Tests always pass
explicit credentials and the endpoint, and ``AWS_EC2_METADATA_DISABLED=true`` is set while
the server runs, so botocore never probes an address outside this machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
TEST_KEY = "AKIAZARRORCHTESTKEY01"
TEST_SECRET = "zarr-orch-test-secret-5f3a9c1e7b"
#: env for the whole S3 test module: no metadata probing, no credentials from the machine
SAFE_ENV = {"AWS_EC2_METADATA_DISABLED": "true"}
CLEARED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def moto_server_path() -> str | None:
    """The moto_server console script of this interpreter's environment, if installed."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    return shutil.which("moto_server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """One moto_server subprocess on 127.0.0.1:port (start, stop by PID, restart)."""

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.executable = moto_server_path()
        if self.executable is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        self.port = port or free_port()
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint URL for s3fs/botocore."""
        return f"http://{HOST}:{self.port}"

    def options(self, key: str = TEST_KEY, secret: str = TEST_SECRET) -> dict[str, Any]:
        """storage_options for this server with explicit credentials."""
        return {"endpoint_url": self.endpoint, "key": key, "secret": secret}

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it answers HTTP."""
        env = {**os.environ, **SAFE_ENV, **self.env}
        self.process = subprocess.Popen(
            [self.executable, "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self.process.returncode}")
            try:
                with opener.open(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} in {timeout} s")

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL) and wait for it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def restart(self, delay: float = 0.0, buckets: tuple[str, ...] = ()) -> None:
        """Stop, wait `delay` s, start again on the same port and recreate `buckets`."""
        self.stop()
        time.sleep(delay)
        self.start()
        for bucket in buckets:
            self.make_bucket(bucket)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        import s3fs

        name = name or f"zo-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options())
        fs.mkdir(name)
        return name


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    """A moto_server for the module, with a safe AWS environment while it runs."""
    pytest.importorskip("s3fs")
    if moto_server_path() is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SAFE_ENV.items():
            patch.setenv(name, value)
        for name in CLEARED_ENV:
            patch.delenv(name, raising=False)
        server = MotoServer()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_options(moto_server: MotoServer) -> dict[str, Any]:
    """storage_options (endpoint + explicit test credentials) of the module's server."""
    return moto_server.options()


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    """A new, empty bucket on the module's server."""
    return moto_server.make_bucket()
