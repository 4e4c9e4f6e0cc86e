"""Where products live: a local path or any fsspec URL, plus its storage options.

A `Location` is small and picklable, so workers reopen stores themselves from it instead of
receiving open handles. Its repr never shows credentials.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from zarr_orch.conf import mask_secrets
from zarr_orch.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: names that cannot be used as a path component of a product
RESERVED_NAMES = frozenset({"", ".", "..", "zarr.json", ".zarray", ".zgroup", ".zattrs"})


def _freeze(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


@dataclass(frozen=True)
class Location:
    """A normalised URL (absolute local path, or ``protocol://...``) and its fsspec options."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        path_or_url: str | os.PathLike[str] | Location,
        storage_options: dict[str, Any] | None = None,
        base: Location | None = None,
    ) -> Location:
        """Normalise a user path or URL; a relative local path is resolved under `base`."""
        if isinstance(path_or_url, Location):
            return path_or_url
        if isinstance(path_or_url, os.PathLike):
            path_or_url = os.fspath(path_or_url)
        if not isinstance(path_or_url, str):
            raise ConfigurationError(
                f"a path or URL must be a string or os.PathLike, got {type(path_or_url).__name__}"
            )
        text = path_or_url.strip()
        if not text:
            raise ConfigurationError("an empty path or URL was given; name a directory or URL")
        options = dict(storage_options or (base.storage_options if base else {}) or {})
        if "://" in text:
            protocol, rest = text.split("://", 1)
            protocol = protocol.lower()
            if protocol in ("file", "local"):
                return cls(os.path.abspath(os.path.expanduser(rest or "/")), {})
            _check_protocol(protocol, text)
            if not rest.strip("/"):
                raise ConfigurationError(f"URL {text!r} names no bucket or path")
            return cls(f"{protocol}://{rest.rstrip('/')}", options)
        if "::" in text:
            raise ConfigurationError(
                f"chained fsspec URLs are not supported as product locations: {text!r}"
            )
        if base is not None and not os.path.isabs(os.path.expanduser(text)):
            return base.join(*_split_relative(text))
        return cls(os.path.abspath(os.path.expanduser(text)), {})

    def join(self, *parts: str) -> Location:
        """A child location; each part must be a plain relative name (no '..', no absolute)."""
        clean: list[str] = []
        for part in parts:
            for piece in _split_relative(part):
                clean.append(piece)
        if self.is_local:
            return Location(os.path.join(self.url, *clean), {})
        return Location(posixpath.join(self.url, *clean), self.storage_options)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        """'file' for local paths, else the URL scheme."""
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    @property
    def is_local(self) -> bool:
        """True for a path on this machine's filesystem."""
        return self.protocol == "file"

    @property
    def name(self) -> str:
        """The last path component."""
        return posixpath.basename(self.url.rstrip("/")) if not self.is_local else os.path.basename(
            self.url
        )

    @property
    def parent(self) -> Location:
        """The containing location."""
        if self.is_local:
            return Location(os.path.dirname(self.url), {})
        protocol, rest = self.url.split("://", 1)
        return Location(f"{protocol}://{posixpath.dirname(rest)}", self.storage_options)

    @property
    def fs_path(self) -> str:
        """The path as the fsspec filesystem expects it."""
        if self.is_local:
            return self.url
        return self.fs.__class__._strip_protocol(self.url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """A (cached, per-process) fsspec filesystem for this location."""
        return _filesystem(self.protocol, _freeze(self.storage_options), self.storage_options)

    def __repr__(self) -> str:
        if self.storage_options:
            return f"Location({self.url!r}, storage_options={mask_secrets(self.storage_options)!r})"
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __reduce__(self) -> tuple[Any, ...]:
        return (Location, (self.url, self.storage_options))

    # -- zarr ------------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = False) -> Any:
        """A zarr v3 store rooted here: LocalStore for local paths, FsspecStore otherwise."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.url, read_only=read_only)
        fs = _async_filesystem(self.protocol, _freeze(self.storage_options), self.storage_options)
        return FsspecStore(fs, path=self.fs_path, read_only=read_only)

    # -- small files -------------------------------------------------------------------------------
    def exists(self) -> bool:
        """True when a file or directory exists here."""
        return bool(self.fs.exists(self.fs_path))

    def read_text(self) -> str:
        """The content of the file here."""
        with self.fs.open(self.fs_path, "r", encoding="utf-8") as handle:
            return handle.read()

    def write_text(self, text: str) -> None:
        """Write a small text file; local writes go through a temp file + rename (atomic)."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.url), exist_ok=True)
            tmp = f"{self.url}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.url)
            return
        with self.fs.open(self.fs_path, "w", encoding="utf-8") as handle:
            handle.write(text)

    def makedirs(self) -> None:
        """Create the directory (a no-op on object stores, which have no directories)."""
        if self.is_local:
            os.makedirs(self.url, exist_ok=True)

    def rm(self) -> None:
        """Remove recursively (missing is fine)."""
        try:
            self.fs.rm(self.fs_path, recursive=True)
        except FileNotFoundError:
            pass


def _split_relative(part: str) -> list[str]:
    """Split a relative name into components, refusing traversal and reserved names."""
    if not isinstance(part, str):
        raise ConfigurationError(f"a path component must be a string, got {type(part).__name__}")
    text = part.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ConfigurationError(
            f"{part!r} must be a non-empty relative name inside the output directory"
        )
    pieces = [p for p in text.split("/") if p not in ("", ".")]
    if not pieces:
        raise ConfigurationError(f"{part!r} names no file or directory")
    for piece in pieces:
        if piece in RESERVED_NAMES or piece == "..":
            raise ConfigurationError(
                f"{part!r} contains {piece!r}: names may not climb out of the output "
                "directory or use reserved Zarr names"
            )
    return pieces


def _check_protocol(protocol: str, url: str) -> None:
    """Fail fast, with an install hint, when fsspec has no implementation for `protocol`."""
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigurationError(
            f"unsupported URL protocol {protocol!r} in {url!r}: fsspec knows no such protocol"
        ) from None
    except ImportError as exc:
        raise ConfigurationError(
            f"URL {url!r} needs an fsspec implementation that is not installed ({exc}); "
            "install the matching package (e.g. s3fs, gcsfs, adlfs)"
        ) from None


_FS_CACHE: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}


def _filesystem(protocol: str, key: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """A sync filesystem per (process, protocol, options): forked workers get their own."""
    cache_key = (os.getpid(), "sync", protocol, key)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        fs = fsspec.filesystem("file") if protocol == "file" else fsspec.filesystem(
            protocol, **options
        )
        _FS_CACHE[cache_key] = fs
    return fs


def _async_filesystem(protocol: str, key: str, options: dict[str, Any]) -> Any:
    """An async filesystem for zarr's FsspecStore (sync ones are wrapped)."""
    cache_key = (os.getpid(), "async", protocol, key)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        cls = fsspec.get_filesystem_class(protocol)
        if getattr(cls, "async_impl", False):
            fs = cls(asynchronous=True, skip_instance_cache=True, **options)
        else:
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fsspec.filesystem(protocol, **options))
        _FS_CACHE[cache_key] = fs
    return fs
