"""The access log: a hash chain per tenant, bounded free text, counted anonymous refusals.

Every row carries the hash of the row before it in its chain (one chain per
tenant, one global), so an edited, deleted or reordered row is found by
``fsrecrypt audit verify``. Rows are never updated or deleted; that is why
every caller-supplied text is bounded before it is written, and why anonymous
refusals are counted per minute rather than logged one row each.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import ipaddress
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from fsrecrypt.db.pool import Pool

GENESIS_HASH = "0" * 64

AUDIT_FIELDS = (
    "recording_id",
    "tenant_id",
    "user_id",
    "action",
    "ip_address",
    "user_agent",
    "decryption_duration_ms",
    "success",
    "error_message",
    "details",
    "accessed_at",
)


USER_AGENT_LIMIT = 512
"""Characters of a User-Agent kept in an audit row (a real one is ~150)."""
ERROR_TEXT_LIMIT = 2000
USER_ID_LIMIT = 200
DETAIL_TEXT_LIMIT = 2000
"""Characters kept of any string inside ``details`` (callers may bound tighter)."""
_DETAIL_DEPTH = 4
_DETAIL_ITEMS = 200


def bounded(text: Any, limit: int) -> str | None:
    """``text`` as a str of at most ``limit`` characters, cut with a visible marker.

    Why: every free-text field of an audit row can come from a caller (User-
    Agent, a path, a Range header, an error naming them); audit rows are never
    deleted, so an unbounded field lets anyone grow the log without limit.
    NUL characters, which PostgreSQL text and jsonb refuse (the row would
    fail to be written at all), are shown as ``\\x00``.
    """
    if text is None:
        return None
    text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if len(text) <= limit:
        return text
    marker = f"...[{len(text)} chars, truncated]"
    return text[: max(0, limit - len(marker))] + marker


def bounded_details(value: Any, limit: int = DETAIL_TEXT_LIMIT, depth: int = 0) -> Any:
    """``details`` with every string (and key) bounded, and containers capped in size."""
    if isinstance(value, str):
        return bounded(value, limit)
    if isinstance(value, Mapping):
        if depth >= _DETAIL_DEPTH:
            return bounded(json.dumps(value, default=str), limit)
        items = list(value.items())[:_DETAIL_ITEMS]
        return {bounded(k, 200): bounded_details(v, limit, depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        if depth >= _DETAIL_DEPTH:
            return bounded(json.dumps(value, default=str), limit)
        return [bounded_details(v, limit, depth + 1) for v in value[:_DETAIL_ITEMS]]
    return value


def audit_row_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """sha256 over the previous hash and a canonical JSON of the row's fields."""
    canonical = {}
    for name in AUDIT_FIELDS:
        value = fields.get(name)
        if isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat(timespec="microseconds")
        elif name == "ip_address" and value is not None:
            value = str(ipaddress.ip_address(str(value).split("/")[0]))
        elif name in ("recording_id", "tenant_id") and value is not None:
            value = str(value)
        elif name == "decryption_duration_ms" and value is not None:
            value = round(float(value), 3)
        canonical[name] = value
    payload = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(prev_hash.encode("ascii") + payload.encode("utf-8")).hexdigest()


_REQUEST = contextvars.ContextVar[Mapping[str, Any] | None]("fsrecrypt_audit_request", default=None)


@contextlib.contextmanager
def audit_context(
    details: Mapping[str, Any], *, ip_address: str | None = None, user_agent: str | None = None
) -> Iterator[None]:
    """Every audit row written inside (this greenlet or thread) also says who asked, and from where.

    Why: the API runs the CLI's own domain functions (holds, erasure, custody),
    which write their rows with a user id only; the request's credential
    (API key id, token issuer, the service acting for a user) and the
    client's address belong in those same rows. A row's own details and
    address win over the context's.
    """
    token = _REQUEST.set(
        {"details": dict(details), "ip_address": ip_address, "user_agent": user_agent}
    )
    try:
        yield
    finally:
        _REQUEST.reset(token)


