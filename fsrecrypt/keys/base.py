"""What every key provider offers, and the types they hand back.

A provider wraps each recording's fresh 32-byte data key with a tenant's
wrapping key; only the wrapped form (an ESDK encrypted data key, EDK) is
stored. ``DataKey.plaintext`` is excluded from ``repr`` and error messages
name key ids and error codes only, so material never leaves through a log
line or a traceback.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fsrecrypt.errors import KeyAccessError
from fsrecrypt.format import EncryptedDataKey

LOCAL_PROVIDER_ID = "fsrecrypt-local"
KMS_PROVIDER_ID = "aws-kms"
DATA_KEY_BYTES = 32
# With branch keys (aws-kms-hierarchy), a tenant key id starting with one of
# these is a KMS key used directly (tenants from before the switch); any other
# id names a branch key, and no branch key id may start with them.
DIRECT_KMS_PREFIXES = ("arn:", "alias/")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


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


def validate_key_id(key_id: str) -> str:
    """Key ids end up in EDKs, file names of logs and SQL rows: keep them boring."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise KeyAccessError(
            f"invalid key id {key_id!r}",
            hint="Key ids are 1-128 characters of A-Z a-z 0-9 . _ : / -.",
        )
    return key_id
