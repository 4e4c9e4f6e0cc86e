"""CARS 1.3's orchestrator API beside the seed API: constructor rule, index, yaml metadata.

CARS 1.3 applications and pipelines call members the seed API (CARS 1.0's) does not have:
``Orchestrator(conf, out_dir, log_dir, launch_worker, out_yaml_path)``, `update_index`,
`save_index`, `set_target_task`, `out_yaml`, the module function
`get_disparity_range_cropped`... They live here, as a mixin of `Orchestrator` and module
functions, so the orchestrator itself stays about running breakpoints.
"""

from __future__ import annotations

import collections.abc
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from zarr_orch import constants as cst
from zarr_orch.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: attribute CARS tasks set on a tile when dense matching had to crop the disparity range
CROPPED_DISPARITY_RANGE = "cropped_disparity_range"
#: CARS's warning after a breakpoint where a tile's disparity range was cropped
CROPPED_WARNING = (
    "Disparity range was cropped in DenseMatching, due to a lack of available "
    "memory for estimated disparity range"
)

_KEYWORDS = ("log_dir", "launch_worker", "out_json_path", "out_yaml_path")


@dataclass(frozen=True)
class InitArgs:
    """The constructor arguments after the third positional one was told apart."""

    log_dir: str | os.PathLike[str] | None
    launch_worker: bool
    metadata_path: str | os.PathLike[str] | None


def resolve_init_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> InitArgs:
    """Sort the arguments after `out_dir` into log_dir, launch_worker and the metadata path.

    The third positional argument decides the convention: a bool is the seed API's
    ``launch_worker`` (then the fourth is ``out_json_path``); a str, a path or None is CARS
    1.3's ``log_dir`` (then come ``launch_worker`` and ``out_yaml_path``). Keywords of both
    conventions are accepted; ``out_json_path`` and ``out_yaml_path`` name the same file.
    """
    unknown = sorted(set(kwargs) - set(_KEYWORDS))
    if unknown:
        raise TypeError(
            f"Orchestrator() got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"valid ones are orchestrator_conf, out_dir, {', '.join(_KEYWORDS)}"
        )
    if args:
        third = args[0]
        if isinstance(third, bool):
            names = ("launch_worker", "out_json_path")
        elif third is None or isinstance(third, str | os.PathLike):
            names = ("log_dir", "launch_worker", "out_yaml_path")
        else:
            raise ConfigurationError(
                f"the third argument of Orchestrator() is {type(third).__name__} {third!r}: "
                "pass launch_worker as a bool (seed API) or log_dir as a path or None "
                "(CARS 1.3), or name it: Orchestrator(conf, out_dir, launch_worker=...)"
            )
        if len(args) > len(names):
            raise TypeError(
                f"Orchestrator() takes at most {2 + len(names)} positional arguments in this "
                f"convention ({', '.join(('orchestrator_conf', 'out_dir', *names))}), "
                f"got {2 + len(args)}"
            )
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"Orchestrator() got multiple values for argument {name!r}")
            kwargs = {**kwargs, name: value}
    if kwargs.get("out_json_path") is not None and kwargs.get("out_yaml_path") is not None:
        raise ConfigurationError(
            "give out_json_path (seed API) or out_yaml_path (CARS 1.3), not both: they "
            "name the same metadata file"
        )
    launch_worker = kwargs.get("launch_worker", True)
    if not isinstance(launch_worker, bool):
        raise ConfigurationError(
            f"launch_worker must be true or false, got {type(launch_worker).__name__} "
            f"{launch_worker!r}"
        )
    log_dir = kwargs.get("log_dir")
    if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
        raise ConfigurationError(f"log_dir must be a path or None, got {log_dir!r}")
    metadata = kwargs.get("out_yaml_path") or kwargs.get("out_json_path")
    return InitArgs(log_dir, launch_worker, metadata)


def cars_worker_preload(conf: dict[str, Any]) -> dict[str, Any]:
    """The conf with CARS's forkserver preload ("cars", "cars.pipelines", as CARS's own
    multiprocessing cluster) when this process runs CARS code and the user chose none: each
    worker then starts with CARS's applications imported, instead of importing them (~5 s
    of CPU) at its first task."""
    if "worker_preload" not in conf or conf["worker_preload"] is not None:
        return conf
    if "cars" not in sys.modules:
        return conf
    return {**conf, "worker_preload": ["cars", "cars.pipelines"]}


