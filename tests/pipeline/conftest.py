"""Services for the pipeline tests: the local keyring and store, or S3 + KMS on moto."""

from __future__ import annotations

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
    yield services, tenant, tmp_path / "recordings"
    services.close()


@pytest.fixture
def s3_services(tmp_path: Path, pg_dsn: str, moto_server, s3_bucket):
    config = s3_config(tmp_path, pg_dsn, moto_server.endpoint_url, s3_bucket.name)
    services = Services(config)
    arn = services.keys.create_key(unique("tenant-key"))
    tenant = services.db.add_tenant(unique("tenant"), arn)
    yield services, tenant, tmp_path / "recordings"
    services.close()
