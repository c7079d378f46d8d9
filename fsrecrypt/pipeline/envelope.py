"""What ties an object to its recording: the encryption context and the wrapped data key.

The context names the tenant and the recording (identifiers only: it travels
in clear in the object header and in KMS logs); the wrapped data key is kept
in the row in the ESDK's own wire encoding, so key rotation can re-wrap it
there without touching the object.
"""

from __future__ import annotations

import struct

from fsrecrypt import format as esdk
from fsrecrypt.errors import MalformedMessage

ALGORITHM_NAME = "AES_256_GCM_HKDF_SHA512_COMMIT_KEY"


def encryption_context(tenant_id: str, recording_id: str) -> dict[str, str]:
    """Identifiers only: the context travels in clear in the object header and KMS logs."""
    return {"tenant_id": tenant_id, "recording_id": recording_id}


def edk_to_bytes(edk: esdk.EncryptedDataKey) -> bytes:
    """The ESDK wire encoding of one encrypted data key (what the header holds)."""
    provider = edk.provider_id.encode("utf-8")
    return b"".join(
        struct.pack(">H", len(part)) + part
        for part in (provider, edk.provider_info, edk.ciphertext)
    )


def edk_from_bytes(data: bytes) -> esdk.EncryptedDataKey:
    parts, offset = [], 0
    for _ in range(3):
        if offset + 2 > len(data):
            raise MalformedMessage("stored encrypted data key is truncated")
        (length,) = struct.unpack_from(">H", data, offset)
        offset += 2
        if offset + length > len(data):
            raise MalformedMessage("stored encrypted data key is truncated")
        parts.append(bytes(data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise MalformedMessage("stored encrypted data key has trailing bytes")
    return esdk.EncryptedDataKey(parts[0].decode("utf-8"), parts[1], parts[2])
