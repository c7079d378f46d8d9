"""Backfill tests: services on the local keyring + store, an archive directory beside them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from fsrecrypt.pipeline import Services
from tests.support.factories import local_config, s3_config, unique


@pytest.fixture
def local_services(tmp_path: Path, pg_dsn: str):
    services = Services(local_config(tmp_path, pg_dsn))
    key = unique("key")
    services.keys.create_key(key)
    tenant = services.db.add_tenant(unique("tenant"), key)
    archive = tmp_path / "archive"
    archive.mkdir()
    yield services, tenant, archive
    services.close()


@pytest.fixture
def s3_target_services(tmp_path: Path, pg_dsn: str, moto_server, s3_bucket):
    """S3 store + KMS keys on moto (the backfill's source is another bucket)."""
    config = s3_config(tmp_path, pg_dsn, moto_server.endpoint_url, s3_bucket.name)
    services = Services(config)
    arn = services.keys.create_key(unique("tenant-key"))
    tenant = services.db.add_tenant(unique("tenant"), arn)
    yield services, tenant, s3_bucket
    services.close()


def sdk_decrypt_local(services: Services, ciphertext: bytes, key_id: str) -> tuple[bytes, dict]:
    """Decrypt with the official AWS Encryption SDK, the keyring's key as a raw master key."""
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import (
        CommitmentPolicy,
        EncryptionKeyType,
        WrappingAlgorithm,
    )
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

    ring = json.loads(Path(services.config.keys.keyring).read_text())
    material = base64.b64decode(ring["keys"][key_id]["material"])

    class SdkRing(RawMasterKeyProvider):
        provider_id = "fsrecrypt-local"

        def _get_raw_key(self, wanted: bytes) -> WrappingKey:
            assert wanted == key_id.encode()
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = SdkRing()
    provider.add_master_key(key_id.encode())
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    plaintext, header = client.decrypt(source=ciphertext, key_provider=provider)
    return bytes(plaintext), dict(header.encryption_context)
