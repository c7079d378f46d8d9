"""The schema: migrations in ``fsrecrypt/db/migrations/NNNN_name.sql`` and their runner.

Each migration is applied in its own transaction under an advisory lock, so
``fsrecrypt migrate`` is idempotent and safe to run concurrently (on every
deploy and at daemon start). A shipped migration is never edited: the next
change gets the next number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from fsrecrypt.db.pool import connect, translate_errors
from fsrecrypt.errors import DatabaseError, SchemaOutOfDate

MIGRATIONS_PACKAGE = "fsrecrypt.db.migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_MIGRATION_LOCK = 0x66737265  # "fsre": serialises concurrent `migrate` runs


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
    params = parse_dsn(dsn)
    dbname = params.get("dbname")
    if not dbname:
        raise DatabaseError(
            "the dsn names no database", hint="Add the database name to [database] dsn."
        )
    admin = {**params, "dbname": "postgres"}
    with translate_errors("creating the database"):
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
        with translate_errors("migrating"):
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


def applied_versions(conn: Any) -> set[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return set()
        cur.execute("SELECT version FROM schema_migrations")
        return {int(row[0]) for row in cur.fetchall()}


def check_schema(conn: Any) -> None:
    """Every migration this fsrecrypt ships must be applied, not just the highest number.

    Numbers may have gaps and a lower one can land after a higher one
    (branches reserve numbers), so "max applied >= count" would pass a
    database that lacks one of them.
    """
    missing = sorted({m.version for m in available_migrations()} - applied_versions(conn))
    if missing:
        raise SchemaOutOfDate(
            f"database schema is at version {schema_version(conn)} and lacks migration(s) "
            f"{', '.join(f'{v:04d}' for v in missing)} this fsrecrypt needs"
        )
    conn.rollback()
