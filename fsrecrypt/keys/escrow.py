"""Escrow keys: extra wrapping keys that open a tenant's recordings when its primary key cannot.

A tenant's primary key (``tenants.kms_key_id``) goes through the configured
provider. Escrow keys are named so that they need no configuration of their
own, whatever the primary provider is:

* ``arn:aws:kms:REGION:ACCOUNT:key/ID`` (or an alias ARN): an AWS KMS key,
  reached in the region its ARN names (a second region survives the first
  one's outage), at ``[keys] endpoint_url`` if one is set. Stored as the
  key ARN KMS answers with.
* ``raw-aes:ID``: an AES-256 key in the escrow keyring file (``[keys]
  escrow_keyring``, by default the ``keyring`` file): the ESDK's raw AES
  format, provider id ``fsrecrypt-local``, key name ``ID``. The customer
  keeps a copy offline; the official ESDK with a raw AES keyring of that
  namespace, name and key opens every object without fsrecrypt.

Each escrow key wraps the same data key as the primary (KMS Encrypt, or AES
key wrap in memory), under the same encryption context.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from fsrecrypt.config import KeysConfig
from fsrecrypt.errors import KeyAccessError, NoUsableDataKey
from fsrecrypt.format import EncryptedDataKey
from fsrecrypt.keys import build_key_provider
from fsrecrypt.keys.base import (
    DATA_KEY_BYTES,
    KMS_PROVIDER_ID,
    LOCAL_PROVIDER_ID,
    validate_key_id,
)
from fsrecrypt.keys.local import LocalKeyring

RAW_AES_PREFIX = "raw-aes:"
_KMS_ARN_RE = re.compile(
    r"arn:aws[a-z-]*:kms:(?P<region>[a-z]{2}(?:-[a-z]+)+-\d):\d{12}:"
    r"(?:key/[A-Za-z0-9-]{1,128}|alias/[A-Za-z0-9/_-]{1,250})"
)
_PROBE_CONTEXT = {"fsrecrypt-purpose": "escrow-probe"}


class _Wrapper(Protocol):
    def wrap_data_key(
        self, key_id: str, data_key: bytes, context: Mapping[str, str]
    ) -> EncryptedDataKey: ...

    def decrypt_data_key(self, edks: Any, context: Mapping[str, str]) -> bytes: ...

    def check_key(self, key_id: str) -> None: ...

    def key_for_edk(self, edk: EncryptedDataKey) -> str | None: ...


def parse_escrow_ref(ref: str) -> tuple[str, str, str]:
    """``(kind, region or "", key id)`` of an escrow key reference, or ``KeyAccessError``."""
    if not isinstance(ref, str):
        raise KeyAccessError("an escrow key must be a string")
    if ref.startswith(RAW_AES_PREFIX):
        return "raw-aes", "", validate_key_id(ref[len(RAW_AES_PREFIX) :])
    match = _KMS_ARN_RE.fullmatch(ref)
    if match:
        return "kms", match["region"], ref
    raise KeyAccessError(
        f"escrow key {ref[:160]!r} is neither a KMS key ARN nor raw-aes:<id>",
        hint=(
            "Name a KMS key by its full ARN (arn:aws:kms:REGION:ACCOUNT:key/ID, the region "
            "is taken from it) or a raw AES key of the escrow keyring as raw-aes:ID."
        ),
    )


class EscrowKeys:
    """Wraps and unwraps data keys with escrow keys; one KMS client per region, built on use."""

    def __init__(self, cfg: KeysConfig) -> None:
        self._cfg = cfg
        self._kms: dict[str, _Wrapper] = {}
        self._local: LocalKeyring | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EscrowKeys(keyring={self.keyring_path!r})"

    @property
    def keyring_path(self) -> str:
        return self._cfg.escrow_keyring or self._cfg.keyring

    def _keyring(self) -> LocalKeyring:
        """The escrow keyring (call with the lock held)."""
        if self._local is None:
            self._local = LocalKeyring(self.keyring_path)
        return self._local

    def _provider(self, ref: str) -> tuple[_Wrapper, str]:
        kind, region, key_id = parse_escrow_ref(ref)
        with self._lock:
            if kind == "raw-aes":
                return self._keyring(), key_id
            if region not in self._kms:
                cfg = KeysConfig(
                    provider="aws-kms", region=region, endpoint_url=self._cfg.endpoint_url
                )
                self._kms[region] = build_key_provider(cfg)  # type: ignore[assignment]
            return self._kms[region], key_id

    def canonical(self, ref: str) -> str:
        """The reference rows record for ``ref``, once it is shown to wrap right now.

        A throw-away data key is wrapped: that proves the key is usable and,
        for KMS, turns an alias ARN into the key ARN that EDKs carry.
        """
        provider, key_id = self._provider(ref)
        provider.check_key(key_id)
        edk = provider.wrap_data_key(key_id, os.urandom(DATA_KEY_BYTES), _PROBE_CONTEXT)
        return self.ref_for_edk(edk) or ref

    def check(self, ref: str) -> None:
        """Raise unless escrow key ``ref`` exists and is enabled (no wrap: a health check)."""
        provider, key_id = self._provider(ref)
        provider.check_key(key_id)

    def wrap(self, ref: str, data_key: bytes, context: Mapping[str, str]) -> EncryptedDataKey:
        """``data_key`` wrapped by escrow key ``ref`` under ``context``."""
        provider, key_id = self._provider(ref)
        return provider.wrap_data_key(key_id, data_key, context)

    def unwrap(self, ref: str, edk: EncryptedDataKey, context: Mapping[str, str]) -> bytes:
        """The data key from an EDK of escrow key ``ref`` (and only of that key)."""
        provider, _key_id = self._provider(ref)
        if self.ref_for_edk(edk) != ref:
            raise NoUsableDataKey(f"the encrypted data key is not wrapped by escrow key {ref}")
        return provider.decrypt_data_key([edk], context)

    def ref_for_edk(self, edk: EncryptedDataKey) -> str | None:
        """The escrow reference an EDK names (KMS key ARN, or raw-aes:<id>), None if neither."""
        if edk.provider_id == KMS_PROVIDER_ID:
            try:
                arn = edk.provider_info.decode("utf-8")
            except UnicodeDecodeError:
                return None
            return arn if _KMS_ARN_RE.fullmatch(arn) else None
        if edk.provider_id == LOCAL_PROVIDER_ID:
            with self._lock:
                key_id = self._keyring().key_for_edk(edk)
            return f"{RAW_AES_PREFIX}{key_id}" if key_id else None
        return None
