"""Retries of transient object-store errors, and error messages that never carry secrets.

Object stores fail in two ways. *Transient* failures (throttling: 503 SlowDown, 429, 5xx;
connection refused or reset; timeouts) go away if the same request is repeated a little
later, so every store operation is retried a bounded number of times with exponential
backoff and jitter. *Permanent* failures (no such bucket, access denied, invalid
credentials, bad request) never go away: they are raised at once, as a `StorageError`
whose message names the URL, so a misconfigured run fails fast instead of retrying.

`RetryingStore` applies this to every operation of a zarr v3 store (get, set, delete,
exists, listings); `call_with_retry` applies it to a synchronous fsspec call (small files,
the out_dir probe). Messages are passed through `scrub`, which replaces every credential
value known from the storage options or the AWS environment by ``***``, because botocore
and other clients may put request details into their exception texts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from zarr.storage import WrapperStore

from zarr_orch.errors import StorageError
from zarr_orch.secrets import is_secret_key

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StorageSettings:
    """How a location's store behaves on object stores (picklable; travels with `Location`).

    retries: times a failed operation is repeated after a transient error (0 = never);
    retry_delay: the first backoff in seconds, doubled at each retry up to retry_max_delay,
    each wait drawn uniformly in [delay/2, delay] (jitter, so that workers do not retry in
    lock-step); concurrency: zarr's ``async.concurrency`` in every process that opens a
    remote store (None keeps zarr's default).
    """

    retries: int = 6
    retry_delay: float = 0.25
    retry_max_delay: float = 8.0
    concurrency: int | None = None

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> StorageSettings:
        """The settings of a validated orchestrator conf (defaults for missing keys)."""
        default = cls()
        return cls(
            retries=int(conf.get("storage_retries", default.retries)),
            retry_delay=float(conf.get("storage_retry_delay", default.retry_delay)),
            retry_max_delay=float(conf.get("storage_retry_max_delay", default.retry_max_delay)),
            concurrency=conf.get("storage_concurrency", default.concurrency),
        )

    def delays(self) -> Iterable[float]:
        """The waits before each retry: exponential backoff with jitter, bounded."""
        delay = self.retry_delay
        for _ in range(self.retries):
            yield random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.retry_max_delay)

    def with_retries(self, retries: int) -> StorageSettings:
        """The same settings with at most `retries` retries (e.g. a quick preflight)."""
        return StorageSettings(
            min(self.retries, retries), self.retry_delay, self.retry_max_delay, self.concurrency
        )


DEFAULT_SETTINGS = StorageSettings()

# -- classifying errors --------------------------------------------------------------------------

#: HTTP statuses worth repeating: timeout, throttling, server errors
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: service error codes (S3 and friends) worth repeating
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
#: exception class names of network failures (botocore, aiohttp, urllib3, fsspec, requests)
TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ResponseStreamingError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ConnectionTimeoutError",
        "SocketTimeoutError",
        "IncompleteRead",
        "ResponseParserError",
        "FSTimeoutError",
        "ProtocolError",
        "NewConnectionError",
        "RemoteDisconnected",
        "ChunkedEncodingError",
    }
)
#: errno values of transient OSErrors (s3fs maps SlowDown/503 to EBUSY, 500 to EREMOTEIO)
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EBUSY",
        "EAGAIN",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "EREMOTEIO",
        "ENETUNREACH",
        "EHOSTUNREACH",
        "ENETRESET",
    )
    if hasattr(errno, name)
)
#: fragments of messages of transient errors from clients that raise plain exceptions
TRANSIENT_TEXT = (
    "slowdown",
    "slow down",
    "reduce your request rate",
    "too many requests",
    "throttl",
    "service unavailable",
    "connection reset",
    "timed out",
)
#: never repeated: the answer will not change (missing keys are normal answers for zarr)
PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    KeyError,
    ValueError,
    TypeError,
    NotImplementedError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (s3fs translates botocore errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8 and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and service error code of an exception, when it carries them."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        return (status if isinstance(status, int) else None), error.get("Code")
    for name in ("status", "status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
    return None, None


def is_transient(exc: BaseException) -> bool:
    """True when repeating the failed operation may succeed (throttling, network, 5xx)."""
    if isinstance(exc, PERMANENT_TYPES):
        return False
    for item in _chain(exc):
        if type(item).__name__ in TRANSIENT_NAMES:
            return True
        if isinstance(item, ConnectionError | TimeoutError | asyncio.TimeoutError):
            return True
        status, code = _status_and_code(item)
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUS:
            return True
        if code is not None or (status is not None and 400 <= status < 500):
            return False  # a definite answer from the service: not transient
        if isinstance(item, OSError) and item.errno in TRANSIENT_ERRNOS:
            return True
        if isinstance(item, PERMANENT_TYPES) and item is not exc:
            return False
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(part in text for part in TRANSIENT_TEXT)


def describe(exc: BaseException) -> str:
    """A one-line reason for `exc` from the most specific exception of its chain."""
    chain = _chain(exc)
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = chain[-1]
    if cause is not exc and str(cause) and str(cause) not in str(exc):
        parts.append(f"caused by {type(cause).__name__}: {cause}")
    return "; ".join(parts)


# -- secrets ------------------------------------------------------------------------------------

#: environment variables whose values are credentials
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
)


def secret_values(options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Every credential string in `options` (nested) and in the credential env variables."""
    found: set[str] = set()

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(value, secret or (isinstance(key, str) and is_secret_key(key)))
        elif isinstance(obj, list | tuple):
            for value in obj:
                walk(value, secret)
        elif secret and isinstance(obj, str) and len(obj) >= 3:
            found.add(obj)

    walk(options or {}, False)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 3:
            found.add(value)
    return tuple(sorted(found, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# -- retrying -----------------------------------------------------------------------------------


def _storage_error(
    action: str, url: str, exc: BaseException, secrets: Iterable[str], attempts: int
) -> StorageError:
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, PermissionError):
        hint = (
            "; access denied: check the credentials (storage_options or the standard "
            "AWS credential chain) and the permissions on this bucket/path"
        )
    elif isinstance(exc, FileNotFoundError):
        hint = "; the bucket (or container) does not exist: create it first"
    elif any(
        type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") for e in _chain(exc)
    ):
        hint = (
            "; no credentials found: pass key/secret in storage_options or configure the "
            "standard AWS credential chain (env, ~/.aws, instance role)"
        )
    elif attempts > 1:
        hint = (
            "; the object store stayed unreachable or busy through every retry: check "
            "endpoint_url and the network, or raise storage_retries"
        )
    else:
        hint = ""
    message = f"{action} {url} failed{tried}: {describe(exc)}{hint}"
    error = StorageError(scrub(message, secrets))
    error.transient = attempts > 1 or is_transient(exc)
    return error


def call_with_retry(
    func: Callable[[], T],
    action: str,
    url: str,
    settings: StorageSettings = DEFAULT_SETTINGS,
    secrets: Iterable[str] = (),
    passthrough: tuple[type[BaseException], ...] = (FileNotFoundError,),
) -> T:
    """Run a synchronous storage call, retrying transient errors; raise a clean StorageError.

    Exceptions of the `passthrough` types are re-raised unchanged (a missing file is an
    answer, not a failure); everything else that remains after the retries becomes a
    `StorageError` naming `url`, with secrets scrubbed and without the original exception
    attached (its repr may hold request details).
    """
    attempts = 0
    delays = iter(settings.delays())
    while True:
        attempts += 1
        try:
            return func()
        except passthrough:
            raise
        except Exception as exc:
            delay = next(delays, None) if is_transient(exc) else None
            if delay is None:
                raise _storage_error(action, url, exc, secrets, attempts) from None
            logger.info(
                "%s %s: transient error (%s), retry %d in %.2f s",
                action,
                url,
                type(exc).__name__,
                attempts,
                delay,
            )
            time.sleep(delay)


class RetryingStore(WrapperStore):
    """A zarr store wrapper that retries transient errors and names the URL in its errors.

    Every operation of the wrapped store (normally an `FsspecStore`) is repeated on
    transient errors with `StorageSettings` backoff. Missing keys keep their normal meaning
    (``None`` / `FileNotFoundError` on reads); permanent errors and exhausted retries raise
    `StorageError` messages naming the store URL and the key, never a credential.
    """

    def __init__(
        self,
        store: Any,
        url: str = "",
        settings: StorageSettings = DEFAULT_SETTINGS,
        secrets: tuple[str, ...] = (),
    ) -> None:
        super().__init__(store)
        self._url = url
        self._settings = settings
        self._secrets = secrets

    def _with_store(self, store: Any) -> RetryingStore:
        return type(self)(store, self._url, self._settings, self._secrets)

    def __str__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"RetryingStore({self._url!r})"

    def __eq__(self, value: object) -> bool:
        return isinstance(value, RetryingStore) and self._store == value._store

    __hash__ = None  # type: ignore[assignment]

    @property
    def _supports_sync_io(self) -> bool:
        """Never: newer zarr would bypass the retrying async methods with sync calls."""
        return False

    def _where(self, key: str) -> str:
        return f"{self._url.rstrip('/')}/{key}" if key else self._url

    async def _retry(self, action: str, key: str, make: Callable[[], Any], reads: bool) -> Any:
        """Await `make()`, repeating it on transient errors; translate permanent ones."""
        attempts = 0
        delays = iter(self._settings.delays())
        while True:
            attempts += 1
            try:
                return await make()
            except FileNotFoundError as exc:
                if reads:
                    raise  # zarr reads a missing key as "absent"
                raise _storage_error(
                    action, self._where(key), exc, self._secrets, attempts
                ) from None
            except StorageError:
                raise
            except Exception as exc:
                delay = next(delays, None) if is_transient(exc) else None
                if delay is None:
                    raise _storage_error(
                        action, self._where(key), exc, self._secrets, attempts
                    ) from None
                logger.info(
                    "%s %s: transient error (%s), retry %d in %.2f s",
                    action,
                    self._where(key),
                    type(exc).__name__,
                    attempts,
                    delay,
                )
                await asyncio.sleep(delay)

    # -- reads -----------------------------------------------------------------------------------
    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        """Read a key (None when missing), retrying transient errors."""
        return await self._retry(
            "reading", key, lambda: self._store.get(key, prototype, byte_range), True
        )

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[Any]) -> Any:
        """Read byte ranges of several keys, retrying the batch on transient errors."""
        key_ranges = list(key_ranges)
        first = key_ranges[0][0] if key_ranges else ""
        return await self._retry(
            "reading", first, lambda: self._store.get_partial_values(prototype, key_ranges), True
        )

    async def get_ranges(self, key: str, byte_ranges: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Newer zarr's coalesced range reads, collected with retries then yielded."""

        async def collect() -> list[Any]:
            return [group async for group in self._store.get_ranges(key, byte_ranges, **kwargs)]

        for group in await self._retry("reading", key, collect, True):
            yield group

    async def exists(self, key: str) -> bool:
        """Whether a key exists, retrying transient errors.

        Asked as a one-byte ranged read: fsspec's exists is a HEAD and, for a missing key
        (zarr asks about many while creating arrays), a directory listing as well; the read
        is one request either way. A refused range falls back to the wrapped store's check.
        """
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype

        prototype = default_buffer_prototype()
        try:
            found = await self._retry(
                "checking",
                key,
                lambda: self._store.get(key, prototype, RangeByteRequest(0, 1)),
                True,
            )
        except StorageError:  # e.g. a range refused on an empty object
            return await self._retry("checking", key, lambda: self._store.exists(key), True)
        except FileNotFoundError:
            return False
        return found is not None

    async def is_empty(self, prefix: str) -> bool:
        """Whether nothing is stored under `prefix`, retrying transient errors."""
        return await self._retry("listing", prefix, lambda: self._store.is_empty(prefix), True)

    async def _get_many(self, requests: Iterable[Any]) -> AsyncGenerator[tuple[str, Any], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def _collect(self, prefix: str, make: Callable[[], AsyncIterator[str]]) -> list[str]:
        async def collect() -> list[str]:
            return [item async for item in make()]

        return await self._retry("listing", prefix, collect, True)

    async def list(self) -> AsyncIterator[str]:  # type: ignore[override]
        """Every key (collected with retries, then yielded)."""
        for item in await self._collect("", self._store.list):
            yield item

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        """Keys under `prefix` (collected with retries, then yielded)."""
        for item in await self._collect(prefix, lambda: self._store.list_prefix(prefix)):
            yield item

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        """Direct children of `prefix` (collected with retries, then yielded)."""
        for item in await self._collect(prefix, lambda: self._store.list_dir(prefix)):
            yield item

    # -- writes ----------------------------------------------------------------------------------
    async def set(self, key: str, value: Any) -> None:
        """Write a key (a whole object: repeating it is safe), retrying transient errors."""
        await self._retry("writing", key, lambda: self._store.set(key, value), False)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        """Write a key unless it exists, retrying transient errors."""
        await self._retry("writing", key, lambda: self._store.set_if_not_exists(key, value), False)

    async def _set_many(self, values: Iterable[tuple[str, Any]]) -> None:
        await asyncio.gather(*(self.set(key, value) for key, value in values))

    async def delete(self, key: str) -> None:
        """Delete a key, retrying transient errors."""
        await self._retry("deleting", key, lambda: self._store.delete(key), True)

    async def delete_dir(self, prefix: str) -> None:
        """Delete every key under `prefix`, retrying transient errors."""
        await self._retry("deleting", prefix, lambda: self._store.delete_dir(prefix), True)

    async def clear(self) -> None:
        """Delete everything in the store, retrying transient errors."""
        await self._retry("clearing", "", self._store.clear, True)