def append_audit_row(cur: Any, **fields: Any) -> int:
    """Append an audit row inside the caller's transaction, so a change and
    its log row commit (or roll back) together."""
    tenant_id = fields.get("tenant_id")
    fields.setdefault("details", None)
    request = _REQUEST.get()
    if request is not None:
        fields["details"] = {**request["details"], **(fields["details"] or {})}
        for name in ("ip_address", "user_agent"):
            if not fields.get(name):
                fields[name] = request[name]
    fields["details"] = bounded_details(dict(fields["details"] or {}))
    fields["user_id"] = bounded(fields["user_id"], USER_ID_LIMIT)
    if fields.get("error_message"):
        fields["error_message"] = bounded(fields["error_message"], ERROR_TEXT_LIMIT)
    if fields.get("user_agent"):
        fields["user_agent"] = bounded(fields["user_agent"], USER_AGENT_LIMIT)
    if fields.get("decryption_duration_ms") is not None:
        fields["decryption_duration_ms"] = round(float(fields["decryption_duration_ms"]), 3)
    chain = str(tenant_id) if tenant_id else "global"
    # Lock, then read the chain's head and the row's time: two statements
    # in one message (one round trip while the chain is locked). Under READ
    # COMMITTED each statement of a message takes its own snapshot, so the
    # SELECT sees every row committed by whoever held the lock before us.
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7));"
        " SELECT (SELECT row_hash FROM recording_access_logs"
        " WHERE tenant_id IS NOT DISTINCT FROM %s ORDER BY id DESC LIMIT 1),"
        " date_trunc('microseconds', clock_timestamp())",
        ("audit:" + chain, tenant_id),
    )
    last_hash, fields["accessed_at"] = cur.fetchone()
    prev_hash = last_hash or GENESIS_HASH
    row_hash = audit_row_hash(prev_hash, fields)
    cur.execute(
        "INSERT INTO recording_access_logs (recording_id, tenant_id, user_id, action,"
        " ip_address, user_agent, decryption_duration_ms, success, error_message, details,"
        " accessed_at, prev_hash, row_hash)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            fields.get("recording_id"),
            tenant_id,
            fields["user_id"],
            fields["action"],
            fields.get("ip_address"),
            fields.get("user_agent"),
            fields.get("decryption_duration_ms"),
            fields["success"],
            fields.get("error_message"),
            json.dumps(fields["details"]),
            fields["accessed_at"],
            prev_hash,
            row_hash,
        ),
    )
    return int(cur.fetchone()[0])


