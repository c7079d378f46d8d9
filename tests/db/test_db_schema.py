"""The schema runner in its package: migrations found, shipped, applied once, checked."""

from __future__ import annotations

import configparser
import threading
from pathlib import Path

import pytest

from fsrecrypt import db, errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fsrecrypt"

pytestmark = pytest.mark.integration


def test_migrations_ship_inside_the_db_package() -> None:
    """The runner reads ``fsrecrypt/db/migrations``; setup.cfg must put them in the wheel."""
    folder = PACKAGE / "db" / "migrations"
    files = sorted(p.name for p in folder.glob("*.sql"))
    assert db.MIGRATIONS_PACKAGE == "fsrecrypt.db.migrations"
    # Numbers are allotted per change (gaps are allowed while branches merge);
    # each file is one version, applied in order.
    versions = [m.version for m in db.available_migrations()]
    assert versions == sorted({int(name[:4]) for name in files}) and versions[0] == 1
    assert not list(PACKAGE.glob("migrations/*.sql")), "migrations left outside fsrecrypt/db"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in setup["options.package_data"]["fsrecrypt"].split(",")]
    shipped = {p.name for g in globs for p in PACKAGE.glob(g) if p.suffix == ".sql"}
    assert shipped == set(files), "setup.cfg package_data must list every migration"


def test_migrate_applies_each_migration_once_even_when_run_concurrently(fresh_dsn: str) -> None:
    want = [m.version for m in db.available_migrations()]
    applied: list[list[int]] = []

    def run() -> None:
        applied.append([m.version for m in db.migrate(fresh_dsn)])

    runners = [threading.Thread(target=run) for _ in range(3)]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    assert sorted(v for batch in applied for v in batch) == want
    assert db.migrate(fresh_dsn) == []
    database = db.Database(fresh_dsn)
    try:
        assert database.ping() == want[-1]
    finally:
        database.close()


def test_an_unmigrated_database_is_refused_with_a_hint(fresh_dsn: str) -> None:
    database = db.Database(fresh_dsn)
    try:
        with pytest.raises(errors.SchemaOutOfDate) as caught:
            database.ping()
        assert "fsrecrypt migrate" in (caught.value.hint or "")
        with pytest.raises(errors.SchemaOutOfDate):
            database.tenants()
    finally:
        database.close()


def test_database_keeps_every_query_of_the_single_module() -> None:
    """``services.db.<method>`` keeps working for every caller after the split."""
    methods = {
        "close", "connection", "transaction", "statement", "ping",
        "add_tenant", "tenants", "tenant_by_name", "tenant_by_id", "set_tenant_key",
        "create_pending", "create_pending_for_tenant_name", "recording", "recordings",
        "mark_stored", "repoint_source", "set_status", "status_counts", "known_sources",
        "rows_for_sources", "claim", "claim_with_tenant", "release_claims",
        "record_attempt_failure", "reset_for_retry", "due_pending", "oldest_pending_age",
        "hold_unassigned", "unassigned_for", "drop_unassigned",
        "audit", "audit_in_transaction", "audit_together", "audit_refusal",
        "refusal_buckets", "audit_rows",
    }  # fmt: skip
    missing = sorted(m for m in methods if not callable(getattr(db.Database, m, None)))
    assert not missing
