"""Orchestrator configuration: validation and defaults (secret masking: `zarr_orch.secrets`).

The conf is a plain dict, as in CARS. Common keys are checked here, mode keys by the
cluster class of the chosen mode (`CONF_OPTIONS`); CARS 1.3 keys without an effect here
(`CARS_KEYS`) are accepted with one logged line. Unknown keys and bad values are refused
with a message that says what to change; `get_conf()` returns the fully defaulted and
resolved result (e.g. ``nb_workers: "auto"`` becomes the number of workers, as in CARS).
"""

from __future__ import annotations

import copy
import difflib
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zarr_orch.cluster.base import AbstractCluster, Option
from zarr_orch.errors import ConfigurationError

logger = logging.getLogger(__name__)

DEFAULT_MODE = "multiprocessing"


def positive_number_or_none(name: str) -> Any:
    """Validator: a number > 0, or None to disable."""

    def check(value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
            raise ConfigurationError(
                f"{name} must be a number of seconds > 0 or null, got {value!r}"
            )
        return float(value)

    return check


def non_negative_int(name: str) -> Any:
    """Validator: an integer >= 0."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ConfigurationError(f"{name} must be an integer >= 0, got {value!r}")
        return int(value)

    return check


def boolean(name: str) -> Any:
    """Validator: a real bool (not a truthy string)."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be true or false, got {value!r}")
        return value

    return check


