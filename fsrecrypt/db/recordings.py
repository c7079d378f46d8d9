"""Recording rows: registered from a source file, stored, looked up, listed.

The ``(source_path, source_fingerprint)`` unique rule is what makes
registering idempotent: a replayed event or a sweep after a crash finds the
existing row instead of storing the file twice. Leases and attempts (the
daemon's work queue over the same rows) are in :mod:`fsrecrypt.db.queue`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from fsrecrypt.db.audit import append_audit_row
from fsrecrypt.db.masks import store_mask_verdict
from fsrecrypt.db.rows import RECORDING_COLUMNS, Recording, recording_from_row
from fsrecrypt.db.tenants import Tenants
from fsrecrypt.errors import AlreadyExists, InvalidState, NotFound

MASK_FILTERS = {
    "unverified": "mask_verified = false AND mask_ack_at IS NULL",
    "verified": "mask_verified = true",
    "any": "mask_verified IS NOT NULL",
    "none": "mask_verified IS NULL",
}


class Recordings(Tenants):
    """Recording queries (part of :class:`fsrecrypt.db.Database`); a recording has a tenant."""

    def create_pending(
        self,
        *,
        tenant_id: str,
        source_path: str,
        source_fingerprint: str,
        call_uuid: str | None = None,
        core_uuid: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        status: str = "pending",
        last_error: str | None = None,
    ) -> tuple[Recording, bool]:
        """Insert the row for a source file, or return the one that exists.

        Returns ``(row, created)``. The unique (path, fingerprint) rule makes
        this idempotent: a replayed event or a sweep after a crash finds the
        existing row instead of storing the file twice.
        """
        with self.transaction("recording a pending recording") as cur:
            cur.execute(
                "INSERT INTO call_recordings (tenant_id, call_uuid, core_uuid, source_path,"
                " source_fingerprint, status, encryption_metadata, last_error)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT ON CONSTRAINT call_recordings_source_unique DO NOTHING"
                f" RETURNING {RECORDING_COLUMNS}",
                (
                    tenant_id,
                    call_uuid,
                    core_uuid,
                    source_path,
                    source_fingerprint,
                    status,
                    json.dumps(dict(metadata or {})),
                    last_error,
                ),
            )
            row = cur.fetchone()
            if row is not None:
                return recording_from_row(row), True
            cur.execute(
                f"SELECT {RECORDING_COLUMNS} FROM call_recordings"
                " WHERE source_path = %s AND source_fingerprint = %s",
                (source_path, source_fingerprint),
            )
            return recording_from_row(cur.fetchone()), False

    def create_pending_for_tenant_name(
        self,
        *,
        tenant_name: str,
        source_path: str,
        source_fingerprint: str,
        call_uuid: str | None = None,
        core_uuid: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[Recording, bool]:
        """``create_pending`` for a tenant given by name, in one statement when the row is new.

        The daemon registers every RECORD_STOP as it arrives; resolving the
        tenant inside the INSERT saves the separate lookup transaction. When
        nothing was inserted (unknown tenant, or the row exists) the two
        cases are told apart by the ordinary lookups: ``UnknownTenant`` or
        ``(existing row, False)``, exactly as ``tenant_by_name`` followed by
        ``create_pending`` would answer.
        """
        with self.statement("recording a pending recording") as cur:
            cur.execute(
                "INSERT INTO call_recordings (tenant_id, call_uuid, core_uuid, source_path,"
                " source_fingerprint, status, encryption_metadata)"
                " SELECT t.id, %s, %s, %s, %s, 'pending', %s FROM tenants t WHERE t.name = %s"
                " ON CONFLICT ON CONSTRAINT call_recordings_source_unique DO NOTHING"
                f" RETURNING {RECORDING_COLUMNS}",
                (
                    call_uuid,
                    core_uuid,
                    source_path,
                    source_fingerprint,
                    json.dumps(dict(metadata or {})),
                    tenant_name,
                ),
            )
            row = cur.fetchone()
        if row is not None:
            return recording_from_row(row), True
        tenant = self.tenant_by_name(tenant_name)
        return self.create_pending(
            tenant_id=tenant.id,
            source_path=source_path,
            source_fingerprint=source_fingerprint,
            call_uuid=call_uuid,
            core_uuid=core_uuid,
            metadata=metadata,
        )

    def recording(self, recording_id: str) -> Recording:
        if "\x00" in recording_id:  # psycopg2 refuses NUL in a parameter (ValueError)
            raise NotFound(f"no recording with id {recording_id!r}")
        with self.transaction("looking up a recording") as cur:
            try:
                cur.execute(
                    f"SELECT {RECORDING_COLUMNS} FROM call_recordings WHERE id = %s",
                    (recording_id,),
                )
            except Exception as exc:
                if type(exc).__name__ == "InvalidTextRepresentation":
                    raise NotFound(f"no recording with id {recording_id!r}") from None
                raise
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no recording with id {recording_id!r}")
        return recording_from_row(row)

    def recordings(
        self,
        *,
        tenant_id: str | None = None,
        status: Sequence[str] | None = None,
        call_uuid: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        source_path: str | None = None,
        limit: int | None = None,
        after_id: str | None = None,
        mask: str | None = None,
    ) -> list[Recording]:
        """Rows matching every filter given; ``mask``: 'unverified' (not yet acknowledged),
        'verified', 'any' (a mask was announced) or 'none'."""
        clauses, params = [], []
        if mask is not None:
            clauses.append(MASK_FILTERS[mask])
        for column, value in (
            ("tenant_id", tenant_id),
            ("call_uuid", call_uuid),
            ("source_path", source_path),
        ):
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        if status:
            clauses.append("status = ANY(%s)")
            params.append(list(status))
        if created_from is not None:
            clauses.append("created_at >= %s")
            params.append(created_from)
        if created_to is not None:
            clauses.append("created_at < %s")
            params.append(created_to)
        if after_id is not None:
            clauses.append("id > %s")
            params.append(after_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        tail = " ORDER BY created_at, id" if after_id is None else " ORDER BY id"
        if limit is not None:
            tail += " LIMIT %s"
            params.append(limit)
        with self.transaction("listing recordings") as cur:
            cur.execute(f"SELECT {RECORDING_COLUMNS} FROM call_recordings{where}{tail}", params)
            return [recording_from_row(r) for r in cur.fetchall()]

    def mark_stored(
        self,
        recording_id: str,
        *,
        encryption_algorithm: str,
        encrypted_dek: bytes,
        kms_key_id: str,
        escrow_deks: Sequence[tuple[str, bytes]] = (),
        s3_path: str,
        file_size_bytes: int,
        encrypted_size_bytes: int,
        metadata: Mapping[str, Any],
        claimed_by: str,
        audit: Mapping[str, Any] | None = None,
        plaintext_hmac: tuple[str, str] | None = None,
        mask: tuple[int, list[dict[str, Any]] | None, bool | None] | None = None,
    ) -> Recording:
        """Move a row to ``stored`` (and write its audit row) in one transaction.

        Only a ``pending`` or ``failed`` row can become stored: a row that was
        stored, discarded or erased meanwhile is left alone (InvalidState).
        ``mask``: (mask session id, spans, verdict) of a recording with masked
        spans, written in the same transaction (:mod:`fsrecrypt.db.masks`).
        """
        with self.transaction("recording the stored object") as cur:
            if mask is not None:
                store_mask_verdict(cur, recording_id, *mask)
            cur.execute(
                "UPDATE call_recordings SET status = 'stored', encrypted = true,"
                " encryption_algorithm = %s, encrypted_dek = %s, kms_key_id = %s, s3_path = %s,"
                " file_size_bytes = %s, encrypted_size_bytes = %s,"
                " encryption_metadata = encryption_metadata || %s::jsonb,"
                " last_error = NULL, next_attempt_at = NULL,"
                " stored_at = now(), updated_at = now(), claimed_by = NULL, claimed_until = NULL,"
                " plaintext_hmac = %s, plaintext_hmac_key_id = %s"
                " WHERE id = %s AND status IN ('pending', 'failed') AND claimed_by = %s"
                f" RETURNING {RECORDING_COLUMNS}",
                (
                    encryption_algorithm,
                    base64.b64encode(encrypted_dek).decode("ascii"),
                    kms_key_id,
                    s3_path,
                    file_size_bytes,
                    encrypted_size_bytes,
                    json.dumps(dict(metadata)),
                    *(plaintext_hmac or (None, None)),
                    recording_id,
                    claimed_by,
                ),
            )
            row = cur.fetchone()
            if row is None:
                raise InvalidState(
                    f"recording {recording_id} is no longer pending or its claim was lost",
                    hint="Another worker took it over; this attempt's object is discarded.",
                )
            recording = recording_from_row(row)
            self.insert_escrow_deks(cur, recording_id, escrow_deks)  # one per escrow key
            if audit is not None:
                append_audit_row(
                    cur, recording_id=recording_id, tenant_id=recording.tenant_id, **audit
                )
            return recording

    def repoint_source(
        self, recording_id: str, old_fingerprint: str, new_fingerprint: str
    ) -> Recording | None:
        """Move a not-yet-stored row to its file's current fingerprint (the file grew).

        A RECORD_STOP can arrive while the WAV is still being written: the row
        registered then names the file's early size. Only a pending/failed row
        still naming ``old_fingerprint`` moves; None when it did not (another
        row already names the new fingerprint, or the row moved on).
        """
        try:
            with self.transaction("re-pointing a recording at its grown file") as cur:
                cur.execute(
                    "UPDATE call_recordings SET source_fingerprint = %s, updated_at = now()"
                    " WHERE id = %s AND source_fingerprint = %s"
                    " AND status IN ('pending', 'failed')"
                    f" RETURNING {RECORDING_COLUMNS}",
                    (new_fingerprint, recording_id, old_fingerprint),
                )
                row = cur.fetchone()
        except AlreadyExists:
            return None
        return recording_from_row(row) if row else None

    def set_status(self, recording_id: str, status: str, *, error: str | None = None) -> None:
        with self.transaction("updating a recording") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = %s, last_error = coalesce(%s, last_error),"
                " updated_at = now() WHERE id = %s",
                (status, error, recording_id),
            )

    def status_counts(self) -> dict[str, int]:
        with self.transaction("counting recordings") as cur:
            cur.execute("SELECT status, count(*) FROM call_recordings GROUP BY status")
            return {status: int(n) for status, n in cur.fetchall()}

    def known_sources(self, paths: Sequence[str]) -> set[str]:
        """Which of these paths have a row that is not terminally failed."""
        if not paths:
            return set()
        with self.transaction("checking known files") as cur:
            cur.execute(
                "SELECT DISTINCT source_path FROM call_recordings WHERE source_path = ANY(%s)",
                (list(paths),),
            )
            return {r[0] for r in cur.fetchall()}

    def rows_for_sources(self, paths: Sequence[str]) -> list[tuple[str, str, str, str]]:
        """``(source_path, source_fingerprint, status, id)`` of every row naming these paths.

        The daemon's sweep uses it to tell a file nobody has seen (adopt it)
        from one a row already covers (resume, finish or leave alone).
        """
        if not paths:
            return []
        with self.transaction("checking known files") as cur:
            cur.execute(
                "SELECT source_path, source_fingerprint, status, id::text FROM call_recordings"
                " WHERE source_path = ANY(%s)",
                (list(paths),),
            )
            return [(r[0], r[1], r[2], r[3]) for r in cur.fetchall()]
