"""Real PostgreSQL for the tests: a fresh database per test session.

The server itself is the machine's PostgreSQL on 127.0.0.1:5432. If it is not
accepting connections the fixture starts it (``.ci/ensure-postgres``) rather
than skipping: a green run that never touched the database proves nothing.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADMIN_DSN = os.environ.get(
    "FSRECRYPT_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def ensure_postgres() -> None:
    subprocess.run(["bash", str(ROOT / ".ci" / "ensure-postgres")], check=True)


def _admin_execute(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(ADMIN_DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(name: str) -> str:
    _admin_execute(f'CREATE DATABASE "{name}"')
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


def drop_database(name: str) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A migrated, empty database of its own for this test session."""
    ensure_postgres()
    name = f"fsrecrypt_test_{uuid.uuid4().hex[:12]}"
    dsn = create_database(name)
    from fsrecrypt import db

    db.migrate(dsn)
    try:
        yield dsn
    finally:
        drop_database(name)


@pytest.fixture
def fresh_dsn() -> Iterator[str]:
    """An empty, unmigrated database for tests of the migration runner itself."""
    ensure_postgres()
    name = f"fsrecrypt_test_{uuid.uuid4().hex[:12]}"
    dsn = create_database(name)
    try:
        yield dsn
    finally:
        drop_database(name)
