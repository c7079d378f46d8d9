"""A tenant is added only with a key that can wrap its recordings now.

Why the check comes first: a tenant row naming a key that does not exist
(a typo, a KMS alias in another region, a key policy without our role)
would be accepted silently, and the first recording stored for it would
fail in the daemon, where the only way out is the retry queue. Checking
the key before the row exists turns that into an error at the command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsrecrypt.errors import AlreadyExists, ConfigError, UnknownTenant
from fsrecrypt.pipeline.services import Services

if TYPE_CHECKING:
    from fsrecrypt.db import Tenant

HIERARCHY = "aws-kms-hierarchy"


def add_tenant(services: Services, name: str, key_id: str) -> Tenant:
    """Add tenant ``name`` whose recordings ``key_id`` will wrap, after checking the key works."""
    services.keys.check_key(key_id)
    return services.db.add_tenant(name, key_id)


def add_branch_key_tenant(services: Services, name: str, branch_key: str) -> Tenant:
    """Add tenant ``name`` on a branch key ([keys] provider = "aws-kms-hierarchy").

    ``branch_key`` is ``new`` (a branch key is created in the key store, under
    ``key_store_kms_key``) or the id of an existing branch key (tenants may
    share one). The name is checked before a key is created, so a taken name
    leaves no orphan branch key behind.
    """
    if services.config.keys.provider != HIERARCHY:
        raise ConfigError(
            "--branch-key needs [keys] provider = 'aws-kms-hierarchy'",
            hint="Use --key with the configured provider, or configure the branch key store.",
        )
    try:
        services.db.tenant_by_name(name)
    except UnknownTenant:
        pass
    else:
        raise AlreadyExists(f"tenant {name!r} already exists")
    branch_key_id = services.keys.create_key("new") if branch_key == "new" else branch_key
    return add_tenant(services, name, branch_key_id)