def merge_dicts(dict1: dict, dict2: collections.abc.Mapping) -> dict:
    """Merge `dict2` into `dict1` in place, as CARS does (nested mappings merge); returns dict1."""
    for key, value2 in dict2.items():
        value1 = dict1.get(key)
        if isinstance(value1, collections.abc.MutableMapping) and isinstance(
            value2, collections.abc.Mapping
        ):
            merge_dicts(value1, value2)
        else:
            dict1[key] = value2
    return dict1


def get_disparity_range_cropped(obj: Any) -> bool:
    """Whether a tile says its disparity range was cropped (CARS's module function)."""
    attrs = getattr(obj, "attrs", None)
    if not isinstance(attrs, collections.abc.Mapping):
        return False
    inner = attrs.get(cst.ATTRIBUTES)
    if isinstance(inner, collections.abc.Mapping):
        return bool(inner.get(CROPPED_DISPARITY_RANGE, False))
    return False


def flatten_object(cars_ds_list: list[Any], delayed_type: Any) -> list[Any]:
    """Flatten list of CarsDatasets to list of delayed (each dataset once, row-major order)."""
    seen: set[int] = set()
    result = []
    for cars_ds in cars_ds_list:
        if cars_ds is None or id(cars_ds) in seen:
            continue
        seen.add(id(cars_ds))
        for row in cars_ds.tiles or []:
            for obj in row:
                if obj is not None and isinstance(obj, delayed_type):
                    result.append(obj)
    return result


def update_saving_infos(
    saving_info_left: dict[str, Any], row: int | None = None, col: int | None = None
) -> dict[str, Any]:
    """Update saving infos dict with row and col arguments (returns a copy)."""
    full = dict(saving_info_left)
    if row is not None:
        full[cst.CARS_DS_ROW] = int(row)
    if col is not None:
        full[cst.CARS_DS_COL] = int(col)
    return full


class CarsApiMixin:
    """Members CARS 1.3 applications and pipelines use on the orchestrator (metadata side).

    The host class provides ``out_json`` (the metadata dict), ``out_location``,
    ``registries``, ``_conf`` and ``save_out_json``.
    """

    out_json: dict[str, Any]
    product_index: dict[str, Any]
    target_task_id: Any
    log_dir: str

    def init_cars_api(self, log_dir: str | os.PathLike[str] | None) -> None:
        """Set the CARS 1.3 attributes: product index, progress target, log_dir."""
        self.product_index = {}
        self.target_task_id = None
        if log_dir is None:
            log_dir = self.out_location.join("logs").url  # type: ignore[attr-defined]
        self.log_dir = os.fspath(log_dir)

    @property
    def out_yaml(self) -> dict[str, Any]:
        """CARS 1.3's name of the run's metadata dict (written by `save_out_yaml`)."""
        return self.out_json

    @out_yaml.setter
    def out_yaml(self, value: dict[str, Any]) -> None:
        self.out_json = value

    def save_out_yaml(self) -> None:
        """CARS 1.3's name of `save_out_json` (the format follows the file's extension)."""
        self.save_out_json()  # type: ignore[attr-defined]

    @property
    def task_timeout(self) -> float | None:
        """Seconds without any completed task before running tasks count as hung."""
        return self._conf["task_timeout"]  # type: ignore[attr-defined]

    @property
    def cars_ds_names_info(self) -> list[str]:
        """Names of the datasets registered for the next breakpoint (CARS logs them)."""
        return [item.name for item in self.registries.datasets.values()]  # type: ignore[attr-defined]

    def set_target_task(self, task_id: Any) -> None:
        """Remember the pipeline's progress task id (CARS's ProgressTree; informative here)."""
        self.target_task_id = task_id

    def update_index(self, new_dict: dict[str, Any]) -> None:
        """Deep-merge `new_dict` into the product index (written by `save_index`)."""
        if not isinstance(new_dict, collections.abc.Mapping):
            raise ConfigurationError(f"update_index needs a dict, got {type(new_dict).__name__}")
        merge_dicts(self.product_index, new_dict)

    def save_index(self) -> None:
        """Write each product's index as ``out_dir/<product>/index.yaml``, as CARS does."""
        from zarr_orch.data.documents import dump_document

        for product, index in self.product_index.items():
            location = self.out_location.join(str(product), "index.yaml")  # type: ignore[attr-defined]
            location.write_text(dump_document(index, "yaml"))
