"""Key providers: who wraps and unwraps each recording's data key.

Every recording gets a fresh 32-byte data key; only its *wrapped* form
(an ESDK encrypted data key, EDK) is stored in the message header. Two
providers exist:

* ``LocalKeyring`` - the embedded default: a 0600 JSON file of AES-256
  wrapping keys. Its EDKs use the ESDK raw-AES layout (the same bytes the
  official SDK's ``RawMasterKey`` with ``AES_256_GCM_IV12_TAG16_NO_PADDING``
  writes), so any ESDK configured with provider id ``fsrecrypt-local`` and the
  same key can open our recordings without fsrecrypt.
* ``AwsKmsProvider`` - AWS KMS, with the encryption context passed to every
  call so key policies and CloudTrail see tenant and recording ids.

boto3 is imported inside the KMS class only: the local path (CLI, tests,
small installs) must not pay for importing botocore.

Secrets never leave through a side door: ``DataKey.plaintext`` is excluded
from ``repr``, providers' ``repr`` names only paths/regions, and error
messages are built from key ids and error codes, never from material.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import stat
import struct
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fsrecrypt.config import KeysConfig
from fsrecrypt.errors import (
    KeyAccessError,
    KeyExists,
    KeyNotFound,
    KeyProviderUnavailable,
    KeyringPermissionError,
    NoUsableDataKey,
)
from fsrecrypt.format import EncryptedDataKey, serialize_context

if TYPE_CHECKING:  # pragma: no cover
    from botocore.client import BaseClient

LOCAL_PROVIDER_ID = "fsrecrypt-local"
KMS_PROVIDER_ID = "aws-kms"
DATA_KEY_BYTES = 32
_TAG_BITS = 128
_IV_BYTES = 12
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# provider_info suffix after the key name: u32 tag bits, u32 IV length, IV.
_RAW_INFO_SUFFIX = 4 + 4 + _IV_BYTES
_WRAPPED_BYTES = DATA_KEY_BYTES + _TAG_BITS // 8


class DataKeyAuthenticationFailed(KeyAccessError):
    """The wrapped data key did not authenticate under its wrapping key.

    Either the encryption context differs from the one it was wrapped with,
    the EDK bytes were altered, or the key with this id is not the key that
    wrapped it. Not transient: retrying cannot help.
    """

    hint = (
        "The encrypted data key does not match this key and encryption context; "
        "treat the object or its header as tampered, or check the tenant/recording ids"
    )


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: the plaintext for this one message, and its wrapped form.

    ``plaintext`` is kept out of ``repr``/``str`` so a stray log line or a
    traceback with locals cannot print it.
    """

    plaintext: bytes = field(repr=False)
    encrypted: EncryptedDataKey
    key_id: str

    def __post_init__(self) -> None:
        if len(self.plaintext) != DATA_KEY_BYTES:
            raise ValueError("a data key must be 32 bytes")


@dataclass(frozen=True)
class KeyInfo:
    """What ``keys list`` shows: identifiers and dates, never material."""

    key_id: str
    created_at: str | None
    description: str = ""


class KeyProvider(ABC):
    """Wraps, unwraps and rewraps data keys with a tenant's wrapping key."""

    name: str

    @abstractmethod
    def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        """A new random data key, wrapped by ``key_id`` and bound to ``context``."""

    @abstractmethod
    def decrypt_data_key(
        self, edks: Sequence[EncryptedDataKey], context: Mapping[str, str]
    ) -> bytes:
        """Unwrap the first EDK this provider can open.

        Raises ``NoUsableDataKey`` when none is ours (or the keys are gone),
        ``DataKeyAuthenticationFailed`` when one is ours but does not
        authenticate (wrong context, tampering).
        """

    @abstractmethod
    def rewrap(
        self, edk: EncryptedDataKey, context: Mapping[str, str], new_key_id: str
    ) -> EncryptedDataKey:
        """The same data key wrapped by ``new_key_id`` (key rotation, tenant moves)."""

    @abstractmethod
    def create_key(self, key_id: str) -> str:
        """Create a wrapping key; returns the id to store for the tenant."""

    @abstractmethod
    def list_keys(self) -> list[KeyInfo]:
        """Key ids and creation dates (never material)."""

    @abstractmethod
    def check_key(self, key_id: str) -> None:
        """Raise ``KeyNotFound``/``KeyAccessError`` unless the key can wrap now."""

    @abstractmethod
    def key_for_edk(self, edk: EncryptedDataKey) -> str | None:
        """The wrapping key id recorded in ``edk``, or None if it is not ours."""


