"""PostgreSQL: migrations, the connection pool and every query fsrecrypt runs.

All SQL lives here so the rest of the code speaks in recordings and tenants,
not cursors. psycopg2 is imported lazily (``fsrecrypt --help`` must stay fast);
under gevent, :func:`enable_gevent` installs psycogreen's wait callback so a
query yields to the hub instead of blocking the ESL reader.

Errors: connection-level failures become :class:`DatabaseError` (transient,
the pipeline retries them); constraint violations become the specific typed
errors the caller can act on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fsrecrypt.errors import (
    AlreadyExists,
    DatabaseError,
    InvalidState,
    NotFound,
    SchemaOutOfDate,
    UnknownTenant,
)

MIGRATIONS_PACKAGE = "fsrecrypt.migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_MIGRATION_LOCK = 0x66737265  # "fsre": serialises concurrent `migrate` runs
GENESIS_HASH = "0" * 64

_gevent_enabled = False


def enable_gevent() -> None:
    """Make psycopg2 cooperative (call once, after gevent monkey-patching)."""
    global _gevent_enabled
    if not _gevent_enabled:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
        _gevent_enabled = True


@contextlib.contextmanager
def _translate_errors(what: str) -> Iterator[None]:
    import psycopg2
    import psycopg2.errors

    try:
        yield
    except psycopg2.errors.UniqueViolation as exc:
        raise AlreadyExists(f"{what}: {exc.diag.message_detail or 'already exists'}") from None
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(f"{what}: database unavailable ({first})") from None
    except psycopg2.errors.UndefinedTable:
        raise SchemaOutOfDate(f"{what}: the database has no fsrecrypt schema") from None


def connect(dsn: str, *, connect_timeout: float = 5.0) -> Any:
    import psycopg2

    with _translate_errors("connecting to PostgreSQL"):
        return psycopg2.connect(dsn, connect_timeout=max(1, int(connect_timeout)))


# --- migrations -------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"two migration files share a number: {versions}")
    return found


def _create_database(dsn: str) -> bool:
    """Create the DSN's database if missing (connecting to 'postgres' to do so)."""
    import psycopg2
    from psycopg2 import sql
    from psycopg2.extensions import parse_dsn

    params = parse_dsn(dsn)
    dbname = params.get("dbname")
    if not dbname:
        raise DatabaseError(
            "the dsn names no database", hint="Add the database name to [database] dsn."
        )
    admin = {**params, "dbname": "postgres"}
    with _translate_errors("creating the database"):
        conn = psycopg2.connect(**admin)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
                if cur.fetchone():
                    return False
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                return True
        finally:
            conn.close()


def migrate(dsn: str, *, create_db: bool = False) -> list[Migration]:
    """Apply pending migrations, each in its own transaction; return those applied.

    Idempotent and safe to run concurrently (an advisory lock serialises
    runners), so it can run on every deploy and at daemon start.
    """
    if create_db:
        _create_database(dsn)
    conn = connect(dsn)
    applied: list[Migration] = []
    try:
        with _translate_errors("migrating"):
            for migration in available_migrations():
                with conn, conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    cur.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    cur.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                    )
                    if cur.fetchone():
                        continue
                    cur.execute(migration.sql)
                    cur.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                    applied.append(migration)
    finally:
        conn.close()
    return applied


