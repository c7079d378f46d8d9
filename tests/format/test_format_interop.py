"""Interop with the real AWS Encryption SDK (raw AES keyring, suite 0x0478).

Both directions: what fsrecrypt writes, the official SDK decrypts; what the
SDK writes, fsrecrypt decrypts (streaming and by range). The raw-AES wrapping
of the data key is re-implemented here exactly as the ESDK raw keyring does it,
so the test depends on nothing but fsrecrypt.format and the SDK.
"""

from __future__ import annotations

import io
import os
import struct

import aws_encryption_sdk
import pytest
from aws_encryption_sdk.identifiers import (
    Algorithm,
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fsrecrypt import format as fmt

PROVIDER_ID = "fsrecrypt-local"
KEY_NAME = "tenant-acme-2024"
F = 4096
SIZES = [0, 1, F - 1, F, F + 1, 3 * F, 3 * 1024 * 1024 + 123]
CONTEXTS = {
    "empty-ctx": {},
    "ctx": {"tenant": "acme", "recording": "r-42", "zz-ünïcode": "välue"},
}
WRAPPING_KEY = bytes(range(32))


class LocalProvider(RawMasterKeyProvider):
    """The SDK side: a raw AES-256-GCM master key provider named like ours."""

    provider_id = PROVIDER_ID

    def __init__(self, **kwargs: object) -> None:
        self._keys: dict[bytes, bytes] = {}

    def add(self, name: str, key: bytes) -> None:
        self._keys[name.encode()] = key
        self.add_master_key(name.encode())

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        return WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=self._keys[key_id],
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )


def wrap(data_key: bytes, ctx: dict[str, str], name: str = KEY_NAME) -> fmt.EncryptedDataKey:
    """Wrap a data key exactly as the ESDK raw AES keyring does."""
    iv = os.urandom(12)
    info = name.encode() + struct.pack(">II", 128, 12) + iv
    sealed = AESGCM(WRAPPING_KEY).encrypt(iv, data_key, fmt.serialize_context(ctx))
    return fmt.EncryptedDataKey(PROVIDER_ID, info, sealed)


def unwrap(header: fmt.Header) -> bytes:
    """Find our EDK in a header and unwrap it (the raw keyring's decrypt side)."""
    for edk in header.encrypted_data_keys:
        if edk.provider_id != PROVIDER_ID:
            continue
        name_len = len(edk.provider_info) - 20
        assert edk.provider_info[:name_len] == KEY_NAME.encode()
        tag_bits, iv_len = struct.unpack_from(">II", edk.provider_info, name_len)
        assert (tag_bits, iv_len) == (128, 12)
        iv = edk.provider_info[name_len + 8 :]
        aad = fmt.serialize_context(header.encryption_context)
        return AESGCM(WRAPPING_KEY).decrypt(iv, edk.ciphertext, aad)
    raise AssertionError("no fsrecrypt-local data key in the header")


@pytest.fixture(scope="module")
def client() -> aws_encryption_sdk.EncryptionSDKClient:
    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    p = LocalProvider()
    p.add(KEY_NAME, WRAPPING_KEY)
    return p


def _plaintext(size: int) -> bytes:
    return os.urandom(size)


def _ours(plaintext: bytes, ctx: dict[str, str]) -> tuple[bytes, fmt.Encryptor]:
    data_key = os.urandom(32)
    enc = fmt.Encryptor(data_key, [wrap(data_key, ctx)], ctx, frame_length=F)
    return b"".join(enc.stream(io.BytesIO(plaintext))), enc


def _sdk_encrypt(client, provider, plaintext: bytes, ctx: dict[str, str]) -> bytes:  # type: ignore[no-untyped-def]
    ciphertext, _header = client.encrypt(
        source=plaintext,
        key_provider=provider,
        encryption_context=ctx,
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=F,
    )
    return ciphertext


