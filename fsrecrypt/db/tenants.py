"""Tenants: who owns recordings, and which key wraps their data keys."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg2.errors

from fsrecrypt.db.escrow import EscrowKeys
from fsrecrypt.db.rows import TENANT_COLUMNS, Tenant, tenant_from_row
from fsrecrypt.errors import AlreadyExists, UnknownTenant


class Tenants(EscrowKeys):
    """Tenant queries (part of :class:`fsrecrypt.db.Database`); a tenant's escrow keys
    and their copies of data keys come with them (:mod:`fsrecrypt.db.escrow`)."""

    def add_tenant(self, name: str, kms_key_id: str, escrow_key_ids: Sequence[str] = ()) -> Tenant:
        try:
            with self.transaction(f"adding tenant {name!r}") as cur:
                cur.execute(
                    "INSERT INTO tenants (name, kms_key_id, escrow_key_ids) VALUES (%s, %s, %s)"
                    f" RETURNING {TENANT_COLUMNS}",
                    (name, kms_key_id, list(escrow_key_ids)),
                )
                return tenant_from_row(cur.fetchone())
        except psycopg2.errors.CheckViolation:
            raise AlreadyExists(
                f"tenant name {name!r} is not allowed",
                hint="Use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            ) from None
        except AlreadyExists:
            raise AlreadyExists(f"tenant {name!r} already exists") from None

    def tenants(self) -> list[Tenant]:
        with self.transaction("listing tenants") as cur:
            cur.execute(f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name")
            return [tenant_from_row(r) for r in cur.fetchall()]

    def tenant_by_name(self, name: str) -> Tenant:
        with self.transaction("looking up a tenant") as cur:
            cur.execute(f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = %s", (name,))
            row = cur.fetchone()
        if row is None:
            raise UnknownTenant(f"unknown tenant {name!r}")
        return tenant_from_row(row)

    def tenant_by_id(self, tenant_id: str) -> Tenant:
        with self.transaction("looking up a tenant") as cur:
            cur.execute(f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = %s", (tenant_id,))
            row = cur.fetchone()
        if row is None:
            raise UnknownTenant(f"unknown tenant id {tenant_id}")
        return tenant_from_row(row)

    def set_tenant_key(self, tenant_id: str, kms_key_id: str) -> None:
        with self.transaction("switching the tenant's key") as cur:
            cur.execute("UPDATE tenants SET kms_key_id = %s WHERE id = %s", (kms_key_id, tenant_id))
