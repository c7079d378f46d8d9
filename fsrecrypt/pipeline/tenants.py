"""A tenant is added only with a key that can wrap its recordings now.

Why the check comes first: a tenant row naming a key that does not exist
(a typo, a KMS alias in another region, a key policy without our role)
would be accepted silently, and the first recording stored for it would
fail in the daemon, where the only way out is the retry queue. Checking
the key before the row exists turns that into an error at the command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsrecrypt.pipeline.services import Services

if TYPE_CHECKING:
    from fsrecrypt.db import Tenant


def add_tenant(services: Services, name: str, key_id: str) -> Tenant:
    """Add tenant ``name`` whose recordings ``key_id`` will wrap, after checking the key works."""
    services.keys.check_key(key_id)
    return services.db.add_tenant(name, key_id)