def mapping(name: str) -> Any:
    """Validator: a dict (copied)."""

    def check(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{name} must be a mapping, got {type(value).__name__}")
        return dict(value)

    return check


def positive_number(name: str) -> Any:
    """Validator: a number > 0."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
            raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")
        return float(value)

    return check


def non_negative_number(name: str) -> Any:
    """Validator: a number >= 0."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
            raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")
        return float(value)

    return check


def positive_int_or_none(name: str) -> Any:
    """Validator: an integer >= 1, or None for the library's default."""

    def check(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigurationError(f"{name} must be an integer >= 1 or null, got {value!r}")
        return int(value)

    return check


def progress_value(value: Any) -> bool | str:
    """Validator for `progress`: true, false or "auto" (a bar only on an interactive stderr)."""
    if value in (True, False, "auto"):
        return value
    raise ConfigurationError(f'progress must be true, false or "auto", got {value!r}')


def optional_str(name: str) -> Any:
    """Validator: a string or None."""

    def check(value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{name} must be a string or null, got {value!r}")
        return value

    return check


CODECS = ("zstd", "zstd-1", "blosc-lz4", "none")


def check_codec(value: Any) -> str:
    """Validator for `codec`."""
    if value not in CODECS:
        raise ConfigurationError(f"codec must be one of {', '.join(CODECS)}; got {value!r}")
    return value


COMMON_OPTIONS: dict[str, Option] = {
    "mode": Option(DEFAULT_MODE, lambda v: v, "execution mode (see the README's mode table)"),
    "task_timeout": Option(
        600.0,
        positive_number_or_none("task_timeout"),
        "seconds without any completed task before running tasks count as hung (parallel modes)",
    ),
    "max_retries": Option(
        2, non_negative_int("max_retries"), "times a failing tile task is retried"
    ),
    "storage_options": Option(
        {}, mapping("storage_options"), "fsspec/s3fs options for out_dir and products"
    ),
    "storage_retries": Option(
        6,
        non_negative_int("storage_retries"),
        "times a store operation is repeated after a transient object-store error",
    ),
    "storage_retry_delay": Option(
        0.25,
        positive_number("storage_retry_delay"),
        "first backoff (s) before a storage retry; doubled each time, with jitter",
    ),
    "storage_retry_max_delay": Option(
        8.0, positive_number("storage_retry_max_delay"), "longest backoff (s) between retries"
    ),
    "storage_concurrency": Option(
        None,
        positive_int_or_none("storage_concurrency"),
        "zarr async.concurrency in every process using a remote store (null: zarr's default)",
    ),
    "progress": Option(
        "auto", progress_value, 'progress bar on stderr: true, false or "auto" (only on a tty)'
    ),
    "profiling": Option({}, mapping("profiling"), "accepted for CARS compatibility; unused"),
    "codec": Option(
        "zstd",
        lambda v: check_codec(v),
        'chunk compression: "zstd" (zarr default), "zstd-1", "blosc-lz4" or "none"',
    ),
    "checksum": Option(
        False,
        boolean("checksum"),
        "also append zarr's crc32c codec to every chunk (zarr/xarray then refuse damaged "
        "chunks, but GDAL cannot read such products; verify uses the records' CRCs anyway)",
    ),
    "resume": Option(
        True, boolean("resume"), "skip tiles an earlier run with the same fingerprint finished"
    ),
    "merge_commit_seconds": Option(
        1.0,
        non_negative_number("merge_commit_seconds"),
        "windowed merges (tiles with windows of their own, final_function) are stored "
        "together, at most this many seconds after the first of them (0: every tile alone)",
    ),
    "overwrite": Option(
        False, boolean("overwrite"), "delete and rebuild every product this run writes"
    ),
    "lease_timeout": Option(
        60.0,
        positive_number_or_none("lease_timeout"),
        "seconds without heartbeat after which another host's lease on out_dir is stale",
    ),
    "save_intermediate": Option(
        False,
        boolean("save_intermediate"),
        "also store replaced-only datasets in out_dir/intermediate/<name>.zarr (resumable)",
    ),
    "run_key": Option(
        None, optional_str("run_key"), "user key for what the library cannot see (code, params)"
    ),
    "geotiff_outputs": Option(
        True,
        boolean("geotiff_outputs"),
        "after each breakpoint, write every registered .tif/.tiff file name as a tiled GeoTIFF "
        "built from its Zarr product (false: Zarr products only)",
    ),
}

_DASK_MODES = frozenset({"local_dask", "pbs_dask", "slurm_dask"})
_MP_MODES = frozenset({"multiprocessing", "mp"})


@dataclass(frozen=True)
class CarsKey:
    """A CARS 1.3 cluster conf key accepted for compatibility in `modes`, with no effect here."""

    modes: frozenset[str]
    option: Option
    why: str


#: keys CARS 1.3's cluster conf checks accept that change nothing in zarr_orch (their modes,
#: CARS's default and why); a mode that has the feature declares the key in its CONF_OPTIONS
CARS_KEYS: dict[str, CarsKey] = {
    "dump_to_disk": CarsKey(
        _MP_MODES,
        Option(True, boolean("dump_to_disk")),
        "workers write tiles straight into Zarr chunks, results are never dumped to disk",
    ),
    "per_job_timeout": CarsKey(
        _MP_MODES,
        Option(600, positive_number("per_job_timeout")),
        "task_timeout (seconds without any completed task) bounds hung tasks",
    ),
    "factorize_tasks": CarsKey(
        _MP_MODES,
        Option(True, boolean("factorize_tasks")),
        "every tile is one task; chains are not factorized",
    ),
    "max_ram_per_worker": CarsKey(
        frozenset({"sequential"}),
        Option(2000, positive_number("max_ram_per_worker")),
        "sequential mode runs tasks in this process, with no RAM cap",
    ),
    "use_memory_logger": CarsKey(
        _DASK_MODES, Option(False, boolean("use_memory_logger")), "no dask memory logger plugin"
    ),
    "config_name": CarsKey(
        _DASK_MODES, Option("unknown", optional_str("config_name")), "informative only"
    ),
    "walltime": CarsKey(
        frozenset({"local_dask"}),
        Option("00:59:00", optional_str("walltime")),
        "a local cluster has no job walltime",
    ),
    "python": CarsKey(
        frozenset({"local_dask"}),
        Option(None, optional_str("python")),
        "local workers run this process's interpreter",
    ),
}


def validate_conf(
    conf: Mapping[str, Any] | None,
) -> tuple[type[AbstractCluster], dict[str, Any]]:
    """Check `conf` and return the cluster class of its mode and the fully defaulted conf."""
    import zarr_orch.cluster  # noqa: F401  (registers the modes)

    if conf is None:
        conf = {}
    if not isinstance(conf, Mapping):
        raise ConfigurationError(
            f"orchestrator_conf must be a dict or None, got {type(conf).__name__}"
        )
    conf = dict(conf)
    mode = conf.get("mode", DEFAULT_MODE)
    if mode == "auto":
        mode = DEFAULT_MODE
    if not isinstance(mode, str):
        raise ConfigurationError(f"mode must be a string, got {mode!r}")
    cluster_cls = AbstractCluster.for_mode(mode)
    cars_keys = {
        key: spec
        for key, spec in CARS_KEYS.items()
        if mode in spec.modes and key not in cluster_cls.CONF_OPTIONS
    }
    options = {
        **COMMON_OPTIONS,
        **{key: spec.option for key, spec in cars_keys.items()},
        **cluster_cls.CONF_OPTIONS,
    }

    unknown = sorted(set(conf) - set(options))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(options), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigurationError(
            f"unknown orchestrator conf key(s) for mode {mode!r}: {', '.join(hints)}; "
            f"valid keys are: {', '.join(sorted(options))}"
        )
    checked: dict[str, Any] = {}
    for key, option in options.items():
        if key == "mode":
            checked["mode"] = mode
            continue
        value = conf[key] if key in conf else copy.deepcopy(option.default)
        checked[key] = option.check(value)
    ignored = [f"{key} ({cars_keys[key].why})" for key in sorted(set(conf) & set(cars_keys))]
    if ignored:
        logger.info("orchestrator conf keys without effect in zarr_orch: %s", "; ".join(ignored))
    return cluster_cls, cluster_cls.resolve_conf(checked)
