"""Metadata documents (run metadata, product indexes) as JSON or YAML text.

CARS 1.3 writes its metadata and ``index.yaml`` files as YAML, the seed API as JSON: the
format follows the file's extension, the content is made JSON/YAML-safe the same way.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

YAML_SUFFIXES = (".yaml", ".yml")


def plain(obj: Any) -> Any:
    """`obj` with numpy values, tuples, sets, paths and CRS objects made plain Python."""
    if isinstance(obj, dict):
        return {str(key): plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(value) for value in obj]
    if isinstance(obj, set | frozenset):
        return [plain(value) for value in sorted(obj, key=repr)]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if hasattr(obj, "to_wkt"):
        return obj.to_wkt()
    return str(obj)


def format_for(name: str) -> str:
    """``"yaml"`` for a .yaml/.yml file name, else ``"json"``."""
    return "yaml" if name.lower().endswith(YAML_SUFFIXES) else "json"


def dump_document(content: Any, fmt: str = "json") -> str:
    """The text of `content` as a JSON or YAML document (key order kept)."""
    data = plain(content)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
