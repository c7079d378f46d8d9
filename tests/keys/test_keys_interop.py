"""Interop with the official aws-encryption-sdk through fsrecrypt's real key providers.

The format tests prove the message layout; these prove the whole thing a user
relies on: a recording written with the local keyring or with KMS opens with
the official SDK (RawMasterKeyProvider / StrictAwsKmsMasterKeyProvider), and
what the SDK writes opens with fsrecrypt. KMS is the moto server process; the
SDK reaches it through botocore's standard ``AWS_ENDPOINT_URL`` setting.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

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

from fsrecrypt import format as esdk
from fsrecrypt.config import KeysConfig
from fsrecrypt.keys import AwsKmsProvider, LocalKeyring, build_key_provider

F = 4096
SIZES = [0, 1, F - 1, F, F + 1, 3 * F, 3 * 1024 * 1024 + 17]
CONTEXTS = {"empty": {}, "tenant": {"tenant_id": "t-1", "recording_id": "r-1"}}

pytestmark = pytest.mark.integration


def _client() -> aws_encryption_sdk.EncryptionSDKClient:
    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


def _ours_encrypt(provider, key_id: str, plaintext: bytes, context: dict[str, str]) -> bytes:
    data_key = provider.generate_data_key(key_id, context)
    encryptor = esdk.Encryptor(data_key.plaintext, [data_key.encrypted], context, frame_length=F)
    return b"".join(encryptor.stream(io.BytesIO(plaintext)))


def _ours_decrypt(provider, message: bytes) -> bytes:
    return b"".join(
        esdk.decrypt_stream(
            io.BytesIO(message),
            lambda h: provider.decrypt_data_key(h.encrypted_data_keys, h.encryption_context),
        )
    )


def _sdk_encrypt(key_provider, plaintext: bytes, context: dict[str, str]) -> bytes:
    ciphertext, _ = _client().encrypt(
        source=plaintext,
        key_provider=key_provider,
        encryption_context=context,
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=F,
    )
    return bytes(ciphertext)


def _sdk_decrypt(key_provider, message: bytes, context: dict[str, str]) -> bytes:
    plaintext, header = _client().decrypt(source=message, key_provider=key_provider)
    assert dict(header.encryption_context) == context
    return bytes(plaintext)


# --- local keyring <-> RawMasterKeyProvider ----------------------------------------------


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("ring") / "keyring.json"
    ring = LocalKeyring(path)
    ring.create_key("acme-2026")
    material = base64.b64decode(json.loads(path.read_text())["keys"]["acme-2026"]["material"])

    class SdkRing(RawMasterKeyProvider):  # the SDK side, named like ours
        provider_id = "fsrecrypt-local"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            assert key_id == b"acme-2026"
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    sdk = SdkRing()
    sdk.add_master_key(b"acme-2026")
    return ring, sdk


@pytest.mark.parametrize("context_name", CONTEXTS)
@pytest.mark.parametrize("size", SIZES)
def test_local_keyring_ours_to_sdk(keyring, size: int, context_name: str) -> None:
    ring, sdk = keyring
    plaintext = os.urandom(size)
    context = CONTEXTS[context_name]
    message = _ours_encrypt(ring, "acme-2026", plaintext, context)
    assert _sdk_decrypt(sdk, message, context) == plaintext


@pytest.mark.parametrize("context_name", CONTEXTS)
@pytest.mark.parametrize("size", SIZES)
def test_local_keyring_sdk_to_ours(keyring, size: int, context_name: str) -> None:
    ring, sdk = keyring
    plaintext = os.urandom(size)
    message = _sdk_encrypt(sdk, plaintext, CONTEXTS[context_name])
    assert _ours_decrypt(ring, message) == plaintext


# --- AWS KMS (moto) <-> StrictAwsKmsMasterKeyProvider -------------------------------------


@pytest.fixture(scope="module")
def kms(moto_server):
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = moto_server.endpoint_url
    try:
        provider = build_key_provider(
            KeysConfig(
                provider="aws-kms", region="us-east-1", endpoint_url=moto_server.endpoint_url
            )
        )
        assert isinstance(provider, AwsKmsProvider)
        arn = provider.create_key("interop-tenant")
        sdk = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[arn])
        yield provider, sdk, arn
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.mark.parametrize("context_name", CONTEXTS)
@pytest.mark.parametrize("size", SIZES)
def test_kms_ours_to_sdk(kms, size: int, context_name: str) -> None:
    provider, sdk, arn = kms
    plaintext = os.urandom(size)
    context = CONTEXTS[context_name]
    message = _ours_encrypt(provider, arn, plaintext, context)
    header = esdk.parse_header(message)
    assert header.encrypted_data_keys[0].provider_id == "aws-kms"
    assert header.encrypted_data_keys[0].provider_info.decode() == arn
    assert _sdk_decrypt(sdk, message, context) == plaintext


@pytest.mark.parametrize("context_name", CONTEXTS)
@pytest.mark.parametrize("size", SIZES)
def test_kms_sdk_to_ours(kms, size: int, context_name: str) -> None:
    provider, sdk, _arn = kms
    plaintext = os.urandom(size)
    message = _sdk_encrypt(sdk, plaintext, CONTEXTS[context_name])
    assert _ours_decrypt(provider, message) == plaintext


def test_kms_context_is_enforced_by_kms(kms) -> None:
    """A header whose context was edited cannot get its data key back from KMS."""
    provider, _sdk, arn = kms
    from fsrecrypt.errors import KeyAccessError

    message = _ours_encrypt(provider, arn, b"x" * 100, {"tenant_id": "a", "recording_id": "1"})
    header = esdk.parse_header(message)
    with pytest.raises(KeyAccessError):
        provider.decrypt_data_key(
            header.encrypted_data_keys, {"tenant_id": "b", "recording_id": "1"}
        )


def test_keyring_path_in_repr_only(tmp_path: Path) -> None:
    ring = LocalKeyring(tmp_path / "k.json")
    ring.create_key("k")
    material = json.loads((tmp_path / "k.json").read_text())["keys"]["k"]["material"]
    data_key = ring.generate_data_key("k", {})
    assert material not in repr(ring) and material not in repr(data_key)
    assert data_key.plaintext.hex() not in repr(data_key)