class AuditLog(Pool):
    """Writing and reading the access log (part of :class:`fsrecrypt.db.Database`)."""

    audit_in_transaction = staticmethod(append_audit_row)

    def audit(
        self,
        *,
        action: str,
        user_id: str,
        success: bool,
        recording_id: str | None = None,
        tenant_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        decryption_duration_ms: float | None = None,
        error_message: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one row to the tenant's hash-chained access log."""
        with self.transaction("writing the access log") as cur:
            return self.audit_in_transaction(
                cur,
                action=action,
                user_id=user_id,
                success=success,
                recording_id=recording_id,
                tenant_id=tenant_id,
                ip_address=ip_address,
                user_agent=user_agent,
                decryption_duration_ms=decryption_duration_ms,
                error_message=error_message,
                details=details,
            )

    def audit_together(self, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append several audit rows (possibly to different chains) in one transaction.

        Why: a refused cross-tenant request is logged in the caller's chain
        and in the owner's; both rows commit together, in one round trip
        like a single row, so the refusal takes as long as any other 404.
        Chains are locked in a fixed order (by chain name), so two such
        transactions cannot deadlock.
        """
        ordered = sorted(rows, key=lambda r: str(r.get("tenant_id") or "global"))
        with self.transaction("writing the access log") as cur:
            return [self.audit_in_transaction(cur, **dict(r)) for r in ordered]

    def audit_refusal(
        self,
        *,
        action: str,
        reason: str,
        ip_address: str | None,
        user_agent: str | None = None,
        error_message: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> tuple[int, int | None]:
        """Count an anonymous refusal; the first of its minute becomes an audit row.

        Why: an unauthenticated caller costs nothing to repeat, and audit rows
        are never deleted, so one row per anonymous request lets anyone grow
        the log without bound. Refusals are counted per (client address,
        action, reason, minute) in ``audit_refusal_buckets``; the first one
        of each bucket is written to the global hash chain as an ordinary
        row (so the attempt is tamper-evident at once), and that row also
        carries the final count of the same client's previous bucket, which
        is thereby sealed into the chain too. Chain rows are never updated:
        the hash chain keeps its meaning.

        Returns (count so far in this bucket, id of the audit row written or None).
        """
        client = str(ip_address) if ip_address else "unknown"
        reason = bounded(reason, 100) or "refused"
        with self.transaction("counting a refused request") as cur:
            cur.execute(
                "INSERT INTO audit_refusal_buckets AS b (bucket_start, client, action, reason,"
                " refusals, first_seen_at, last_seen_at)"
                " VALUES (date_trunc('minute', clock_timestamp()), %s, %s, %s, 1,"
                " clock_timestamp(), clock_timestamp())"
                " ON CONFLICT (client, action, reason, bucket_start) DO UPDATE"
                " SET refusals = b.refusals + 1, last_seen_at = EXCLUDED.last_seen_at"
                " RETURNING refusals, bucket_start",
                (client, action, reason),
            )
            refusals, bucket_start = cur.fetchone()
            if refusals > 1:
                return int(refusals), None
            cur.execute(
                "SELECT bucket_start, refusals FROM audit_refusal_buckets"
                " WHERE client = %s AND action = %s AND reason = %s AND bucket_start < %s"
                " AND sealed_by_log_id IS NULL ORDER BY bucket_start DESC LIMIT 1",
                (client, action, reason, bucket_start),
            )
            previous = cur.fetchone()
            aggregate: dict[str, Any] = {
                "aggregated": "first anonymous refusal of this client, action and reason"
                " in this minute; the count is in audit_refusal_buckets",
                "bucket_start": bucket_start.astimezone(UTC).isoformat(),
            }
            if previous is not None:
                aggregate["previous_bucket"] = {
                    "start": previous[0].astimezone(UTC).isoformat(),
                    "refusals": int(previous[1]),
                }
            log_id = self.audit_in_transaction(
                cur,
                action=action,
                user_id="anonymous",
                success=False,
                tenant_id=None,
                ip_address=ip_address,
                user_agent=user_agent,
                error_message=error_message or reason,
                details={**(details or {}), **aggregate},
            )
            cur.execute(
                "UPDATE audit_refusal_buckets SET first_log_id = %s"
                " WHERE client = %s AND action = %s AND reason = %s AND bucket_start = %s",
                (log_id, client, action, reason, bucket_start),
            )
            if previous is not None:
                cur.execute(
                    "UPDATE audit_refusal_buckets SET sealed_by_log_id = %s"
                    " WHERE client = %s AND action = %s AND reason = %s AND bucket_start = %s",
                    (log_id, client, action, reason, previous[0]),
                )
        return 1, log_id

    def refusal_buckets(self, client: str | None = None) -> list[dict[str, Any]]:
        """The anonymous-refusal counters (oldest first), for operators and tests."""
        with self.transaction("reading refused-request counts") as cur:
            cur.execute(
                "SELECT * FROM audit_refusal_buckets WHERE %s IS NULL OR client = %s"
                " ORDER BY bucket_start, client, action, reason",
                (client, client),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def audit_rows(
        self,
        *,
        tenant_id: str | None = None,
        recording_id: str | None = None,
        action: str | None = None,
    ) -> list[dict[str, Any]]:
        clauses, params = [], []
        if tenant_id is not None:
            clauses.append("tenant_id = %s")
            params.append(tenant_id)
        if recording_id is not None:
            clauses.append("recording_id = %s")
            params.append(recording_id)
        if action is not None:
            clauses.append("action = %s")
            params.append(action)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.transaction("reading the access log") as cur:
            cur.execute(f"SELECT * FROM recording_access_logs{where} ORDER BY id", params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
