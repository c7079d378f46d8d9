"""``AwsKmsProvider``: data keys from AWS KMS, the encryption context on every call.

The context reaches KMS so key policies and CloudTrail see tenant and
recording ids. boto3 and botocore are imported here, at the top:
:mod:`fsrecrypt.keys` imports this module only when KMS is configured or
``AwsKmsProvider`` is named, so the local path (CLI, tests, small installs)
never pays for importing botocore.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from fsrecrypt.errors import (
    KeyAccessError,
    KeyExists,
    KeyNotFound,
    KeyProviderUnavailable,
    NoUsableDataKey,
)
from fsrecrypt.format import EncryptedDataKey
from fsrecrypt.keys.awserrors import client_error
from fsrecrypt.keys.base import (
    DATA_KEY_BYTES,
    KMS_PROVIDER_ID,
    DataKey,
    DataKeyAuthenticationFailed,
    KeyInfo,
    KeyProvider,
)

_UUID_RE = re.compile(
    r"(mrk-)?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12}|mrk-[0-9a-fA-F]{32}"
)
_ALIAS_RE = re.compile(r"alias/[A-Za-z0-9/_-]{1,250}")


def kms_key_ref(key_id: str) -> str:
    """The KMS ``KeyId`` for ``key_id``: ARNs, UUIDs, ``alias/x`` as given; ``x`` -> ``alias/x``.

    Tenants are configured with short names (``acme``) as often as with ARNs;
    a bare name can only mean an alias.
    """
    if key_id.startswith(("arn:", "alias/")) or _UUID_RE.fullmatch(key_id):
        return key_id
    return f"alias/{key_id}"


class AwsKmsProvider(KeyProvider):
    """Data keys from AWS KMS (GenerateDataKey / Decrypt / ReEncrypt).

    The boto3 client is built on first use and then shared: boto3 clients are
    thread-safe, sessions are not, so creation happens once under a lock.
    Timeouts are short and retries use botocore's "standard" mode so a dead
    endpoint surfaces as ``KeyProviderUnavailable`` within seconds instead
    of stalling a worker for minutes.
    """

    name = "aws-kms"

    def __init__(
        self,
        region: str,
        endpoint_url: str | None = None,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url or None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._client: BaseClient | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AwsKmsProvider(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self) -> BaseClient:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    session = boto3.session.Session()
                    self._client = session.client(
                        "kms",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=Config(
                            connect_timeout=self._connect_timeout,
                            read_timeout=self._read_timeout,
                            retries={"mode": "standard", "max_attempts": self._max_attempts},
                        ),
                    )
        return self._client

    def _call(self, op: str, key_ref: str, **kwargs: Any) -> dict[str, Any]:
        """Call a KMS operation, translating botocore errors into our hierarchy."""
        try:
            return dict(getattr(self.client, op)(**kwargs))
        except ClientError as exc:
            raise _map_client_error(exc, op, key_ref) from None
        except BotoCoreError as exc:
            raise _map_botocore_error(exc, op, key_ref, self.endpoint_url) from None

    def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        ref = kms_key_ref(key_id)
        resp = self._call(
            "generate_data_key",
            ref,
            KeyId=ref,
            KeySpec="AES_256",
            EncryptionContext=dict(context),
        )
        arn = str(resp["KeyId"])
        if not arn.startswith("arn:"):
            raise KeyAccessError(f"KMS GenerateDataKey for {ref} did not return a key ARN")
        return DataKey(
            plaintext=bytes(resp["Plaintext"]),
            encrypted=EncryptedDataKey(
                provider_id=KMS_PROVIDER_ID,
                provider_info=arn.encode("utf-8"),
                ciphertext=bytes(resp["CiphertextBlob"]),
            ),
            key_id=arn,
        )

    def wrap_data_key(
        self, key_id: str, data_key: bytes, context: Mapping[str, str]
    ) -> EncryptedDataKey:
        """``data_key`` (generated elsewhere) wrapped by ``key_id`` with KMS Encrypt (escrow)."""
        ref = kms_key_ref(key_id)
        resp = self._call(
            "encrypt", ref, KeyId=ref, Plaintext=data_key, EncryptionContext=dict(context)
        )
        arn = str(resp["KeyId"])
        if not arn.startswith("arn:"):
            raise KeyAccessError(f"KMS Encrypt for {ref} did not return a key ARN")
        return EncryptedDataKey(
            provider_id=KMS_PROVIDER_ID,
            provider_info=arn.encode("utf-8"),
            ciphertext=bytes(resp["CiphertextBlob"]),
        )

    def decrypt_data_key(
        self, edks: Sequence[EncryptedDataKey], context: Mapping[str, str]
    ) -> bytes:
        errors: list[KeyAccessError] = []
        for edk in edks:
            arn = self.key_for_edk(edk)
            if arn is None:
                continue
            try:
                resp = self._call(
                    "decrypt",
                    arn,
                    CiphertextBlob=edk.ciphertext,
                    EncryptionContext=dict(context),
                    KeyId=arn,
                )
            except KeyProviderUnavailable:
                raise  # transient: another EDK will not fare better; let the caller retry
            except KeyAccessError as exc:
                errors.append(exc)
                continue
            plaintext = bytes(resp["Plaintext"])
            if len(plaintext) != DATA_KEY_BYTES:
                raise KeyAccessError(f"KMS returned a data key of the wrong size for {arn}")
            return plaintext
        if not errors:
            raise NoUsableDataKey("no encrypted data key from AWS KMS in this message")
        for exc in errors:
            if isinstance(exc, DataKeyAuthenticationFailed):
                raise exc
        raise errors[0]

    def rewrap(
        self, edk: EncryptedDataKey, context: Mapping[str, str], new_key_id: str
    ) -> EncryptedDataKey:
        source = self.key_for_edk(edk)
        if source is None:
            raise NoUsableDataKey(f"cannot rewrap a {edk.provider_id!r} data key with AWS KMS")
        dest = kms_key_ref(new_key_id)
        resp = self._call(
            "re_encrypt",
            source,
            CiphertextBlob=edk.ciphertext,
            SourceEncryptionContext=dict(context),
            SourceKeyId=source,
            DestinationKeyId=dest,
            DestinationEncryptionContext=dict(context),
        )
        arn = str(resp["KeyId"])
        return EncryptedDataKey(
            provider_id=KMS_PROVIDER_ID,
            provider_info=arn.encode("utf-8"),
            ciphertext=bytes(resp["CiphertextBlob"]),
        )

    def create_key(self, key_id: str) -> str:
        alias = key_id if key_id.startswith("alias/") else f"alias/{key_id}"
        if not _ALIAS_RE.fullmatch(alias) or alias.startswith("alias/aws/"):
            raise KeyAccessError(
                f"invalid KMS alias {alias!r}",
                hint="Aliases are alias/ followed by A-Z a-z 0-9 / _ - (not alias/aws/).",
            )
        try:
            self._call("describe_key", alias, KeyId=alias)
        except KeyNotFound:
            pass
        else:
            raise KeyExists(f"KMS alias {alias} already exists")
        meta = self._call(
            "create_key",
            alias,
            Description=f"fsrecrypt wrapping key {alias}",
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            Tags=[{"TagKey": "fsrecrypt", "TagValue": alias}],
        )["KeyMetadata"]
        arn = str(meta["Arn"])
        try:
            self._call("create_alias", alias, AliasName=alias, TargetKeyId=arn)
        except KeyAccessError as exc:
            # Lost a race (or were refused): do not leave an unnamed key behind.
            with contextlib.suppress(KeyAccessError):
                self._call("schedule_key_deletion", arn, KeyId=arn, PendingWindowInDays=7)
            if "AlreadyExists" in exc.message:
                raise KeyExists(f"KMS alias {alias} already exists") from None
            raise
        return arn

    def list_keys(self) -> list[KeyInfo]:
        out: list[KeyInfo] = []
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Limit": 100}
            if marker:
                kwargs["Marker"] = marker
            resp = self._call("list_aliases", "*", **kwargs)
            for alias in resp.get("Aliases", []):
                name = str(alias.get("AliasName", ""))
                target = alias.get("TargetKeyId")
                if not target or name.startswith("alias/aws/"):
                    continue
                created = alias.get("CreationDate")
                out.append(
                    KeyInfo(
                        key_id=name,
                        created_at=created.isoformat() if created is not None else None,
                        description=f"key {target}",
                    )
                )
            if not resp.get("Truncated"):
                break
            marker = resp.get("NextMarker")
        return sorted(out, key=lambda k: k.key_id)

    def check_key(self, key_id: str) -> None:
        ref = kms_key_ref(key_id)
        meta = self._call("describe_key", ref, KeyId=ref)["KeyMetadata"]
        state = meta.get("KeyState", "Enabled")
        if state != "Enabled" or meta.get("Enabled") is False:
            raise KeyAccessError(f"KMS key {ref} is {state}, not Enabled")
        if meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
            raise KeyAccessError(f"KMS key {ref} is not an ENCRYPT_DECRYPT key")

    def key_for_edk(self, edk: EncryptedDataKey) -> str | None:
        if edk.provider_id != KMS_PROVIDER_ID:
            return None
        try:
            return edk.provider_info.decode("utf-8")
        except UnicodeDecodeError:
            return None

    # Signing (audit anchors): an asymmetric ECC_NIST_P256 SIGN_VERIFY key.

    def sign(self, key_id: str, message: bytes) -> bytes:
        """ECDSA_SHA_256 signature (DER) of ``message`` (RAW, at most 4096 bytes) by KMS."""
        ref = kms_key_ref(key_id)
        resp = self._call(
            "sign",
            ref,
            KeyId=ref,
            Message=message,
            MessageType="RAW",
            SigningAlgorithm="ECDSA_SHA_256",
        )
        return bytes(resp["Signature"])

    def public_key(self, key_id: str) -> bytes:
        """The key's public half (DER SubjectPublicKeyInfo); refused unless it is SIGN_VERIFY."""
        ref = kms_key_ref(key_id)
        resp = self._call("get_public_key", ref, KeyId=ref)
        if resp.get("KeyUsage", "SIGN_VERIFY") != "SIGN_VERIFY":
            raise KeyAccessError(
                f"KMS key {ref} is not a SIGN_VERIFY key",
                hint="Create one with key spec ECC_NIST_P256 and key usage SIGN_VERIFY.",
            )
        return bytes(resp["PublicKey"])


def _map_client_error(exc: Any, op: str, key_ref: str) -> KeyAccessError:
    """Turn a botocore ClientError into the matching typed error (codes only, no bodies)."""
    return client_error(exc, f"KMS {op} for {key_ref}", not_found="key not found")


def _map_botocore_error(exc: Any, op: str, key_ref: str, endpoint: str | None) -> KeyAccessError:
    where = f"KMS {op} for {key_ref}"
    if isinstance(exc, HTTPClientError | BotoConnectionError):  # timeouts, refused, reset
        return KeyProviderUnavailable(
            f"{where}: cannot reach KMS{f' at {endpoint}' if endpoint else ''} "
            f"({type(exc).__name__})"
        )
    if isinstance(exc, NoCredentialsError | NoRegionError):
        return KeyAccessError(
            f"{where}: {type(exc).__name__}",
            hint="Give the fsrecrypt service AWS credentials (role, environment) and a region.",
        )
    return KeyAccessError(f"{where}: {type(exc).__name__}")