@pytest.mark.parametrize("ctx_name", list(CONTEXTS))
@pytest.mark.parametrize("size", SIZES)
def test_sdk_decrypts_ours(client, provider, size: int, ctx_name: str) -> None:  # type: ignore[no-untyped-def]
    ctx = CONTEXTS[ctx_name]
    plaintext = _plaintext(size)
    ciphertext, enc = _ours(plaintext, ctx)
    assert enc.plaintext_length == size
    assert enc.ciphertext_length == len(ciphertext)
    assert len(ciphertext) == fmt.ciphertext_size(size, enc.header.size, F)

    if size > 1024 * 1024:
        with client.stream(mode="d", source=io.BytesIO(ciphertext), key_provider=provider) as dec:
            out = b"".join(dec)
            sdk_header = dec.header
    else:
        out, sdk_header = client.decrypt(source=ciphertext, key_provider=provider)
    assert out == plaintext
    assert sdk_header.algorithm == Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    assert sdk_header.message_id == enc.header.message_id
    assert dict(sdk_header.encryption_context) == ctx
    assert sdk_header.frame_length == F


@pytest.mark.parametrize("ctx_name", list(CONTEXTS))
@pytest.mark.parametrize("size", SIZES)
def test_we_decrypt_sdk(client, provider, size: int, ctx_name: str) -> None:  # type: ignore[no-untyped-def]
    ctx = CONTEXTS[ctx_name]
    plaintext = _plaintext(size)
    if size > 1024 * 1024:
        with client.stream(
            mode="e",
            source=io.BytesIO(plaintext),
            key_provider=provider,
            encryption_context=ctx,
            algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
            frame_length=F,
        ) as encryptor:
            ciphertext = b"".join(encryptor)
    else:
        ciphertext = _sdk_encrypt(client, provider, plaintext, ctx)

    header = fmt.parse_header(ciphertext)
    assert header.encryption_context == ctx
    assert header.frame_length == F
    out = b"".join(fmt.decrypt_stream(io.BytesIO(ciphertext), unwrap))
    assert out == plaintext

    # Layout agrees with ours: same size formula, random access works.
    assert fmt.plaintext_size(header, len(ciphertext)) == size
    assert len(ciphertext) == fmt.ciphertext_size(size, header.size, F)
    content_key = fmt.verify_header(header, unwrap(header))
    for start, end in [(0, None), (size // 3, size - size // 5), (max(size - 1, 0), None)]:
        plan = fmt.plan_range(header, len(ciphertext), start, end)
        part = ciphertext[plan.ciphertext_start : plan.ciphertext_end]
        chunks = [part[i : i + 1000] for i in range(0, len(part), 1000)]
        got = b"".join(fmt.decrypt_range(header, content_key, plan, chunks, len(ciphertext)))
        assert got == plaintext[start:end]


def test_rewrapped_header_still_decrypts_with_sdk(client, provider) -> None:  # type: ignore[no-untyped-def]
    """Key rotation rewrites only the header; the SDK must accept the result."""
    ctx = CONTEXTS["ctx"]
    plaintext = _plaintext(3 * F + 7)
    ciphertext, enc = _ours(plaintext, ctx)
    data_key = unwrap(enc.header)
    new_header = fmt.rewrap_header(enc.header, data_key, [wrap(data_key, ctx)])
    assert new_header.encrypted_data_keys != enc.header.encrypted_data_keys
    rewritten = new_header.raw + ciphertext[enc.header.size :]
    out, _ = client.decrypt(source=rewritten, key_provider=provider)
    assert out == plaintext
    assert b"".join(fmt.decrypt_stream(io.BytesIO(rewritten), unwrap)) == plaintext


def test_sdk_output_with_foreign_edk_first(client, provider) -> None:  # type: ignore[no-untyped-def]
    """A message with several EDKs: ours unwraps the one it knows."""
    other = LocalProvider()
    other.provider_id = "someone-else"
    other.add("k", os.urandom(32))
    other.add_master_key_provider(provider)
    plaintext = _plaintext(F + 5)
    ciphertext, _ = client.encrypt(
        source=plaintext,
        key_provider=other,
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=F,
    )
    header = fmt.parse_header(ciphertext)
    assert {e.provider_id for e in header.encrypted_data_keys} == {"someone-else", PROVIDER_ID}
    assert b"".join(fmt.decrypt_stream(io.BytesIO(ciphertext), unwrap)) == plaintext
