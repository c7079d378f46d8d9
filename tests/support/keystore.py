"""A branch key store (DynamoDB + KMS on the moto server) for the hierarchy tests.

The moto server process (``tests/support/moto.py``) serves DynamoDB as well as
S3 and KMS; each test gets its own KMS key and its own key store table, created
by the official Material Providers Library (so the table is exactly what the
MPL expects, not something fsrecrypt made up). ``official_keyring`` builds a
Hierarchical keyring with the MPL alone, nothing of fsrecrypt in between: what
the interop tests hand to the official ``aws-encryption-sdk``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.moto import MotoServer


@dataclass
class KeyStoreEnv:
    moto: MotoServer
    table: str
    kms_key_arn: str

    def keys_section(self, **overrides: Any) -> dict[str, Any]:
        """The ``[keys]`` section that points fsrecrypt at this key store."""
        return {
            "provider": "aws-kms-hierarchy",
            "region": self.moto.region,
            "endpoint_url": self.moto.endpoint_url,
            "key_store_table": self.table,
            "key_store_kms_key": self.kms_key_arn,
            **overrides,
        }

    def provider(self, **kwargs: Any) -> Any:
        from fsrecrypt.keys.hierarchy import AwsKmsHierarchyProvider

        return AwsKmsHierarchyProvider(
            table=self.table,
            kms_key_arn=self.kms_key_arn,
            region=self.moto.region,
            endpoint_url=self.moto.endpoint_url,
            **kwargs,
        )

    def official_key_store(self, kms_key_arn: str | None = None) -> Any:
        from aws_cryptographic_material_providers.keystore import KeyStore
        from aws_cryptographic_material_providers.keystore.config import KeyStoreConfig
        from aws_cryptographic_material_providers.keystore.models import (
            KMSConfigurationKmsKeyArn,
        )

        return KeyStore(
            KeyStoreConfig(
                ddb_table_name=self.table,
                logical_key_store_name=self.table,
                kms_configuration=KMSConfigurationKmsKeyArn(kms_key_arn or self.kms_key_arn),
                ddb_client=self.moto.client("dynamodb"),
                kms_client=self.moto.client("kms"),
            )
        )

    def official_keyring(self, branch_key_id: str, kms_key_arn: str | None = None) -> Any:
        """A Hierarchical keyring built with the MPL alone (its own cache)."""
        from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
        from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
        from aws_cryptographic_material_providers.mpl.models import (
            CreateAwsKmsHierarchicalKeyringInput,
        )

        mpl = AwsCryptographicMaterialProviders(MaterialProvidersConfig())
        return mpl.create_aws_kms_hierarchical_keyring(
            CreateAwsKmsHierarchicalKeyringInput(
                key_store=self.official_key_store(kms_key_arn),
                branch_key_id=branch_key_id,
                ttl_seconds=600,
            )
        )

    def official_branch_key(self) -> str:
        from aws_cryptographic_material_providers.keystore.models import CreateKeyInput

        return str(self.official_key_store().create_key(CreateKeyInput()).branch_key_identifier)

    def new_kms_key(self) -> str:
        kms = self.moto.client("kms")
        return str(kms.create_key(Description="fsrecrypt branch keys")["KeyMetadata"]["Arn"])


def make_key_store(moto: MotoServer) -> KeyStoreEnv:
    """A fresh KMS key and a fresh key store table (created by the MPL) on ``moto``."""
    from aws_cryptographic_material_providers.keystore.models import CreateKeyStoreInput

    kms = moto.client("kms")
    arn = str(kms.create_key(Description="fsrecrypt branch keys")["KeyMetadata"]["Arn"])
    env = KeyStoreEnv(moto, f"fsrecrypt-bk-{uuid.uuid4().hex[:12]}", arn)
    env.official_key_store().create_key_store(CreateKeyStoreInput())
    return env


@pytest.fixture
def key_store(moto_server: MotoServer) -> KeyStoreEnv:
    """A fresh branch key store table and its KMS key, on the session's moto server."""
    return make_key_store(moto_server)
