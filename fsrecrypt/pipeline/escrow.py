"""A tenant's escrow keys, checked before they are recorded (``tenants add --escrow-key``).

Why the check comes first, as for the primary key (``pipeline/tenants.py``):
an escrow key that cannot wrap would be found only when the first
recording is stored (and then left out of it), or worse, on the day it is
needed. Each is shown to wrap now and recorded under the reference its
EDKs will carry (a KMS key ARN, or ``raw-aes:<id>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fsrecrypt.errors import ConfigError
from fsrecrypt.pipeline.services import Services

if TYPE_CHECKING:
    from fsrecrypt.db import Tenant


def canonical_escrow_keys(
    services: Services, primary: str, escrow_keys: Sequence[str]
) -> list[str]:
    """The escrow references rows record, each shown to wrap now; duplicates refused."""
    refs: list[str] = []
    for given in escrow_keys:
        ref = services.escrow.canonical(given)
        if ref in refs or ref == primary:
            raise ConfigError(
                f"escrow key {given!r} is named twice (or is the primary key)",
                hint="Give each escrow key once, and not the tenant's own --key.",
            )
        refs.append(ref)
    return refs


def add_tenant_with_escrow(
    services: Services, name: str, key_id: str, escrow_keys: Sequence[str]
) -> Tenant:
    """Add tenant ``name`` wrapped by ``key_id`` and by each escrow key, all checked first."""
    services.keys.check_key(key_id)
    refs = canonical_escrow_keys(services, key_id, escrow_keys)
    return services.db.add_tenant(name, key_id, refs)
