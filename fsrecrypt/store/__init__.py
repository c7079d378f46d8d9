"""Object stores for encrypted recordings: a local directory or S3.

:mod:`~fsrecrypt.store.base` holds the contract every store keeps
(:class:`ObjectStore`) and the shared types; :mod:`~fsrecrypt.store.local`
and :mod:`~fsrecrypt.store.s3` the two implementations; :func:`build_store`
picks one from the configuration.

Importing this package does not import boto3: :mod:`~fsrecrypt.store.s3`
imports boto3 at its top, and this package loads that module in one place,
:func:`build_store` when S3 is configured, or when one of its names
(``S3Store``, the part sizes) is looked up here (``__getattr__``, PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fsrecrypt.config import StorageConfig
from fsrecrypt.store.base import (
    READ_CHUNK,
    InvalidObjectKey,
    LockState,
    ObjectAccessDenied,
    ObjectChanged,
    ObjectInfo,
    ObjectStore,
    StorageAccessError,
    object_key,
)
from fsrecrypt.store.local import LocalStore

if TYPE_CHECKING:
    from fsrecrypt.store.s3 import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, S3Store

__all__ = [
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "READ_CHUNK",
    "InvalidObjectKey",
    "LocalStore",
    "LockState",
    "ObjectAccessDenied",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "StorageAccessError",
    "build_store",
    "object_key",
]

# Names of fsrecrypt.store.s3 (which imports boto3) this package re-exports lazily.
_S3_NAMES = frozenset({"MAX_PARTS", "MAX_PART_SIZE", "MIN_PART_SIZE", "S3Store"})


def __getattr__(name: str) -> Any:
    """``from fsrecrypt.store import S3Store`` works, importing boto3 only then."""
    if name in _S3_NAMES:
        from fsrecrypt.store import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_store(cfg: StorageConfig, *, retention_days: int = 0) -> ObjectStore:
    """The store named by ``[storage] backend``.

    ``retention_days`` (``[retention] days``) is the Object Lock retention
    new objects get when ``[storage] object_lock`` is set.
    """
    if cfg.backend == "local":
        return LocalStore(cfg.path, prefix=cfg.prefix)
    if cfg.backend == "s3":
        from fsrecrypt.store.s3 import S3Store

        return S3Store(
            cfg.bucket,
            prefix=cfg.prefix,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url or None,
            sse=cfg.sse,
            sse_kms_key_id=cfg.sse_kms_key_id,
            part_size=cfg.part_size,
            max_pool_connections=cfg.max_pool_connections,
            object_lock=cfg.object_lock,
            retention_days=retention_days,
            governance_bypass=cfg.governance_bypass,
        )
    raise StorageAccessError(f"unknown storage backend {cfg.backend!r}")
