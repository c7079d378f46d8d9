"""The keyed fingerprint of a recording's plaintext, computed while it is encrypted.

Why keyed: a plain sha256 of the audio in the database would let anyone who
reads it confirm a guessed recording (a known announcement, a test call). An
HMAC-SHA256 under a per-tenant key does not, yet proves a decrypted copy is
identical to what was stored. The tenant key is derived on the server from
one secret in its own 0600 file (``[audit] fingerprint_key_file``), so it
never leaves the server and is never stored anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Any, BinaryIO

from fsrecrypt.config import Config
from fsrecrypt.keyfile import KeyFileSpec, load_key_file

FINGERPRINT_KEY = KeyFileSpec(
    what="custody fingerprint key",
    setting="[audit] fingerprint_key_file",
    power="confirm guessed recording contents",
    created_by="the next stored recording (older fingerprints can no longer be checked)",
)
_LABEL = b"fsrecrypt-custody-fingerprint-v1\n"


def fingerprint_key_path(config: Config) -> str:
    """``[audit] fingerprint_key_file``, or ``custody-fingerprint.key`` beside the keyring."""
    if config.audit.fingerprint_key_file:
        return config.audit.fingerprint_key_file
    return os.path.join(os.path.dirname(config.keys.keyring), "custody-fingerprint.key")


class FingerprintKey:
    """Derives the per-tenant fingerprint key; ``key_id`` names the server secret, not it."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.key_id = hashlib.sha256(b"fsrecrypt-custody-key-id\n" + secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"FingerprintKey(key_id={self.key_id})"

    @classmethod
    def from_config(cls, config: Config, *, create: bool = True) -> FingerprintKey:
        return cls(load_key_file(fingerprint_key_path(config), FINGERPRINT_KEY, create=create))

    def hasher(self, tenant_id: str) -> Any:
        tenant_key = hmac.new(self._secret, _LABEL + str(tenant_id).encode(), hashlib.sha256)
        return hmac.new(tenant_key.digest(), digestmod=hashlib.sha256)

    def fingerprint(self, tenant_id: str, chunks: Iterable[bytes]) -> str:
        mac = self.hasher(tenant_id)
        for chunk in chunks:
            mac.update(chunk)
        return str(mac.hexdigest())


class FingerprintingReader:
    """Wraps the plaintext file: every byte the encryptor reads also goes into the HMAC.

    So the fingerprint is of exactly the bytes that were encrypted, read
    once (no second pass over a file that could change in between).
    """

    def __init__(self, source: BinaryIO, mac: Any) -> None:
        self._source = source
        self.mac = mac

    def readinto(self, buf: Any) -> int:
        n = self._source.readinto(buf)
        if n:
            with memoryview(buf) as view:
                self.mac.update(view[:n])
        return n or 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.mac.update(data)
        return data