# --- local keyring ---------------------------------------------------------------


def validate_key_id(key_id: str) -> str:
    """Key ids end up in EDKs, file names of logs and SQL rows: keep them boring."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise KeyAccessError(
            f"invalid key id {key_id!r}",
            hint="Key ids are 1-128 characters of A-Z a-z 0-9 . _ : / -.",
        )
    return key_id


def _aad(context: Mapping[str, str]) -> bytes:
    # The ESDK's raw keyring authenticates the context serialization without
    # its outer length; an empty context is the empty string (not b"\0\0").
    return serialize_context(context) if context else b""


def _raw_provider_info(key_id: str, iv: bytes) -> bytes:
    return key_id.encode("utf-8") + struct.pack(">II", _TAG_BITS, _IV_BYTES) + iv


def _parse_raw_provider_info(info: bytes) -> tuple[str, bytes] | None:
    """(key id, IV) from a raw-AES provider info, or None if it is not that layout."""
    if len(info) <= _RAW_INFO_SUFFIX:
        return None
    name, suffix = info[:-_RAW_INFO_SUFFIX], info[-_RAW_INFO_SUFFIX:]
    tag_bits, iv_len = struct.unpack(">II", suffix[:8])
    if tag_bits != _TAG_BITS or iv_len != _IV_BYTES:
        return None
    try:
        key_id = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return key_id, suffix[8:]


@dataclass(frozen=True)
class _Snapshot:
    """A parsed keyring file plus the stat fields that tell us it changed."""

    signature: tuple[int, int, int, int]
    keys: dict[str, tuple[bytes, str | None]] = field(repr=False)


class LocalKeyring(KeyProvider):
    """AES-256 wrapping keys in a 0600 JSON file.

    File layout: ``{"keys": {"<id>": {"material": "<base64, 32 bytes>",
    "created_at": "<ISO 8601>"}}}``. The file is re-read when it changes
    (stat signature), so keys created by ``fsrecrypt keys create`` in another
    process are seen by a running daemon without a restart.

    Why so strict about the file: it is the root of every recording's
    confidentiality. A keyring that group/others can read, a symlink (which
    could be swapped to point elsewhere) or a non-regular file is refused
    rather than used.
    """

    name = "local"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._snapshot: _Snapshot | None = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalKeyring({str(self.path)!r})"

    # -- file handling ------------------------------------------------------------

    def _check_stat(self, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise KeyringPermissionError(f"keyring {self.path} is a symlink; refusing to use it")
        if not stat.S_ISREG(st.st_mode):
            raise KeyringPermissionError(f"keyring {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyringPermissionError(
                f"keyring {self.path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "group/others must have no access"
            )

    def _read(self) -> _Snapshot | None:
        """The current keyring (None if the file does not exist), re-read if it changed."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyAccessError(f"cannot stat keyring {self.path}: {exc.strerror}") from None
        self._check_stat(st)
        sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._mutex:
            snap = self._snapshot
            if snap is not None and snap.signature == sig:
                return snap
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", 40):  # raced into a symlink
                raise KeyringPermissionError(
                    f"keyring {self.path} is a symlink; refusing to use it"
                ) from None
            raise KeyAccessError(f"cannot open keyring {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            self._check_stat(fst)  # the file we opened, not just the name we stat'ed
            raw = f.read()
        keys = self._parse(raw)
        snap = _Snapshot((fst.st_dev, fst.st_ino, fst.st_mtime_ns, fst.st_size), keys)
        with self._mutex:
            self._snapshot = snap
        return snap

    def _parse(self, raw: bytes) -> dict[str, tuple[bytes, str | None]]:
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            # The decoder's message could quote a fragment of the file: drop it.
            raise KeyAccessError(
                f"keyring {self.path} is not valid JSON",
                hint="Restore the keyring from its backup.",
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys", {}), dict):
            raise KeyAccessError(f"keyring {self.path}: expected an object with a 'keys' object")
        keys: dict[str, tuple[bytes, str | None]] = {}
        for key_id, entry in doc.get("keys", {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("material"), str):
                raise KeyAccessError(f"keyring {self.path}: key {key_id!r} has no material")
            try:
                material = base64.b64decode(entry["material"], validate=True)
            except (binascii.Error, ValueError):
                raise KeyAccessError(
                    f"keyring {self.path}: key {key_id!r} material is not base64"
                ) from None
            if len(material) != DATA_KEY_BYTES:
                raise KeyAccessError(
                    f"keyring {self.path}: key {key_id!r} material is not 32 bytes"
                )
            created = entry.get("created_at")
            keys[key_id] = (material, created if isinstance(created, str) else None)
        return keys

    def _material(self, key_id: str) -> bytes:
        snap = self._read()
        if snap is None or key_id not in snap.keys:
            raise KeyNotFound(f"key {key_id!r} is not in keyring {self.path}")
        return snap.keys[key_id][0]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize writers across processes.

        The lock is a separate file because the keyring itself is replaced by
        rename: a lock held on the old inode would not stop a second writer
        that opened the new one.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_atomic(self, doc: dict[str, Any]) -> None:
        """Write the whole keyring via temp file + fsync + rename + directory fsync.

        A crash leaves either the old or the new keyring, never a torn one, and
        the temp file is 0600 from its first byte (mkstemp).
        """
        data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- KeyProvider --------------------------------------------------------------

    def _wrap(self, key_id: str, data_key: bytes, context: Mapping[str, str]) -> EncryptedDataKey:
        material = self._material(key_id)
        iv = os.urandom(_IV_BYTES)
        ciphertext = AESGCM(material).encrypt(iv, data_key, _aad(context))
        return EncryptedDataKey(
            provider_id=LOCAL_PROVIDER_ID,
            provider_info=_raw_provider_info(key_id, iv),
            ciphertext=ciphertext,
        )

    def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        validate_key_id(key_id)
        data_key = os.urandom(DATA_KEY_BYTES)
        return DataKey(
            plaintext=data_key, encrypted=self._wrap(key_id, data_key, context), key_id=key_id
        )

    def decrypt_data_key(
        self, edks: Sequence[EncryptedDataKey], context: Mapping[str, str]
    ) -> bytes:
        snap = self._read()
        held = snap.keys if snap is not None else {}
        seen: list[str] = []
        failed: list[str] = []
        aad = _aad(context)
        for edk in edks:
            if edk.provider_id != LOCAL_PROVIDER_ID:
                continue
            parsed = _parse_raw_provider_info(edk.provider_info)
            if parsed is None:
                continue
            key_id, iv = parsed
            seen.append(key_id)
            if key_id not in held or len(edk.ciphertext) != _WRAPPED_BYTES:
                continue
            try:
                data_key = AESGCM(held[key_id][0]).decrypt(iv, edk.ciphertext, aad)
            except InvalidTag:
                failed.append(key_id)
                continue
            return data_key
        if failed:
            raise DataKeyAuthenticationFailed(
                f"data key wrapped by local key {failed[0]!r} did not authenticate "
                "(wrong encryption context or altered header)"
            )
        if seen:
            raise NoUsableDataKey(
                f"keyring {self.path} holds none of the wrapping keys "
                f"{', '.join(repr(k) for k in seen)}"
            )
        raise NoUsableDataKey("no encrypted data key from the local keyring in this message")

    def rewrap(
        self, edk: EncryptedDataKey, context: Mapping[str, str], new_key_id: str
    ) -> EncryptedDataKey:
        validate_key_id(new_key_id)
        self._material(new_key_id)  # fail before unwrapping if the target is missing
        data_key = self.decrypt_data_key([edk], context)
        return self._wrap(new_key_id, data_key, context)

    def create_key(self, key_id: str) -> str:
        validate_key_id(key_id)
        with self._locked():
            snap = self._read()  # re-read under the lock: another process may have added keys
            if snap is not None and key_id in snap.keys:
                raise KeyExists(f"key {key_id!r} already exists in keyring {self.path}")
            entries: dict[str, dict[str, str]] = {}
            if snap is not None:
                for kid, (material, created) in snap.keys.items():
                    entry = {"material": base64.b64encode(material).decode("ascii")}
                    if created is not None:
                        entry["created_at"] = created
                    entries[kid] = entry
            entries[key_id] = {
                "material": base64.b64encode(os.urandom(DATA_KEY_BYTES)).decode("ascii"),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            self._write_atomic({"keys": entries})
        return key_id

    def list_keys(self) -> list[KeyInfo]:
        snap = self._read()
        if snap is None:
            return []
        return [KeyInfo(key_id=k, created_at=c) for k, (_m, c) in sorted(snap.keys.items())]

    def check_key(self, key_id: str) -> None:
        validate_key_id(key_id)
        self._material(key_id)

    def key_for_edk(self, edk: EncryptedDataKey) -> str | None:
        if edk.provider_id != LOCAL_PROVIDER_ID:
            return None
        parsed = _parse_raw_provider_info(edk.provider_info)
        return parsed[0] if parsed else None


# --- AWS KMS -----------------------------------------------------------------------

_KMS_NOT_FOUND = {"NotFoundException"}
_KMS_BAD_CIPHERTEXT = {"InvalidCiphertextException", "IncorrectKeyException"}
_KMS_TRANSIENT = {
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "LimitExceededException",
    "DependencyTimeoutException",
    "KMSInternalException",
    "KeyUnavailableException",
    "ServiceUnavailable",
    "InternalFailure",
}
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
                    import boto3
                    from botocore.config import Config

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
        from botocore.exceptions import BotoCoreError, ClientError

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


def _map_client_error(exc: Any, op: str, key_ref: str) -> KeyAccessError:
    """Turn a botocore ClientError into the matching typed error (codes only, no bodies)."""
    err = exc.response.get("Error", {}) if hasattr(exc, "response") else {}
    code = str(err.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    where = f"KMS {op} for {key_ref}"
    if code in _KMS_NOT_FOUND:
        return KeyNotFound(f"{where}: key not found ({code})")
    if code in _KMS_BAD_CIPHERTEXT:
        return DataKeyAuthenticationFailed(f"{where}: {code}")
    if code in _KMS_TRANSIENT or status >= 500 or status == 429:
        return KeyProviderUnavailable(f"{where}: {code} (HTTP {status})")
    return KeyAccessError(f"{where}: {code}")


def _map_botocore_error(exc: Any, op: str, key_ref: str, endpoint: str | None) -> KeyAccessError:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, NoCredentialsError, NoRegionError

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


def build_key_provider(cfg: KeysConfig) -> KeyProvider:
    """The provider named by ``[keys] provider``."""
    if cfg.provider == "local":
        return LocalKeyring(cfg.keyring)
    if cfg.provider == "aws-kms":
        return AwsKmsProvider(region=cfg.region, endpoint_url=cfg.endpoint_url or None)
    raise KeyAccessError(f"unknown key provider {cfg.provider!r}")
