"""The daemon's work queue over recording rows: due rows, leases, attempts and retries.

A worker claims a pending/failed row with a lease (``claimed_by`` names host
and pid, so a restarted daemon drops its own stale leases); a failed attempt
is counted (with a failed ``encrypt`` row in the audit log) and scheduled
again, or makes the row ``failed``. A failed row keeps its plaintext, so it
is never abandoned: ``next_attempt_at`` schedules its next automatic try (the
sweep's ``due_failed``), and ``retry_failed`` puts it back to ``pending`` at
once (``fsrecrypt retry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from fsrecrypt.db.audit import append_audit_row
from fsrecrypt.db.recordings import Recordings
from fsrecrypt.db.rows import (
    RECORDING_COLUMNS,
    Recording,
    Tenant,
    recording_from_row,
    tenant_from_row,
)


class WorkQueue(Recordings):
    """Leases and attempts (part of :class:`fsrecrypt.db.Database`)."""

    def due_pending(self, limit: int = 100) -> list[Recording]:
        with self.transaction("listing pending recordings") as cur:
            cur.execute(
                f"SELECT {RECORDING_COLUMNS} FROM call_recordings WHERE status = 'pending'"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
                " ORDER BY created_at LIMIT %s",
                (limit,),
            )
            return [recording_from_row(r) for r in cur.fetchall()]

    def oldest_pending_age(self) -> float:
        with self.transaction("measuring the backlog") as cur:
            cur.execute(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)"
                " FROM call_recordings WHERE status = 'pending'"
            )
            return float(cur.fetchone()[0])

    def claim(self, recording_id: str, worker: str, lease_seconds: float) -> Recording | None:
        """Take the lease on a pending/failed row; None if someone else holds it."""
        with self.transaction("claiming a recording") as cur:
            cur.execute(
                "UPDATE call_recordings SET claimed_by = %s,"
                " claimed_until = now() + make_interval(secs => %s), updated_at = now()"
                " WHERE id = %s AND status IN ('pending', 'failed')"
                " AND (claimed_until IS NULL OR claimed_until < now() OR claimed_by = %s)"
                f" RETURNING {RECORDING_COLUMNS}",
                (worker, lease_seconds, recording_id, worker),
            )
            row = cur.fetchone()
        return recording_from_row(row) if row else None

    def claim_with_tenant(
        self, recording_id: str, worker: str, lease_seconds: float
    ) -> tuple[Recording, Tenant] | None:
        """``claim`` plus the row's tenant as it is now, in one statement.

        The tenant (and so its current key) is read at the instant of the
        claim, just before the data key is generated, so a rotation takes
        effect at once as with a separate ``tenant_by_id``. None when the row
        cannot be claimed (not pending/failed, or leased by someone else);
        the caller then looks at the row the ordinary way.
        """
        rec_cols = ", ".join(f"c.{name}" for name in Recording.__dataclass_fields__)
        tenant_cols = ", ".join(f"t.{name}" for name in Tenant.__dataclass_fields__)
        with self.statement("claiming a recording") as cur:
            cur.execute(
                "WITH c AS (UPDATE call_recordings SET claimed_by = %s,"
                " claimed_until = now() + make_interval(secs => %s), updated_at = now()"
                " WHERE id = %s AND status IN ('pending', 'failed')"
                " AND (claimed_until IS NULL OR claimed_until < now() OR claimed_by = %s)"
                f" RETURNING {RECORDING_COLUMNS})"
                f" SELECT {rec_cols}, {tenant_cols} FROM c JOIN tenants t ON t.id = c.tenant_id",
                (worker, lease_seconds, recording_id, worker),
            )
            row = cur.fetchone()
        if row is None:
            return None
        split = len(Recording.__dataclass_fields__)
        return recording_from_row(row[:split]), tenant_from_row(row[split:])

    def renew_claims(self, worker: str, lease_seconds: float) -> int:
        """The daemon's heartbeat: push out the lease of every row this worker holds.

        Leases are short (``[jobs] lease_seconds``) and renewed every
        ``heartbeat_interval``, so a daemon that dies (SIGKILL, host loss)
        leaves its rows to another daemon within one lease.
        """
        with self.statement("renewing recording claims") as cur:
            cur.execute(
                "UPDATE call_recordings SET claimed_until = now() + make_interval(secs => %s)"
                " WHERE claimed_by = %s AND status IN ('pending', 'failed')",
                (lease_seconds, worker),
            )
            return cur.rowcount

    def expired_claims(self, limit: int = 100) -> int:
        """How many pending rows hold a lease that ran out (their daemon died)."""
        with self.statement("looking for expired recording claims") as cur:
            cur.execute(
                "SELECT count(*) FROM (SELECT 1 FROM call_recordings"
                " WHERE claimed_by IS NOT NULL AND claimed_until < now()"
                " AND status = 'pending' LIMIT %s) s",
                (limit,),
            )
            return int(cur.fetchone()[0])

    def release_claims(self, worker_prefix: str) -> int:
        """Drop leases left by a previous (crashed) run of this worker."""
        with self.transaction("releasing stale claims") as cur:
            cur.execute(
                "UPDATE call_recordings SET claimed_by = NULL, claimed_until = NULL"
                " WHERE claimed_by LIKE %s AND status IN ('pending', 'failed')",
                (worker_prefix.replace("%", r"\%") + "%",),
            )
            return cur.rowcount

    def due_failed(self, limit: int = 100) -> list[Recording]:
        """Failed rows whose scheduled automatic retry is due (and nobody holds)."""
        with self.transaction("listing failed recordings due for a retry") as cur:
            cur.execute(
                f"SELECT {RECORDING_COLUMNS} FROM call_recordings WHERE status = 'failed'"
                " AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()"
                " AND (claimed_until IS NULL OR claimed_until < now())"
                " ORDER BY next_attempt_at LIMIT %s",
                (limit,),
            )
            return [recording_from_row(r) for r in cur.fetchall()]

    def failed_summary(self) -> tuple[int, float | None]:
        """``(failed rows, seconds until the next automatic retry or None if none is set)``."""
        with self.transaction("counting failed recordings") as cur:
            cur.execute(
                "SELECT count(*), extract(epoch FROM min(next_attempt_at) - now())"
                " FROM call_recordings WHERE status = 'failed'"
            )
            count, next_in = cur.fetchone()
        return int(count), None if next_in is None else max(0.0, float(next_in))

    def record_attempt_failure(
        self,
        recording_id: str,
        error: str,
        *,
        final: bool,
        retry_in: float | None = None,
        audit: bool = True,
        user_id: str = "fsrecrypt",
    ) -> Recording:
        """Count a failed attempt; ``final`` moves the row to ``failed``.

        ``retry_in`` schedules the next try (for a final failure: the
        automatic retry of the failed row). With ``audit`` the attempt also
        gets a failed ``encrypt`` row in the tenant's audit chain, in the same
        transaction: every failed encryption is on record, not only in a log.
        """
        with self.transaction("recording a failed attempt") as cur:
            cur.execute(
                "UPDATE call_recordings SET attempts = attempts + 1, last_error = %s,"
                " status = CASE WHEN %s THEN 'failed' ELSE status END,"
                " next_attempt_at = CASE WHEN %s IS NULL THEN NULL"
                "   ELSE now() + make_interval(secs => %s) END,"
                " claimed_by = NULL, claimed_until = NULL, updated_at = now()"
                " WHERE id = %s AND status IN ('pending', 'failed')"
                f" RETURNING {RECORDING_COLUMNS}",
                (error[:2000], final, retry_in, retry_in, recording_id),
            )
            row = cur.fetchone()
            if row is not None and audit:
                failed = recording_from_row(row)
                append_audit_row(
                    cur,
                    action="encrypt",
                    user_id=user_id,
                    success=False,
                    recording_id=failed.id,
                    tenant_id=failed.tenant_id,
                    error_message=error,
                    details={
                        "attempt": failed.attempts,
                        "final": final,
                        "retry_in": None if retry_in is None else round(retry_in, 3),
                    },
                )
        if row is None:
            return self.recording(recording_id)
        return recording_from_row(row)

    def retry_failed(
        self,
        *,
        user_id: str,
        recording_ids: Sequence[str] | None = None,
        created_before: datetime | None = None,
    ) -> list[Recording]:
        """Put failed rows back to ``pending`` (due now), each with a ``retry`` audit row.

        ``recording_ids`` None means every failed row. The daemon's sweep then
        stores them with a fresh set of attempts. Rows that are not failed
        are left alone (a stored row is never touched).
        """
        clauses = ["status = 'failed'"]
        params: list[object] = []
        if recording_ids is not None:
            clauses.append("id::text = ANY(%s)")
            params.append(list(recording_ids))
        if created_before is not None:
            clauses.append("created_at < %s")
            params.append(created_before)
        with self.transaction("re-queueing failed recordings") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = 'pending', next_attempt_at = NULL,"
                " claimed_by = NULL, claimed_until = NULL, updated_at = now()"
                f" WHERE {' AND '.join(clauses)} RETURNING {RECORDING_COLUMNS}",
                params,
            )
            rows = sorted((recording_from_row(r) for r in cur.fetchall()), key=lambda r: r.id)
            for rec in rows:
                append_audit_row(
                    cur,
                    action="retry",
                    user_id=user_id,
                    success=True,
                    recording_id=rec.id,
                    tenant_id=rec.tenant_id,
                    details={"attempts": rec.attempts, "last_error": rec.last_error},
                )
        return rows

    def reset_for_retry(self, recording_id: str) -> None:
        with self.transaction("re-queueing a recording") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = 'pending', next_attempt_at = NULL,"
                " updated_at = now() WHERE id = %s AND status = 'failed'",
                (recording_id,),
            )
