"""A tenant is added only with a key that can wrap its recordings now.

Why the check comes first: a tenant row naming a key that does not exist
(a typo, a KMS alias in another region, a key policy without our role)
would be accepted silently, and the first recording stored for it would
fail in the daemon, where the only way out is the retry queue. Checking
the key before the row exists turns that into an error at the command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fsrecrypt.errors import ConfigError
from fsrecrypt.pipeline.services import Services

if TYPE_CHECKING:
    from fsrecrypt.db import Tenant


def add_tenant(
    services: Services, name: str, key_id: str, escrow_keys: Sequence[str] = ()
) -> Tenant:
    """Add tenant ``name`` whose recordings ``key_id`` will wrap, after checking the key works.

    Each escrow key (``fsrecrypt.keys.escrow``) is checked the same way and
    will also wrap every recording's data key.
    """
    services.keys.check_key(key_id)
    refs = canonical_escrow_keys(services, key_id, escrow_keys)
    return services.db.add_tenant(name, key_id, refs)


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
