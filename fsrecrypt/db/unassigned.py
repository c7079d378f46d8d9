"""Files whose tenant does not exist yet: remembered until the tenant is added."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fsrecrypt.db.pool import Pool


class UnassignedFiles(Pool):
    """Files waiting for their tenant (part of :class:`fsrecrypt.db.Database`)."""

    def hold_unassigned(
        self,
        *,
        source_path: str,
        source_fingerprint: str,
        tenant_name: str,
        reason: str,
        call_uuid: str | None = None,
        core_uuid: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Remember that this file belongs to ``tenant_name``, which does not exist yet."""
        with self.transaction("remembering a file of an unknown tenant") as cur:
            cur.execute(
                "INSERT INTO unassigned_files (source_path, source_fingerprint, tenant_name,"
                " call_uuid, core_uuid, metadata, reason) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (source_path, source_fingerprint) DO NOTHING",
                (
                    source_path,
                    source_fingerprint,
                    tenant_name,
                    call_uuid,
                    core_uuid,
                    json.dumps(dict(metadata or {})),
                    reason[:2000],
                ),
            )

    def unassigned_for(self, paths: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """``(path, fingerprint) -> {tenant_name, call_uuid, core_uuid, metadata}``."""
        if not paths:
            return {}
        with self.transaction("checking files of unknown tenants") as cur:
            cur.execute(
                "SELECT source_path, source_fingerprint, tenant_name, call_uuid, core_uuid,"
                " metadata FROM unassigned_files WHERE source_path = ANY(%s)",
                (list(paths),),
            )
            return {
                (r[0], r[1]): {
                    "tenant_name": r[2],
                    "call_uuid": r[3],
                    "core_uuid": r[4],
                    "metadata": r[5],
                }
                for r in cur.fetchall()
            }

    def unassigned_files(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Every file waiting for its tenant, oldest first, with whether the tenant exists now.

        ``tenant_exists`` False: nothing stores it until the tenant is added
        (or the operator ingests it for another tenant); True: the sweep
        stores it at its next pass.
        """
        with self.transaction("listing files of unknown tenants") as cur:
            cur.execute(
                "SELECT u.source_path, u.source_fingerprint, u.tenant_name, u.call_uuid,"
                " u.core_uuid, u.reason, u.created_at, t.id IS NOT NULL"
                " FROM unassigned_files u LEFT JOIN tenants t ON t.name = u.tenant_name"
                " ORDER BY u.created_at, u.source_path LIMIT %s",
                (limit,),
            )
            return [
                {
                    "source_path": r[0],
                    "source_fingerprint": r[1],
                    "tenant_name": r[2],
                    "call_uuid": r[3],
                    "core_uuid": r[4],
                    "reason": r[5],
                    "created_at": r[6],
                    "tenant_exists": bool(r[7]),
                }
                for r in cur.fetchall()
            ]

    def drop_unassigned(self, source_path: str, source_fingerprint: str) -> None:
        with self.transaction("forgetting a file of an unknown tenant") as cur:
            cur.execute(
                "DELETE FROM unassigned_files WHERE source_path = %s AND source_fingerprint = %s",
                (source_path, source_fingerprint),
            )
