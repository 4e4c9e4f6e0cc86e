"""Shared fixtures of the zarr_orch test suite.

`MODES` is the one list of execution modes the mode-parametrised tests run under; set
``ZARR_ORCH_TEST_MODES=sequential,multiprocessing`` to widen it without editing the tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # task modules (app_tasks, cars_app) importable everywhere
    sys.path.insert(0, str(TESTS_DIR))

pytest_plugins = ["s3_server"]  # the moto_server fixtures of the object-storage tests

MODES = [m for m in os.environ.get("ZARR_ORCH_TEST_MODES", "sequential").split(",") if m]


@pytest.fixture(scope="module", params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """The execution mode of a mode-parametrised test."""
    return request.param


@pytest.fixture
def conf(mode: str) -> dict:
    """An orchestrator conf for `mode`: no retries, no progress bar (fast, quiet tests)."""
    return {"mode": mode, "max_retries": 0, "progress": False}


@pytest.fixture
def seq_conf() -> dict:
    """A sequential-mode conf, for tests about the API rather than the execution mode."""
    return {"mode": "sequential", "max_retries": 0, "progress": False}


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A fresh output directory (not created yet: the orchestrator creates it)."""
    return tmp_path / "out"
