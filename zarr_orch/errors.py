"""Exception hierarchy of ``zarr_orch``: catch :class:`ZarrOrchError` for any of them.

Classes that are also ``ValueError``/``RuntimeError`` keep working with code that
catches the builtin types.
"""

from __future__ import annotations


class ZarrOrchError(Exception):
    """Base class of every error raised on purpose by zarr_orch."""


class ConfigurationError(ZarrOrchError, ValueError):
    """A configuration value or argument is invalid."""


class TilingError(ZarrOrchError, ValueError):
    """A tiling grid, window or overlap is invalid."""


class MisalignedGridError(TilingError):
    """A tiling grid does not match a regular (Zarr chunk) grid."""


class TileError(ZarrOrchError, ValueError):
    """A tile's content or metadata is wrong."""


class ProductError(ZarrOrchError):
    """A product on disk is missing, incomplete or cannot be used."""


class TaskFailedError(ZarrOrchError, RuntimeError):
    """A task raised; carries which dataset/tile failed and the worker traceback."""

    def __init__(
        self,
        message: str,
        *,
        dataset_name: str | None = None,
        row: int | None = None,
        col: int | None = None,
        original_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.dataset_name = dataset_name
        self.row = row
        self.col = col
        self.original_traceback = original_traceback


class StorageError(ZarrOrchError, OSError):
    """Reading or writing storage failed: a missing bucket, denied access, or an object store
    that stayed unreachable through every retry. The message names the URL, never a credential.
    """
