"""Where products live: a local path or any fsspec URL, plus its storage options.

A `Location` is small and picklable, so workers reopen stores themselves from it instead of
receiving open handles; filesystems are created per process from the URL and options. Its
repr never shows credentials. Remote stores are wrapped in a `RetryingStore` (transient
object-store errors are retried, permanent ones fail fast with the URL in the message), and
`check_writable` probes a remote out_dir before any task runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec

from zarr_orch.errors import ConfigurationError, StorageError
from zarr_orch.secrets import mask_secrets
from zarr_orch.storage.core.atomic_files import atomic_write
from zarr_orch.storage.core.retry import (
    DEFAULT_SETTINGS,
    RetryingStore,
    StorageSettings,
    call_with_retry,
    secret_values,
)

logger = logging.getLogger(__name__)

#: names that cannot be used as a path component of a product
RESERVED_NAMES = frozenset({"", ".", "..", "zarr.json", ".zarray", ".zgroup", ".zattrs"})


def _freeze(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


@dataclass(frozen=True)
class Location:
    """A normalised URL (absolute local path, or ``protocol://...``), its fsspec options and
    the retry/concurrency settings of its remote stores."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    settings: StorageSettings = field(default=DEFAULT_SETTINGS, compare=False, hash=False)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        path_or_url: str | os.PathLike[str] | Location,
        storage_options: dict[str, Any] | None = None,
        base: Location | None = None,
        settings: StorageSettings | None = None,
    ) -> Location:
        """Normalise a user path or URL; a relative local path is resolved under `base`.

        Options and settings not given are taken from `base` (so ``out_json_path`` on the
        same bucket as ``out_dir`` needs no second copy of the credentials).
        """
        if settings is None:
            settings = base.settings if base is not None else DEFAULT_SETTINGS
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
        if "::" in text.split("://", 1)[0]:  # "proto1::proto2://..." (checked first: clearer)
            raise ConfigurationError(
                f"chained fsspec URLs are not supported as product locations: {text!r}"
            )
        if "://" in text:
            protocol, rest = text.split("://", 1)
            protocol = protocol.lower()
            if protocol in ("file", "local"):
                return cls(os.path.abspath(os.path.expanduser(rest or "/")), {}, settings)
            fs_class = _check_protocol(protocol, text)
            _check_url(protocol, rest, fs_class)
            return cls(f"{protocol}://{rest.rstrip('/')}", options, settings)
        if base is not None and not os.path.isabs(os.path.expanduser(text)):
            return base.join(*_split_relative(text))
        return cls(os.path.abspath(os.path.expanduser(text)), {}, settings)

    def join(self, *parts: str) -> Location:
        """A child location; each part must be a plain relative name (no '..', no absolute)."""
        clean: list[str] = []
        for part in parts:
            for piece in _split_relative(part):
                clean.append(piece)
        if self.is_local:
            return replace(self, url=os.path.join(self.url, *clean), storage_options={})
        return replace(self, url=posixpath.join(self.url, *clean))

    # -- properties ------------------------------------------------------------------------------
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
        return (
            posixpath.basename(self.url.rstrip("/"))
            if not self.is_local
            else os.path.basename(self.url)
        )

    @property
    def parent(self) -> Location:
        """The containing location."""
        if self.is_local:
            return replace(self, url=os.path.dirname(self.url), storage_options={})
        protocol, rest = self.url.split("://", 1)
        return replace(self, url=f"{protocol}://{posixpath.dirname(rest)}")

    @property
    def fs_path(self) -> str:
        """The path as the fsspec filesystem expects it."""
        if self.is_local:
            return self.url
        return fsspec.get_filesystem_class(self.protocol)._strip_protocol(self.url)

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
        return (Location, (self.url, self.storage_options, self.settings))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Credential values to scrub from messages about this location."""
        return secret_values(self.storage_options)

    # -- zarr ------------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = False, settings: StorageSettings | None = None) -> Any:
        """A zarr v3 store rooted here: LocalStore for local paths, else a retrying FsspecStore.

        The fsspec filesystem is created in (and cached for) the calling process, so worker
        processes open their own connections from the picklable URL + options.
        """
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.url, read_only=read_only)
        settings = settings or self.settings
        _apply_concurrency(settings)
        fs = _async_filesystem(self.protocol, _freeze(self.storage_options), self.storage_options)
        store = FsspecStore(fs, path=self.fs_path, read_only=read_only)
        return RetryingStore(store, self.url, settings, self.secrets)

    def check_writable(self) -> None:
        """Preflight of a remote directory: write then delete a small probe object.

        Fails fast (few retries) with a `StorageError` naming the URL when the bucket is
        missing, access is denied, credentials are wrong or the endpoint does not answer.
        The probe is written through the zarr store and deleted through the filesystem that
        small files use, so both clients of this process are checked (and connected) before
        any task runs.
        """
        if self.is_local:
            return
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        name = f".zarr_orch-probe-{uuid.uuid4().hex[:12]}"
        quick = self.settings.with_retries(2)
        store = self.zarr_store(settings=quick)
        data = default_buffer_prototype().buffer.from_bytes(b"zarr_orch write probe\n")
        path = self.join(name).fs_path
        try:
            sync(store.set(name, data))
            call_with_retry(
                lambda: self.fs.rm_file(path),
                "deleting",
                f"{self.url}/{name}",
                quick,
                self.secrets,
                (),
            )
        except StorageError as exc:
            raise StorageError(f"out_dir {self.url} is not usable: {exc}") from None
        logger.debug("%s: write probe ok", self)

    # -- small files -----------------------------------------------------------------------------
    def _call(self, func: Any, action: str, passthrough: tuple[type[BaseException], ...]) -> Any:
        """Run a filesystem call: directly for local paths, with retries for remote ones."""
        if self.is_local:
            return func()
        return call_with_retry(func, action, self.url, self.settings, self.secrets, passthrough)

    def exists(self) -> bool:
        """True when a file or directory exists here."""
        return bool(self._call(lambda: self.fs.exists(self.fs_path), "checking", ()))

    def read_text(self) -> str:
        """The content of the file here."""

        def read() -> str:
            with self.fs.open(self.fs_path, "r", encoding="utf-8") as handle:
                return handle.read()

        return self._call(read, "reading", (FileNotFoundError,))

    def write_text(self, text: str) -> None:
        """Write a small text file; local writes go through a temp file + rename (atomic)."""
        data = text.encode("utf-8")
        if self.is_local:
            atomic_write(self.url, data)
            return
        self._call(lambda: self.fs.pipe_file(self.fs_path, data), "writing", ())

    def makedirs(self) -> None:
        """Create the directory (a no-op on object stores, which have no directories)."""
        if self.is_local:
            os.makedirs(self.url, exist_ok=True)

    def rm(self) -> None:
        """Remove recursively (missing is fine)."""
        with contextlib.suppress(FileNotFoundError):
            self._call(
                lambda: self.fs.rm(self.fs_path, recursive=True), "removing", (FileNotFoundError,)
            )


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


def _check_protocol(protocol: str, url: str) -> type[fsspec.AbstractFileSystem]:
    """Fail fast, with an install hint, when fsspec has no implementation for `protocol`."""
    if not protocol or not all(c.isalnum() or c in "+-." for c in protocol):
        raise ConfigurationError(f"{url!r} is not a valid URL: bad protocol {protocol!r}")
    try:
        return fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigurationError(
            f"unsupported URL protocol {protocol!r} in {url!r}: fsspec knows no such protocol"
        ) from None
    except ImportError as exc:
        raise ConfigurationError(
            f"URL {url!r} needs an fsspec implementation that is not installed ({exc}); "
            "install the matching package (e.g. s3fs, gcsfs, adlfs)"
        ) from None


def _check_url(protocol: str, rest: str, fs_class: type[fsspec.AbstractFileSystem]) -> None:
    """Refuse URLs that name no bucket/host, and credentials written into the URL."""
    if not rest.strip("/"):
        raise ConfigurationError(f"URL {protocol}://{rest} names no bucket or path")
    if rest.startswith("/") and getattr(fs_class, "root_marker", "/") == "":
        # s3:///x, gcs:///x: the bucket (host) part is empty; memory:///x is fine
        raise ConfigurationError(
            f"URL {protocol}://{rest} has an empty bucket (or host) name: write "
            f"{protocol}://BUCKET/path"
        )
    authority = rest.split("/", 1)[0]
    if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
        host = authority.rsplit("@", 1)[1]
        raise ConfigurationError(
            f"URL {protocol}://***@{host}/... contains a password: pass credentials in "
            "the orchestrator conf's storage_options (or the environment) instead"
        )


def _apply_concurrency(settings: StorageSettings) -> None:
    """Set zarr's async concurrency in this process when the settings ask for one."""
    if settings.concurrency is None:
        return
    import zarr

    if zarr.config.get("async.concurrency") != settings.concurrency:
        zarr.config.set({"async.concurrency": settings.concurrency})
        logger.debug("zarr async.concurrency set to %d", settings.concurrency)