def schema_version(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return int(cur.fetchone()[0])


def check_schema(conn: Any) -> None:
    have, want = schema_version(conn), len(available_migrations())
    if have < want:
        raise SchemaOutOfDate(f"database schema is at version {have}, fsrecrypt needs {want}")
    conn.rollback()


# --- rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    kms_key_id: str
    created_at: datetime


@dataclass(frozen=True)
class Recording:
    id: str
    tenant_id: str
    call_uuid: str | None
    core_uuid: str | None
    source_path: str
    source_fingerprint: str
    status: str
    encrypted: bool
    encryption_algorithm: str | None
    encrypted_dek: str | None
    kms_key_id: str | None
    s3_path: str | None
    file_size_bytes: int | None
    encrypted_size_bytes: int | None
    encryption_metadata: dict[str, Any]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    claimed_by: str | None
    claimed_until: datetime | None
    created_at: datetime
    updated_at: datetime
    stored_at: datetime | None
    erased_at: datetime | None

    def encrypted_dek_bytes(self) -> bytes:
        if not self.encrypted_dek:
            raise InvalidState(
                f"recording {self.id} has no wrapped data key (status {self.status})"
            )
        return base64.b64decode(self.encrypted_dek)


_RECORDING_COLUMNS = ", ".join(Recording.__dataclass_fields__)
_TENANT_COLUMNS = ", ".join(Tenant.__dataclass_fields__)


def _recording(row: Sequence[Any]) -> Recording:
    values = dict(zip(Recording.__dataclass_fields__, row, strict=True))
    values["id"] = str(values["id"])
    values["tenant_id"] = str(values["tenant_id"])
    return Recording(**values)


def _tenant(row: Sequence[Any]) -> Tenant:
    values = dict(zip(Tenant.__dataclass_fields__, row, strict=True))
    values["id"] = str(values["id"])
    return Tenant(**values)


# --- the audit chain ------------------------------------------------------------------


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


class Database:
    """A small connection pool plus the queries; safe to share across greenlets/threads."""

    def __init__(self, dsn: str, *, max_connections: int = 8, connect_timeout: float = 5.0):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._max = max_connections
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        self._slots.acquire()
        conn = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = connect(self.dsn, connect_timeout=self.connect_timeout)
            yield conn
        except BaseException:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            raise
        finally:
            if conn is not None and not conn.closed:
                with self._lock:
                    self._idle.append(conn)
            self._slots.release()

    @contextlib.contextmanager
    def transaction(self, what: str = "database operation") -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        with _translate_errors(what), self.connection() as conn:
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise

    @contextlib.contextmanager
    def statement(self, what: str = "database operation") -> Iterator[Any]:
        """A cursor for ONE self-contained statement, run in autocommit.

        Why: psycopg2 wraps every transaction in its own BEGIN and COMMIT
        round trips. A single statement is atomic (and durable once it
        returns) on its own, so the daemon's per-recording statements use this
        and pay one round trip instead of three. Never use it for work that
        needs several statements to be atomic together: use ``transaction``.
        """
        import psycopg2

        with _translate_errors(what), self.connection() as conn:
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    yield cur
            finally:
                try:
                    conn.autocommit = False
                except psycopg2.Error:  # a broken connection: drop it rather than pool it
                    conn.close()

    def ping(self) -> int:
        with self.transaction("checking the database") as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
        with _translate_errors("checking the schema"), self.connection() as conn:
            version = schema_version(conn)
            check_schema(conn)
        return version

    # --- tenants --------------------------------------------------------------------

    def add_tenant(self, name: str, kms_key_id: str) -> Tenant:
        import psycopg2.errors

        try:
            with self.transaction(f"adding tenant {name!r}") as cur:
                cur.execute(
                    "INSERT INTO tenants (name, kms_key_id) VALUES (%s, %s)"
                    f" RETURNING {_TENANT_COLUMNS}",
                    (name, kms_key_id),
                )
                return _tenant(cur.fetchone())
        except psycopg2.errors.CheckViolation:
            raise AlreadyExists(
                f"tenant name {name!r} is not allowed",
                hint="Use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            ) from None
        except AlreadyExists:
            raise AlreadyExists(f"tenant {name!r} already exists") from None

    def tenants(self) -> list[Tenant]:
        with self.transaction("listing tenants") as cur:
            cur.execute(f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY name")
            return [_tenant(r) for r in cur.fetchall()]

    def tenant_by_name(self, name: str) -> Tenant:
        with self.transaction("looking up a tenant") as cur:
            cur.execute(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = %s", (name,))
            row = cur.fetchone()
        if row is None:
            raise UnknownTenant(f"unknown tenant {name!r}")
        return _tenant(row)

    def tenant_by_id(self, tenant_id: str) -> Tenant:
        with self.transaction("looking up a tenant") as cur:
            cur.execute(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = %s", (tenant_id,))
            row = cur.fetchone()
        if row is None:
            raise UnknownTenant(f"unknown tenant id {tenant_id}")
        return _tenant(row)

    def set_tenant_key(self, tenant_id: str, kms_key_id: str) -> None:
        with self.transaction("switching the tenant's key") as cur:
            cur.execute("UPDATE tenants SET kms_key_id = %s WHERE id = %s", (kms_key_id, tenant_id))

    # --- recordings -------------------------------------------------------------------

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
                f" RETURNING {_RECORDING_COLUMNS}",
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
                return _recording(row), True
            cur.execute(
                f"SELECT {_RECORDING_COLUMNS} FROM call_recordings"
                " WHERE source_path = %s AND source_fingerprint = %s",
                (source_path, source_fingerprint),
            )
            return _recording(cur.fetchone()), False

    def recording(self, recording_id: str) -> Recording:
        with self.transaction("looking up a recording") as cur:
            try:
                cur.execute(
                    f"SELECT {_RECORDING_COLUMNS} FROM call_recordings WHERE id = %s",
                    (recording_id,),
                )
            except Exception as exc:
                if type(exc).__name__ == "InvalidTextRepresentation":
                    raise NotFound(f"no recording with id {recording_id!r}") from None
                raise
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no recording with id {recording_id!r}")
        return _recording(row)

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
    ) -> list[Recording]:
        clauses, params = [], []
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
            cur.execute(f"SELECT {_RECORDING_COLUMNS} FROM call_recordings{where}{tail}", params)
            return [_recording(r) for r in cur.fetchall()]

    def mark_stored(
        self,
        recording_id: str,
        *,
        encryption_algorithm: str,
        encrypted_dek: bytes,
        kms_key_id: str,
        s3_path: str,
        file_size_bytes: int,
        encrypted_size_bytes: int,
        metadata: Mapping[str, Any],
        claimed_by: str,
        audit: Mapping[str, Any] | None = None,
    ) -> Recording:
        """Move a row to ``stored`` (and write its audit row) in one transaction.

        Only a ``pending`` or ``failed`` row can become stored: a row that was
        stored, discarded or erased meanwhile is left alone (InvalidState).
        """
        with self.transaction("recording the stored object") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = 'stored', encrypted = true,"
                " encryption_algorithm = %s, encrypted_dek = %s, kms_key_id = %s, s3_path = %s,"
                " file_size_bytes = %s, encrypted_size_bytes = %s,"
                " encryption_metadata = encryption_metadata || %s::jsonb,"
                " last_error = NULL, next_attempt_at = NULL,"
                " stored_at = now(), updated_at = now(), claimed_by = NULL, claimed_until = NULL"
                " WHERE id = %s AND status IN ('pending', 'failed') AND claimed_by = %s"
                f" RETURNING {_RECORDING_COLUMNS}",
                (
                    encryption_algorithm,
                    base64.b64encode(encrypted_dek).decode("ascii"),
                    kms_key_id,
                    s3_path,
                    file_size_bytes,
                    encrypted_size_bytes,
                    json.dumps(dict(metadata)),
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
            recording = _recording(row)
            if audit is not None:
                self.audit_in_transaction(
                    cur, recording_id=recording_id, tenant_id=recording.tenant_id, **audit
                )
            return recording

    def claim(self, recording_id: str, worker: str, lease_seconds: float) -> Recording | None:
        """Take the lease on a pending/failed row; None if someone else holds it."""
        with self.transaction("claiming a recording") as cur:
            cur.execute(
                "UPDATE call_recordings SET claimed_by = %s,"
                " claimed_until = now() + make_interval(secs => %s), updated_at = now()"
                " WHERE id = %s AND status IN ('pending', 'failed')"
                " AND (claimed_until IS NULL OR claimed_until < now() OR claimed_by = %s)"
                f" RETURNING {_RECORDING_COLUMNS}",
                (worker, lease_seconds, recording_id, worker),
            )
            row = cur.fetchone()
        return _recording(row) if row else None

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
                f" RETURNING {_RECORDING_COLUMNS}",
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
            return _recording(row), True
        tenant = self.tenant_by_name(tenant_name)
        return self.create_pending(
            tenant_id=tenant.id,
            source_path=source_path,
            source_fingerprint=source_fingerprint,
            call_uuid=call_uuid,
            core_uuid=core_uuid,
            metadata=metadata,
        )

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
                f" RETURNING {_RECORDING_COLUMNS})"
                f" SELECT {rec_cols}, {tenant_cols} FROM c JOIN tenants t ON t.id = c.tenant_id",
                (worker, lease_seconds, recording_id, worker),
            )
            row = cur.fetchone()
        if row is None:
            return None
        split = len(Recording.__dataclass_fields__)
        return _recording(row[:split]), _tenant(row[split:])

    def release_claims(self, worker_prefix: str) -> int:
        """Drop leases left by a previous (crashed) run of this worker."""
        with self.transaction("releasing stale claims") as cur:
            cur.execute(
                "UPDATE call_recordings SET claimed_by = NULL, claimed_until = NULL"
                " WHERE claimed_by LIKE %s AND status IN ('pending', 'failed')",
                (worker_prefix.replace("%", r"\%") + "%",),
            )
            return cur.rowcount

    def record_attempt_failure(
        self, recording_id: str, error: str, *, final: bool, retry_in: float | None = None
    ) -> Recording:
        """Count a failed attempt; ``final`` moves the row to ``failed``."""
        with self.transaction("recording a failed attempt") as cur:
            cur.execute(
                "UPDATE call_recordings SET attempts = attempts + 1, last_error = %s,"
                " status = CASE WHEN %s THEN 'failed' ELSE status END,"
                " next_attempt_at = CASE WHEN %s IS NULL THEN NULL"
                "   ELSE now() + make_interval(secs => %s) END,"
                " claimed_by = NULL, claimed_until = NULL, updated_at = now()"
                " WHERE id = %s AND status IN ('pending', 'failed')"
                f" RETURNING {_RECORDING_COLUMNS}",
                (error[:2000], final, retry_in, retry_in, recording_id),
            )
            row = cur.fetchone()
        if row is None:
            return self.recording(recording_id)
        return _recording(row)

    def reset_for_retry(self, recording_id: str) -> None:
        with self.transaction("re-queueing a recording") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = 'pending', next_attempt_at = NULL,"
                " updated_at = now() WHERE id = %s AND status = 'failed'",
                (recording_id,),
            )

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
                    f" RETURNING {_RECORDING_COLUMNS}",
                    (new_fingerprint, recording_id, old_fingerprint),
                )
                row = cur.fetchone()
        except AlreadyExists:
            return None
        return _recording(row) if row else None

    def set_status(self, recording_id: str, status: str, *, error: str | None = None) -> None:
        with self.transaction("updating a recording") as cur:
            cur.execute(
                "UPDATE call_recordings SET status = %s, last_error = coalesce(%s, last_error),"
                " updated_at = now() WHERE id = %s",
                (status, error, recording_id),
            )

    def due_pending(self, limit: int = 100) -> list[Recording]:
        with self.transaction("listing pending recordings") as cur:
            cur.execute(
                f"SELECT {_RECORDING_COLUMNS} FROM call_recordings WHERE status = 'pending'"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
                " ORDER BY created_at LIMIT %s",
                (limit,),
            )
            return [_recording(r) for r in cur.fetchall()]

    def oldest_pending_age(self) -> float:
        with self.transaction("measuring the backlog") as cur:
            cur.execute(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)"
                " FROM call_recordings WHERE status = 'pending'"
            )
            return float(cur.fetchone()[0])

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

    # --- files waiting for their tenant -------------------------------------------------------

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

    def drop_unassigned(self, source_path: str, source_fingerprint: str) -> None:
        with self.transaction("forgetting a file of an unknown tenant") as cur:
            cur.execute(
                "DELETE FROM unassigned_files WHERE source_path = %s AND source_fingerprint = %s",
                (source_path, source_fingerprint),
            )

    # --- audit ------------------------------------------------------------------------------

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

    @staticmethod
    def audit_in_transaction(cur: Any, **fields: Any) -> int:
        """Append an audit row inside the caller's transaction, so a change and
        its log row commit (or roll back) together."""
        tenant_id = fields.get("tenant_id")
        fields.setdefault("details", None)
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
