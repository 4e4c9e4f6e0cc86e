"""Which conf and storage-option keys hold secrets, and masking them before logs and metadata.

A base module (no zarr_orch imports) so the storage layer can mask credentials without
importing the orchestrator conf, which sits above the cluster layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: substrings of keys whose values are secrets (masked in get_conf, logs and metadata)
SECRET_KEY_PARTS = ("secret", "password", "token", "key", "credential", "session")
#: keys containing a secret-looking part that are nevertheless not secrets
NOT_SECRET_KEYS = frozenset({"run_key", "cars_ds_key", "key_prefix", "endpoint_url", "region"})
MASK = "***"


def is_secret_key(key: str) -> bool:
    """True when a conf/option key names a credential."""
    lowered = key.lower()
    if lowered in NOT_SECRET_KEYS:
        return False
    return any(part in lowered for part in SECRET_KEY_PARTS)


def mask_secrets(obj: Any) -> Any:
    """A deep copy of `obj` with the values of secret-looking keys replaced by '***'."""
    if isinstance(obj, Mapping):
        return {
            key: (
                MASK
                if isinstance(key, str) and is_secret_key(key) and value is not None
                else mask_secrets(value)
            )
            for key, value in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(mask_secrets(v) for v in obj)
    return obj