#: per-protocol defaults under the user's options. botocore's own retries are turned off
#: for S3 so that `StorageSettings` is the one retry policy (s3fs still retries SlowDown and
#: timeouts a few times quickly): otherwise a refused connection takes 3-15 s per attempt.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}},
    "s3a": {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}},
}


def _with_defaults(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` on top of the protocol's defaults (nested dicts merged, the user's win)."""

    def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    # deep copies: botocore rewrites the retries dict it is given
    merged = merge(copy.deepcopy(PROTOCOL_DEFAULTS.get(protocol, {})), copy.deepcopy(options))
    if protocol in ("s3", "s3a") and "max_concurrency" not in merged and _s3_has_max_concurrency():
        # s3fs >= 2025 sizes every whole-object read with a HEAD (plus a listing when the key
        # is missing) to split reads bigger than its block size: zarr's objects never are,
        # and zarr runs its own concurrency, so that costs 1-2 extra requests per read
        merged["max_concurrency"] = 1
    return merged


@functools.cache
def _s3_has_max_concurrency() -> bool:
    """Whether the installed s3fs takes the `max_concurrency` option."""
    try:
        import s3fs
    except ImportError:
        return False
    return "max_concurrency" in inspect.signature(s3fs.S3FileSystem.__init__).parameters


_FS_CACHE: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}


def _filesystem(protocol: str, key: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """A sync filesystem per (process, protocol, options): forked workers get their own."""
    cache_key = (os.getpid(), "sync", protocol, key)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        fs = (
            fsspec.filesystem("file")
            if protocol == "file"
            else fsspec.filesystem(protocol, **_with_defaults(protocol, options))
        )
        _FS_CACHE[cache_key] = fs
    return fs


def _async_filesystem(protocol: str, key: str, options: dict[str, Any]) -> Any:
    """An async filesystem for zarr's FsspecStore (sync ones are wrapped)."""
    cache_key = (os.getpid(), "async", protocol, key)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        cls = fsspec.get_filesystem_class(protocol)
        options = _with_defaults(protocol, options)
        if getattr(cls, "async_impl", False):
            fs = cls(asynchronous=True, skip_instance_cache=True, **options)
        else:
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            # asynchronous=True as zarr's own wrapper does (else FsspecStore warns on every open)
            fs = AsyncFileSystemWrapper(fsspec.filesystem(protocol, **options), asynchronous=True)
        _FS_CACHE[cache_key] = fs
    return fs
