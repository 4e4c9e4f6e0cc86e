"""Locations a run directory records about itself, relative to it, so that a moved or copied
run (``cp -r``, synced to an object store and back) is self-contained.

metadata.json stores a product inside out_dir as ``"path"`` (relative to out_dir) and one
elsewhere (an absolute file name) as ``"url"``. Readers resolve entries against the directory
they were given, never against where the run was first written: an old metadata.json whose
absolute URLs point into its own out_dir is rebased the same way, so acting on a copy can
never touch the original.
"""

from __future__ import annotations

import os
from typing import Any

from zarr_orch.errors import ConfigurationError
from zarr_orch.storage.core.location import Location


def relative_path(out_url: str, url: str) -> str | None:
    """`url`'s path inside the directory `out_url` (posix separators), or None if outside."""
    base = out_url.rstrip("/\\")
    local = "://" not in base
    sep = os.sep if local else "/"
    if not url.startswith(base + sep):
        return None
    rest = url[len(base) + len(sep) :]
    return rest.replace(os.sep, "/") if local else rest


def place(out_url: str, url: str) -> dict[str, str]:
    """How metadata.json names `url`: ``{"path": ...}`` inside out_dir, else ``{"url": ...}``."""
    path = relative_path(out_url, url)
    return {"path": path} if path is not None else {"url": url}


def name_in(out_url: str, url: str) -> str:
    """`url` as a run directory records it: its relative path inside out_dir, else itself."""
    path = relative_path(out_url, url)
    return path if path is not None else url


def entry_location(out: Location, entry: Any, written_to: str | None) -> Location | None:
    """Where a metadata.json location entry (``{"path"}`` or ``{"url"}``) is, seen from the
    run directory `out`; `written_to` is the out_dir the metadata names (for old entries).
    None for an entry that names nothing usable."""
    if not isinstance(entry, dict):
        return None
    path, url = entry.get("path"), entry.get("url")
    if not (isinstance(path, str) and path) and isinstance(url, str) and url:
        path = relative_path(written_to, url) if written_to else None
        if path is None and "://" not in url and not os.path.isabs(url):
            path = url  # a bare relative name: inside the run directory
        if path is None:
            try:
                return Location.parse(url, out.storage_options or None)
            except ConfigurationError:
                return None
    if not isinstance(path, str) or not path:
        return None
    try:
        return out.join(path)
    except ConfigurationError:  # a path climbing out of the run directory is not followed
        return None


def run_section(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The orchestrator's part of a metadata.json (``zarr_orch``), or {}."""
    section = (metadata or {}).get("zarr_orch")
    return section if isinstance(section, dict) else {}


def listed_products(out: Location, metadata: dict[str, Any] | None) -> list[tuple[str, Location]]:
    """(name, location) of every product a run's metadata.json lists, resolved in `out`.

    The name is the product's path in the run directory, or its URL when it lies elsewhere.
    """
    section = run_section(metadata)
    products = section.get("products")
    written_to = section.get("out_dir") if isinstance(section.get("out_dir"), str) else None
    found: list[tuple[str, Location]] = []
    for entry in (products or {}).values() if isinstance(products, dict) else ():
        location = entry_location(out, entry, written_to)
        if location is None:
            continue
        inside = relative_path(out.url, location.url)
        found.append((inside if inside is not None else location.url, location))
    return found


def log_location(out: Location, metadata: dict[str, Any] | None) -> Location | None:
    """The run log a metadata.json names (``log_file``), resolved in `out`."""
    section = run_section(metadata)
    log_file = section.get("log_file")
    if not isinstance(log_file, str) or not log_file:
        return None
    written_to = section.get("out_dir") if isinstance(section.get("out_dir"), str) else None
    return entry_location(out, {"url": log_file}, written_to)
