"""``AwsKmsHierarchyProvider``: data keys wrapped by branch keys (the MPL Hierarchical keyring).

Why: with ``aws-kms`` every recording costs one KMS GenerateDataKey and every
playback one KMS Decrypt, so KMS latency, bills and outages sit on the
recording path. Here each tenant has a *branch key* kept in a DynamoDB key
store, protected by a KMS key; the official Material Providers Library's
Hierarchical keyring fetches it (one DynamoDB read + one KMS Decrypt) and
caches it for ``cache_ttl`` seconds. Every recording still gets its own
random data key, wrapped by a key derived from the branch key, the recording's
encryption context and a fresh salt; only that wrapping goes through the MPL
(``on_encrypt``/``on_decrypt`` on materials we build with our own data key),
our framing stays. The EDKs are the MPL's (provider id ``aws-kms-hierarchy``),
so the official ``aws-encryption-sdk`` with a Hierarchical keyring on the same
key store decrypts our objects, and we decrypt its messages.

One cache is shared by every tenant's keyring (a StormTracking cache: when an
entry is missing, one caller fetches and the others wait for it, so a burst at
start costs one KMS call per branch key, not one per worker).

Which KMS key protects a branch key: the one ``branch_key_kms(branch_id)``
names (fsrecrypt's database, after ``rotate`` moved it), else
``key_store_kms_key``. The key store is used in its strict mode with that
key, so a branch key item planted in the table under another KMS key is
refused.

Tenant keys starting ``arn:`` or ``alias/`` are KMS keys used directly, as
``aws-kms`` does (tenants from before the switch keep working, and
``rotate`` can move them to a branch key). The MPL and boto3 are imported at
the top: :mod:`fsrecrypt.keys` imports this module only when this provider
is configured.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import boto3
from aws_cryptographic_material_providers.keystore import KeyStore
from aws_cryptographic_material_providers.keystore.config import KeyStoreConfig
from aws_cryptographic_material_providers.keystore.models import (
    CreateKeyInput,
    CreateKeyStoreInput,
    KMSConfigurationKmsKeyArn,
    VersionKeyInput,
)
from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
from aws_cryptographic_material_providers.mpl.models import (
    CacheTypeShared,
    CacheTypeStormTracking,
    CreateAwsKmsHierarchicalKeyringInput,
    CreateCryptographicMaterialsCacheInput,
    DecryptionMaterials,
    EncryptionMaterials,
    OnDecryptInput,
    OnEncryptInput,
    StormTrackingCache,
)
from aws_cryptographic_material_providers.mpl.models import (
    EncryptedDataKey as MplEncryptedDataKey,
)
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fsrecrypt.errors import (
    FsrecryptError,
    KeyAccessError,
    KeyProviderUnavailable,
    NoUsableDataKey,
)
from fsrecrypt.format import EncryptedDataKey
from fsrecrypt.keys import branch_items
from fsrecrypt.keys.awserrors import ARN_MISMATCH, aws_error, map_mpl_error, mentions
from fsrecrypt.keys.base import (
    DATA_KEY_BYTES,
    DIRECT_KMS_PREFIXES,
    KMS_PROVIDER_ID,
    DataKey,
    DataKeyAuthenticationFailed,
    KeyInfo,
    KeyProvider,
    validate_key_id,
)
from fsrecrypt.keys.kms import AwsKmsProvider, kms_key_ref

HIERARCHY_PROVIDER_ID = "aws-kms-hierarchy"
# salt 16 + IV 12 + branch key version 16 + wrapped data key 32 + tag 16.
EDK_CIPHERTEXT_BYTES = 92
_PARTITION = "fsrecrypt"
_ESDK_COMMIT_KEY_SUITE = b"\x04\x78"

BranchKeyKms = Callable[[str], str | None]


class _BranchKeyAdmin:
    """What operators do with branch keys: create, check, list, version, re-wrap, move.

    Kept apart from the per-recording wrapping (``AwsKmsHierarchyProvider``)
    so each class stays about one job; it relies on the provider's clients,
    key stores and KMS key lookup.
    """

    # Defined by AwsKmsHierarchyProvider (annotations only: no attribute is created here).
    table: str
    _lock: threading.RLock
    _kms_for: dict[str, tuple[str, float]]
    direct: AwsKmsProvider
    kms_client: BaseClient
    ddb_client: BaseClient
    key_store: Callable[..., KeyStore]
    kms_arn_for: Callable[..., str]
    key_for_edk: Callable[[EncryptedDataKey], str | None]
    decrypt_data_key: Callable[..., bytes]
    _wrap: Callable[..., EncryptedDataKey]

    def version_branch_key(self, branch_key_id: str) -> None:
        """A new active version of ``branch_key_id``; older versions keep decrypting."""
        validate_key_id(branch_key_id)
        store = self.key_store(self.kms_arn_for(branch_key_id, refresh=True))
        try:
            store.version_key(VersionKeyInput(branch_key_identifier=branch_key_id))
        except Exception as exc:  # noqa: BLE001
            raise map_mpl_error(exc, f"versioning branch key {branch_key_id}") from None

    def create_store(self) -> str:
        """Create the DynamoDB key store table (idempotent); returns its ARN."""
        try:
            out = self.key_store().create_key_store(CreateKeyStoreInput())
        except Exception as exc:  # noqa: BLE001
            raise map_mpl_error(exc, f"creating key store {self.table}") from None
        return str(out.table_arn)

    def list_keys(self) -> list[KeyInfo]:
        out: list[KeyInfo] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "FilterExpression": "#t = :active",
            "ExpressionAttributeNames": {"#t": branch_items.ITEM_TYPE},
            "ExpressionAttributeValues": {":active": {"S": branch_items.ACTIVE}},
        }
        while True:
            page = self._ddb("scan", **kwargs)
            for item in page.get("Items", []):
                version = item.get("version", {}).get("S", "").rpartition(":")[2]
                out.append(
                    KeyInfo(
                        key_id=item[branch_items.BRANCH_KEY_ID]["S"],
                        created_at=item.get("create-time", {}).get("S"),
                        description=f"version {version} kms {branch_items.item_kms_arn(item)}",
                    )
                )
            if not page.get("LastEvaluatedKey"):
                return sorted(out, key=lambda k: k.key_id)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def create_key(self, key_id: str) -> str:
        """A new branch key under ``key_store_kms_key``; ``new`` lets the MPL pick a UUID."""
        if key_id == "new":
            request = CreateKeyInput()
        else:
            validate_key_id(key_id)
            if key_id.startswith(DIRECT_KMS_PREFIXES):
                raise KeyAccessError(
                    f"branch key id {key_id!r} looks like a KMS key",
                    hint="Branch key ids must not start with 'arn:' or 'alias/'; use 'new'.",
                )
            # The MPL requires a custom context with a caller-chosen id; it is
            # bound to the branch key (aws-crypto-ec:fsrecrypt in its items).
            request = CreateKeyInput(
                branch_key_identifier=key_id, encryption_context={"fsrecrypt": "branch-key"}
            )
        try:
            out = self.key_store().create_key(request)
        except Exception as exc:  # noqa: BLE001
            raise map_mpl_error(exc, f"creating a branch key in {self.table}") from None
        return str(out.branch_key_identifier)

    def check_key(self, key_id: str) -> None:
        """Wrap a throw-away data key: proves the branch key and its KMS key work (cached)."""
        if key_id.startswith(DIRECT_KMS_PREFIXES):
            self.direct.check_key(key_id)
            return
        validate_key_id(key_id)
        self._wrap(key_id, os.urandom(DATA_KEY_BYTES), {"fsrecrypt-purpose": "key-check"})

    def rewrap(
        self, edk: EncryptedDataKey, context: Mapping[str, str], new_key_id: str
    ) -> EncryptedDataKey:
        """The same data key under ``new_key_id``: a branch key, or a KMS key used directly.

        From a direct KMS EDK to a KMS key this is KMS ReEncrypt, as with
        ``aws-kms``; every other way unwraps and wraps in memory.
        """
        if self.key_for_edk(edk) is None:
            raise NoUsableDataKey(f"cannot rewrap a {edk.provider_id!r} data key with branch keys")
        if new_key_id.startswith(DIRECT_KMS_PREFIXES):
            if self.direct.key_for_edk(edk) is not None:
                return self.direct.rewrap(edk, context, new_key_id)
            data_key = self.decrypt_data_key([edk], context)
            return self._kms_encrypt(new_key_id, data_key, context)
        validate_key_id(new_key_id)
        data_key = self.decrypt_data_key([edk], context)
        return self._wrap(new_key_id, data_key, context)

    def _kms_encrypt(
        self, key_id: str, data_key: bytes, context: Mapping[str, str]
    ) -> EncryptedDataKey:
        ref = kms_key_ref(key_id)
        resp = self.direct._call(
            "encrypt", ref, KeyId=ref, Plaintext=data_key, EncryptionContext=dict(context)
        )
        return EncryptedDataKey(
            provider_id=KMS_PROVIDER_ID,
            provider_info=str(resp["KeyId"]).encode("utf-8"),
            ciphertext=bytes(resp["CiphertextBlob"]),
        )

    # -- moving branch keys between KMS keys ----------------------------------------

    def resolve_kms_key(self, ref: str) -> str:
        """The key ARN for a KMS key id, ARN or alias, checked to be an enabled symmetric key."""
        from_ref = kms_key_ref(ref)
        try:
            meta = self.kms_client.describe_key(KeyId=from_ref)["KeyMetadata"]
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"KMS DescribeKey for {from_ref}") from None
        if meta.get("KeyState", "Enabled") != "Enabled":
            raise KeyAccessError(f"KMS key {from_ref} is {meta.get('KeyState')}, not Enabled")
        if meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
            raise KeyAccessError(f"KMS key {from_ref} is not an ENCRYPT_DECRYPT key")
        return str(meta["Arn"])

    def move_branch_key(
        self, branch_key_id: str, from_arn: str, to_arn: str
    ) -> branch_items.BranchKeyMove:
        """Re-wrap every item of ``branch_key_id`` under ``to_arn`` (see ``branch_items``)."""
        validate_key_id(branch_key_id)
        moved = branch_items.move_branch_key(
            self.ddb_client,
            self.kms_client,
            table=self.table,
            logical_name=self.table,
            branch_key_id=branch_key_id,
            from_arn=from_arn,
            to_arn=to_arn,
        )
        with self._lock:
            self._kms_for.pop(branch_key_id, None)
        return moved

    def _ddb(self, op: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return dict(getattr(self.ddb_client, op)(**kwargs))
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"DynamoDB {op} on {self.table}") from None


class AwsKmsHierarchyProvider(_BranchKeyAdmin, KeyProvider):
    """Branch keys in a DynamoDB key store, the MPL Hierarchical keyring, one shared cache.

    ``key_id`` in the :class:`KeyProvider` interface is a branch key id, or a
    KMS key ARN/alias used directly (``self.direct``). Clients, key stores and
    keyrings are built on first use and kept (one key store per KMS key, one
    keyring per branch key), under a lock.
    """

    name = "aws-kms-hierarchy"

    def __init__(
        self,
        *,
        table: str,
        kms_key_arn: str,
        region: str,
        endpoint_url: str | None = None,
        cache_ttl: int = 900,
        branch_key_kms: BranchKeyKms | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        self.table = table
        self.kms_key_arn = kms_key_arn
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.cache_ttl = cache_ttl
        self._branch_key_kms = branch_key_kms
        # Tenant keys that are KMS keys (from before the switch to branch keys)
        # and their recordings go to KMS directly, one call each, as before.
        self.direct = AwsKmsProvider(
            region,
            self.endpoint_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )
        self._client_config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
        )
        self._lock = threading.RLock()
        self._clients: dict[str, BaseClient] = {}
        self._mpl: AwsCryptographicMaterialProviders | None = None
        self._cache: Any = None
        self._suite: Any = None
        self._stores: dict[str, KeyStore] = {}
        self._keyrings: dict[tuple[str, str], Any] = {}
        self._kms_for: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return (
            f"AwsKmsHierarchyProvider(table={self.table!r}, region={self.region!r}, "
            f"endpoint_url={self.endpoint_url!r})"
        )

    # -- clients, key stores, keyrings -------------------------------------------

    def _client(self, service: str) -> BaseClient:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = boto3.session.Session().client(
                    service,
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=self._client_config,
                )
            return self._clients[service]

    @property
    def kms_client(self) -> BaseClient:
        """The KMS client every key store uses (tests count its calls with event hooks)."""
        return self._client("kms")

    @property
    def ddb_client(self) -> BaseClient:
        return self._client("dynamodb")

    def _materials(self) -> tuple[AwsCryptographicMaterialProviders, Any]:
        with self._lock:
            if self._mpl is None:
                mpl = AwsCryptographicMaterialProviders(MaterialProvidersConfig())
                # The MPL's default storm settings (refresh in the last 10 s of
                # an entry, one fetch per key per second, waiters give up after
                # 10 s), shrunk for a short TTL so an entry is not always "due",
                # but never below 2 s: a waiter must outlast one grace interval
                # (1 s) to take over a slow fetch instead of failing.
                grace = min(10, max(2, self.cache_ttl // 10))
                self._cache = mpl.create_cryptographic_materials_cache(
                    CreateCryptographicMaterialsCacheInput(
                        cache=CacheTypeStormTracking(
                            StormTrackingCache(
                                entry_capacity=1000,
                                entry_pruning_tail_size=1,
                                grace_period=grace,
                                grace_interval=1,
                                fan_out=20,
                                in_flight_ttl=grace,
                                sleep_milli=20,
                            )
                        )
                    )
                )
                self._suite = mpl.get_algorithm_suite_info(_ESDK_COMMIT_KEY_SUITE)
                self._mpl = mpl
            return self._mpl, self._suite

    def key_store(self, kms_arn: str | None = None) -> KeyStore:
        """The MPL key store in strict mode for ``kms_arn`` (default ``key_store_kms_key``)."""
        arn = kms_arn or self.kms_key_arn
        with self._lock:
            if arn not in self._stores:
                self._stores[arn] = KeyStore(
                    KeyStoreConfig(
                        ddb_table_name=self.table,
                        logical_key_store_name=self.table,
                        kms_configuration=KMSConfigurationKmsKeyArn(arn),
                        ddb_client=self.ddb_client,
                        kms_client=self.kms_client,
                    )
                )
            return self._stores[arn]

    def kms_arn_for(self, branch_key_id: str, *, refresh: bool = False) -> str:
        """The KMS key that protects ``branch_key_id`` (re-asked at most once per cache TTL)."""
        now = time.monotonic()
        with self._lock:
            cached = self._kms_for.get(branch_key_id)
        if cached is not None and not refresh and cached[1] > now:
            return cached[0]
        arn = (self._branch_key_kms(branch_key_id) if self._branch_key_kms else None) or (
            self.kms_key_arn
        )
        with self._lock:
            self._kms_for[branch_key_id] = (arn, now + self.cache_ttl)
        return arn

    def keyring(self, branch_key_id: str, *, refresh: bool = False) -> Any:
        """The Hierarchical keyring for one branch key, on the shared cache."""
        mpl, _suite = self._materials()
        arn = self.kms_arn_for(branch_key_id, refresh=refresh)
        with self._lock:
            ring = self._keyrings.get((arn, branch_key_id))
            if ring is None:
                ring = mpl.create_aws_kms_hierarchical_keyring(
                    CreateAwsKmsHierarchicalKeyringInput(
                        key_store=self.key_store(arn),
                        branch_key_id=branch_key_id,
                        ttl_seconds=self.cache_ttl,
                        cache=CacheTypeShared(self._cache),
                        partition_id=_PARTITION,
                    )
                )
                self._keyrings[(arn, branch_key_id)] = ring
            return ring

    def _with_keyring(self, branch_key_id: str, where: str, use: Callable[[Any], Any]) -> Any:
        """Run ``use(keyring)``; a branch key moved to another KMS key is looked up again once."""
        try:
            return use(self.keyring(branch_key_id))
        except FsrecryptError:
            raise  # ours already (a database lookup of the KMS key, a key error)
        except Exception as exc:  # noqa: BLE001 - the MPL raises its own unrelated types
            if not mentions(exc, ARN_MISMATCH) or self._branch_key_kms is None:
                raise map_mpl_error(exc, where) from None
        try:
            return use(self.keyring(branch_key_id, refresh=True))
        except FsrecryptError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise map_mpl_error(exc, where) from None

    # -- KeyProvider ---------------------------------------------------------------

    def _wrap(self, branch_key_id: str, data_key: bytes, context: Mapping[str, str]) -> Any:
        _mpl, suite = self._materials()
        materials = EncryptionMaterials(
            algorithm_suite=suite,
            encryption_context=dict(context),
            encrypted_data_keys=[],
            required_encryption_context_keys=[],
            plaintext_data_key=data_key,
        )
        out = self._with_keyring(
            branch_key_id,
            f"wrapping a data key with branch key {branch_key_id}",
            lambda ring: ring.on_encrypt(OnEncryptInput(materials=materials)).materials,
        )
        (edk,) = out.encrypted_data_keys
        return EncryptedDataKey(
            provider_id=str(edk.key_provider_id),
            provider_info=bytes(edk.key_provider_info),
            ciphertext=bytes(edk.ciphertext),
        )

    def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        if key_id.startswith(DIRECT_KMS_PREFIXES):
            return self.direct.generate_data_key(key_id, context)
        validate_key_id(key_id)
        data_key = os.urandom(DATA_KEY_BYTES)
        return DataKey(
            plaintext=data_key, encrypted=self._wrap(key_id, data_key, context), key_id=key_id
        )

    def decrypt_data_key(
        self, edks: Sequence[EncryptedDataKey], context: Mapping[str, str]
    ) -> bytes:
        _mpl, suite = self._materials()
        failed: KeyAccessError | None = None
        seen = False
        for edk in edks:
            branch_key_id = self._branch_key_of(edk)
            if branch_key_id is None:
                continue
            seen = True
            if len(edk.ciphertext) != EDK_CIPHERTEXT_BYTES:
                failed = DataKeyAuthenticationFailed(
                    f"data key wrapped by branch key {branch_key_id} has the wrong length"
                )
                continue
            materials = DecryptionMaterials(
                algorithm_suite=suite,
                encryption_context=dict(context),
                required_encryption_context_keys=[],
            )
            mpl_edk = MplEncryptedDataKey(
                key_provider_id=HIERARCHY_PROVIDER_ID,
                key_provider_info=edk.provider_info,
                ciphertext=edk.ciphertext,
            )
            try:
                out = self._with_keyring(
                    branch_key_id,
                    f"unwrapping a data key with branch key {branch_key_id}",
                    lambda ring, m=materials, e=mpl_edk: (
                        ring.on_decrypt(
                            OnDecryptInput(materials=m, encrypted_data_keys=[e])
                        ).materials
                    ),
                )
            except KeyProviderUnavailable:
                raise  # transient: another EDK will not fare better; let the caller retry
            except KeyAccessError as exc:
                if failed is None or isinstance(exc, DataKeyAuthenticationFailed):
                    failed = exc
                continue
            plaintext = bytes(out.plaintext_data_key or b"")
            if len(plaintext) != DATA_KEY_BYTES:
                raise KeyAccessError(f"branch key {branch_key_id} unwrapped a wrong-size data key")
            return plaintext
        direct = [e for e in edks if self.direct.key_for_edk(e) is not None]
        if direct:
            return self.direct.decrypt_data_key(direct, context)
        if failed is not None:
            raise failed
        if seen:
            raise NoUsableDataKey("no usable branch key data key in this message")
        raise NoUsableDataKey("no encrypted data key from the branch key store in this message")

    def key_for_edk(self, edk: EncryptedDataKey) -> str | None:
        """The branch key id, or the KMS key ARN of a direct KMS EDK; None if neither."""
        return self._branch_key_of(edk) or self.direct.key_for_edk(edk)

    @staticmethod
    def _branch_key_of(edk: EncryptedDataKey) -> str | None:
        if edk.provider_id != HIERARCHY_PROVIDER_ID:
            return None
        try:
            branch_key_id = edk.provider_info.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return branch_key_id if _BRANCH_ID_RE.fullmatch(branch_key_id) else None


_BRANCH_ID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
