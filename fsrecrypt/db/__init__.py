"""PostgreSQL: the connection pool, the schema and every query fsrecrypt runs.

All SQL lives in this package so the rest of the code speaks in recordings
and tenants, not cursors. One module per responsibility:

- ``pool``: connections (psycogreen under gevent), transactions, error mapping
- ``schema``: the migrations runner; the SQL files are in ``migrations/``
- ``rows``: the ``Tenant`` and ``Recording`` rows
- ``tenants``, ``recordings``, ``queue`` (leases and attempts),
  ``unassigned`` (files whose tenant does not exist yet), ``audit`` (the
  hash-chained access log, bounded text, counted refusals)
- ``database``: ``Database``, composed from those parts

Importing this package imports psycopg2 (``pool`` does, at its top): the
light paths (``fsrecrypt --help``, a local ``encrypt``/``decrypt``) never
import it, because the command line loads the command modules that reach the
database only when their command is named (``tests/test_cli.py`` checks it).
psycogreen, which brings gevent, is imported only by :func:`enable_gevent`.
"""

from fsrecrypt.db.audit import (
    AUDIT_FIELDS,
    DETAIL_TEXT_LIMIT,
    ERROR_TEXT_LIMIT,
    GENESIS_HASH,
    USER_AGENT_LIMIT,
    USER_ID_LIMIT,
    append_audit_row,
    audit_context,
    audit_row_hash,
    bounded,
    bounded_details,
)
from fsrecrypt.db.database import Database
from fsrecrypt.db.pool import connect, enable_gevent
from fsrecrypt.db.rows import Recording, Tenant
from fsrecrypt.db.schema import (
    MIGRATIONS_PACKAGE,
    Migration,
    available_migrations,
    check_schema,
    migrate,
    schema_version,
)

__all__ = [
    "AUDIT_FIELDS",
    "DETAIL_TEXT_LIMIT",
    "ERROR_TEXT_LIMIT",
    "GENESIS_HASH",
    "MIGRATIONS_PACKAGE",
    "USER_AGENT_LIMIT",
    "USER_ID_LIMIT",
    "Database",
    "Migration",
    "Recording",
    "Tenant",
    "append_audit_row",
    "audit_context",
    "audit_row_hash",
    "available_migrations",
    "bounded",
    "bounded_details",
    "check_schema",
    "connect",
    "enable_gevent",
    "migrate",
    "schema_version",
]
