"""Rows of recordings uploaded through the API: created claimed, keyed by Idempotency-Key.

An upload has no file on disk for the daemon's sweep to resume: its row is
created already claimed by the uploading request (``source_path`` is
``upload:<id>``, outside every recordings directory, so no sweep touches it),
and it becomes ``stored`` or ``discarded`` before that request answers. A
server killed mid-upload leaves a pending row whose lease runs out;
:meth:`Uploads.discard_abandoned_uploads` (``fsrecrypt serve``'s housekeeping)
moves it to ``discarded``, with an audit row, so it is neither a backlog nor
a lost recording.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from fsrecrypt.db.audit import append_audit_row
from fsrecrypt.db.pool import Pool
from fsrecrypt.db.rows import RECORDING_COLUMNS, Recording, recording_from_row

UPLOAD_PREFIX = "upload:"
UPLOAD_FINGERPRINT = "upload"


class Uploads(Pool):
    """Upload queries (part of :class:`fsrecrypt.db.Database`)."""

    def upload_by_key(self, tenant_id: str, idempotency_key: str) -> Recording | None:
        """The live (not discarded) upload of ``tenant_id`` made with this Idempotency-Key."""
        with self.transaction("looking up an upload by its idempotency key") as cur:
            cur.execute(
                f"SELECT {RECORDING_COLUMNS} FROM call_recordings WHERE tenant_id = %s"
                " AND idempotency_key = %s AND status <> 'discarded'",
                (tenant_id, idempotency_key),
            )
            row = cur.fetchone()
        return recording_from_row(row) if row else None

    def create_upload(
        self,
        *,
        tenant_id: str,
        call_uuid: str,
        metadata: Mapping[str, Any],
        worker: str,
        lease_seconds: float,
        idempotency_key: str | None = None,
    ) -> tuple[Recording, bool]:
        """Insert the pending row of an upload, claimed by ``worker``; ``(row, created)``.

        With an ``idempotency_key`` that a live upload of the tenant already
        holds, nothing is inserted and that upload's row is returned
        (``created`` False), also when the two requests race.
        """
        recording_id = str(uuid.uuid4())
        with self.transaction("recording an upload") as cur:
            cur.execute(
                "INSERT INTO call_recordings (id, tenant_id, call_uuid, source_path,"
                " source_fingerprint, status, encryption_metadata, idempotency_key,"
                " claimed_by, claimed_until)"
                " VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, %s,"
                " now() + make_interval(secs => %s))"
                " ON CONFLICT DO NOTHING"
                f" RETURNING {RECORDING_COLUMNS}",
                (
                    recording_id,
                    tenant_id,
                    call_uuid,
                    UPLOAD_PREFIX + recording_id,
                    UPLOAD_FINGERPRINT,
                    json.dumps(dict(metadata)),
                    idempotency_key,
                    worker,
                    lease_seconds,
                ),
            )
            row = cur.fetchone()
        if row is not None:
            return recording_from_row(row), True
        existing = self.upload_by_key(tenant_id, idempotency_key or "")
        if existing is None:  # the other upload was discarded meanwhile: try once more
            return self.create_upload(
                tenant_id=tenant_id,
                call_uuid=call_uuid,
                metadata=metadata,
                worker=worker,
                lease_seconds=lease_seconds,
                idempotency_key=idempotency_key,
            )
        return existing, False

    def discard_upload(
        self, recording_id: str, worker: str, error: str, audit: Mapping[str, Any]
    ) -> bool:
        """An upload that stored nothing: ``discarded`` and a failed audit row, together."""
        with self.transaction("discarding an upload") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = 'discarded', last_error = %s,"
                " claimed_by = NULL, claimed_until = NULL, updated_at = now()"
                " WHERE id = %s AND status = 'pending' AND claimed_by = %s"
                " RETURNING tenant_id",
                (error[:2000], recording_id, worker),
            )
            row = cur.fetchone()
            if row is None:
                return False
            append_audit_row(
                cur,
                recording_id=recording_id,
                tenant_id=str(row[0]),
                success=False,
                error_message=error,
                **audit,
            )
            return True

    def discard_abandoned_uploads(self, limit: int = 100) -> list[str]:
        """Uploads whose request died with its server (lease expired): discarded, audited."""
        with self.transaction("discarding abandoned uploads") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = 'discarded',"
                " last_error = 'upload abandoned: the server stopped before the body ended',"
                " claimed_by = NULL, claimed_until = NULL, updated_at = now()"
                " WHERE id IN (SELECT id FROM call_recordings WHERE status = 'pending'"
                "  AND source_fingerprint = %s AND source_path LIKE 'upload:%%'"
                "  AND claimed_until < now() ORDER BY created_at LIMIT %s"
                "  FOR UPDATE SKIP LOCKED)"
                " RETURNING id, tenant_id",
                (UPLOAD_FINGERPRINT, limit),
            )
            rows = cur.fetchall()
            for recording_id, tenant_id in rows:
                append_audit_row(
                    cur,
                    action="upload",
                    user_id="fsrecrypt",
                    success=False,
                    recording_id=str(recording_id),
                    tenant_id=str(tenant_id),
                    error_message="upload abandoned (lease expired)",
                    details={"origin": "upload"},
                )
        return [str(r[0]) for r in rows]
