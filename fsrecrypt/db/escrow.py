"""Escrow keys: a tenant's extra wrapping keys and each recording's escrow copies of its data key.

Why a table of their own (``recording_escrow_deks``, migration 0010) and
not more columns on ``call_recordings``: the primary copy stays the one
every read uses first, a recording can gain or lose escrow copies (``tenants
set-keys``) without its row changing, and crypto-shredding drops them all
through one trigger, whatever code path sets ``encrypted_dek`` to NULL.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from fsrecrypt.db.audit import append_audit_row
from fsrecrypt.db.pool import Pool


class EscrowKeys(Pool):
    """Escrow queries (part of :class:`fsrecrypt.db.Database`)."""

    @staticmethod
    def insert_escrow_deks(cur: Any, recording_id: str, deks: Sequence[tuple[str, bytes]]) -> None:
        """Store ``(key_ref, wrapped data key)`` pairs inside the caller's transaction."""
        for key_ref, edk in deks:
            cur.execute(
                "INSERT INTO recording_escrow_deks (recording_id, key_ref, encrypted_dek)"
                " VALUES (%s, %s, %s) ON CONFLICT (recording_id, key_ref)"
                " DO UPDATE SET encrypted_dek = EXCLUDED.encrypted_dek, created_at = now()",
                (recording_id, key_ref, base64.b64encode(edk).decode("ascii")),
            )

    def set_tenant_keys(self, tenant_id: str, kms_key_id: str, key_refs: Sequence[str]) -> None:
        """Primary and escrow keys in one statement (a key may move from one to the other)."""
        with self.transaction("setting the tenant's keys") as cur:
            cur.execute(
                "UPDATE tenants SET kms_key_id = %s, escrow_key_ids = %s WHERE id = %s",
                (kms_key_id, list(key_refs), tenant_id),
            )

    def recordings_to_promote(
        self, tenant_id: str, target: str, target_ref: str, *, after: str | None, limit: int
    ) -> list[str]:
        """Stored recordings not on primary ``target`` that hold an escrow copy by it."""
        with self.transaction("listing recordings whose escrow copy becomes primary") as cur:
            cur.execute(
                "SELECT c.id FROM call_recordings c JOIN recording_escrow_deks e"
                " ON e.recording_id = c.id AND e.key_ref = %s"
                " WHERE c.tenant_id = %s AND c.status = 'stored'"
                " AND c.kms_key_id IS DISTINCT FROM %s"
                " AND (%s::uuid IS NULL OR c.id > %s::uuid) ORDER BY c.id LIMIT %s",
                (target_ref, tenant_id, target, after, after, limit),
            )
            return [str(r[0]) for r in cur.fetchall()]

    def promote_escrow_copy(
        self,
        recording_id: str,
        *,
        target: str,
        target_ref: str,
        keep_old_as: str | None,
        audit: dict[str, Any],
    ) -> bool:
        """The escrow copy by ``target_ref`` becomes the primary copy (no key is called).

        What disaster recovery needs when the primary key is lost: the same
        EDK bytes, now named as the primary. The old primary copy stays as the
        escrow copy ``keep_old_as`` (if the old key is still an escrow key) or
        is dropped. False if the row is not stored or has no such copy.
        """
        with self.transaction("promoting an escrow copy to primary") as cur:
            cur.execute(
                "SELECT c.encrypted_dek, c.kms_key_id, c.tenant_id, e.encrypted_dek"
                " FROM call_recordings c JOIN recording_escrow_deks e"
                " ON e.recording_id = c.id AND e.key_ref = %s"
                " WHERE c.id = %s AND c.status = 'stored' FOR UPDATE OF c",
                (target_ref, recording_id),
            )
            row = cur.fetchone()
            if row is None:
                return False
            old_dek, old_key, tenant_id, new_dek = row
            cur.execute(
                "UPDATE call_recordings SET encrypted_dek = %s, kms_key_id = %s,"
                " updated_at = now(), encryption_metadata = encryption_metadata ||"
                " jsonb_build_object('previous_kms_key_id', %s::text) WHERE id = %s",
                (new_dek, target, old_key, recording_id),
            )
            cur.execute(
                "DELETE FROM recording_escrow_deks WHERE recording_id = %s AND key_ref = %s",
                (recording_id, target_ref),
            )
            if keep_old_as:
                self.insert_escrow_deks(
                    cur, recording_id, [(keep_old_as, base64.b64decode(old_dek))]
                )
            append_audit_row(cur, recording_id=recording_id, tenant_id=str(tenant_id), **audit)
            return True

    def escrow_deks(self, recording_id: str) -> list[tuple[str, bytes]]:
        """``(key_ref, wrapped data key)`` of a recording, in its tenant's escrow order."""
        with self.transaction("reading escrow copies of a data key") as cur:
            cur.execute(
                "SELECT e.key_ref, e.encrypted_dek FROM recording_escrow_deks e"
                " JOIN call_recordings c ON c.id = e.recording_id"
                " JOIN tenants t ON t.id = c.tenant_id"
                " WHERE e.recording_id = %s"
                " ORDER BY array_position(t.escrow_key_ids, e.key_ref) NULLS LAST, e.key_ref",
                (recording_id,),
            )
            return [(str(r[0]), base64.b64decode(r[1])) for r in cur.fetchall()]

    def recordings_escrow_differs(
        self, tenant_id: str, key_refs: Sequence[str], *, after: str | None, limit: int
    ) -> list[str]:
        """Stored recordings of a tenant whose escrow copies are not exactly ``key_refs``."""
        with self.transaction("listing recordings to re-wrap for escrow") as cur:
            cur.execute(
                "SELECT c.id FROM call_recordings c WHERE c.tenant_id = %s"
                " AND c.status = 'stored' AND (%s::uuid IS NULL OR c.id > %s::uuid)"
                " AND coalesce((SELECT array_agg(e.key_ref ORDER BY e.key_ref)"
                "  FROM recording_escrow_deks e WHERE e.recording_id = c.id), '{}')"
                " IS DISTINCT FROM %s::text[]"
                " ORDER BY c.id LIMIT %s",
                (tenant_id, after, after, sorted(key_refs), limit),
            )
            return [str(r[0]) for r in cur.fetchall()]

    def update_escrow_deks(
        self,
        recording_id: str,
        *,
        primary_dek: str,
        add: Sequence[tuple[str, bytes]],
        remove: Sequence[str],
        audit: dict[str, Any],
    ) -> bool:
        """Add and drop escrow copies of a still-stored recording, with its audit row.

        Compare-and-set on the primary wrapped key the new copies were made
        from: False (nothing changed) if the row was erased or re-wrapped
        meanwhile, so a copy of a shredded key can never be written back.
        """
        with self.transaction("re-wrapping a data key for escrow") as cur:
            cur.execute(
                "SELECT tenant_id FROM call_recordings"
                " WHERE id = %s AND status = 'stored' AND encrypted_dek = %s FOR UPDATE",
                (recording_id, primary_dek),
            )
            row = cur.fetchone()
            if row is None:
                return False
            if remove:
                cur.execute(
                    "DELETE FROM recording_escrow_deks WHERE recording_id = %s"
                    " AND key_ref = ANY(%s)",
                    (recording_id, list(remove)),
                )
            self.insert_escrow_deks(cur, recording_id, add)
            # Its copies are now the tenant's set: nothing is missing any more.
            cur.execute(
                "UPDATE call_recordings SET encryption_metadata ="
                " encryption_metadata - 'escrow_missing' WHERE id = %s"
                " AND encryption_metadata ? 'escrow_missing'",
                (recording_id,),
            )
            append_audit_row(cur, recording_id=recording_id, tenant_id=str(row[0]), **audit)
            return True
