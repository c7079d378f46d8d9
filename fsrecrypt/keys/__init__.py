"""Key providers: who wraps and unwraps each recording's data key.

Every recording gets a fresh 32-byte data key; only its *wrapped* form
(an ESDK encrypted data key, EDK) is stored in the message header.

* ``base.py``: the ``KeyProvider`` interface, ``DataKey``, ``KeyInfo``.
* ``local.py``: ``LocalKeyring``, the embedded default (ESDK raw-AES EDKs).
* ``kms.py``: ``AwsKmsProvider``; it imports boto3 at its top, so this
  package loads it in one place: :func:`build_key_provider` when KMS is
  configured, or when ``AwsKmsProvider``/``kms_key_ref`` is looked up here
  (``__getattr__``, PEP 562). Importing this package never imports boto3.
* ``hierarchy.py``: ``AwsKmsHierarchyProvider`` (branch keys in a DynamoDB key
  store, the Material Providers Library's Hierarchical keyring), with
  ``branch_items.py`` (moving a branch key to another KMS key) and
  ``awserrors.py``; loaded the same way, only for ``aws-kms-hierarchy``, so
  the MPL is imported only when it is configured.

The package imports neither the database, the stores, the pipeline nor the
command line (checked by ``tests/test_layout.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fsrecrypt.config import KeysConfig
from fsrecrypt.errors import KeyAccessError
from fsrecrypt.keys.base import (
    DATA_KEY_BYTES,
    DIRECT_KMS_PREFIXES,
    KMS_PROVIDER_ID,
    LOCAL_PROVIDER_ID,
    DataKey,
    DataKeyAuthenticationFailed,
    KeyInfo,
    KeyProvider,
    validate_key_id,
)
from fsrecrypt.keys.local import LocalKeyring

if TYPE_CHECKING:
    from fsrecrypt.keys.hierarchy import AwsKmsHierarchyProvider, BranchKeyKms
    from fsrecrypt.keys.kms import AwsKmsProvider, kms_key_ref

__all__ = [
    "DATA_KEY_BYTES",
    "DIRECT_KMS_PREFIXES",
    "KMS_PROVIDER_ID",
    "LOCAL_PROVIDER_ID",
    "AwsKmsHierarchyProvider",
    "AwsKmsProvider",
    "DataKey",
    "DataKeyAuthenticationFailed",
    "KeyInfo",
    "KeyProvider",
    "LocalKeyring",
    "build_key_provider",
    "kms_key_ref",
    "validate_key_id",
]

# Names of fsrecrypt.keys.kms (which imports boto3) this package re-exports lazily.
_KMS_NAMES = frozenset({"AwsKmsProvider", "kms_key_ref"})
# ... and of fsrecrypt.keys.hierarchy (boto3 and the Material Providers Library).
_HIERARCHY_NAMES = frozenset({"AwsKmsHierarchyProvider"})


def __getattr__(name: str) -> Any:
    """``from fsrecrypt.keys import AwsKmsProvider`` works, importing boto3 only then."""
    if name in _KMS_NAMES:
        from fsrecrypt.keys import kms

        return getattr(kms, name)
    if name in _HIERARCHY_NAMES:
        from fsrecrypt.keys import hierarchy

        return getattr(hierarchy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_key_provider(
    cfg: KeysConfig, *, branch_key_kms: BranchKeyKms | None = None
) -> KeyProvider:
    """The provider named by ``[keys] provider``.

    ``branch_key_kms(branch_key_id)`` (hierarchy only) names the KMS key a
    branch key was moved to, when it is not ``key_store_kms_key``.
    """
    if cfg.provider == "local":
        return LocalKeyring(cfg.keyring)
    if cfg.provider == "aws-kms":
        from fsrecrypt.keys.kms import AwsKmsProvider

        return AwsKmsProvider(region=cfg.region, endpoint_url=cfg.endpoint_url or None)
    if cfg.provider == "aws-kms-hierarchy":
        from fsrecrypt.keys.hierarchy import AwsKmsHierarchyProvider

        return AwsKmsHierarchyProvider(
            table=cfg.key_store_table,
            kms_key_arn=cfg.key_store_kms_key,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url or None,
            cache_ttl=cfg.cache_ttl,
            branch_key_kms=branch_key_kms,
        )
    raise KeyAccessError(f"unknown key provider {cfg.provider!r}")
