"""Adding a tenant: the key is checked before the row exists."""

from __future__ import annotations

import pytest

from fsrecrypt.errors import KeyNotFound, UnknownTenant
from fsrecrypt.pipeline import add_tenant
from tests.support.factories import unique


def test_add_tenant_with_a_working_key(local_services) -> None:
    services, _tenant, _recordings = local_services
    key = services.keys.create_key(unique("key"))
    name = unique("acme")
    tenant = add_tenant(services, name, key)
    assert (tenant.name, tenant.kms_key_id) == (name, key)
    assert services.db.tenant_by_name(name).id == tenant.id


def test_add_tenant_with_a_missing_key_adds_nothing(local_services) -> None:
    services, _tenant, _recordings = local_services
    name = unique("typo")
    with pytest.raises(KeyNotFound):
        add_tenant(services, name, unique("no-such-key"))
    with pytest.raises(UnknownTenant):
        services.db.tenant_by_name(name)
