"""The access log's hash chain: tampering is found and named; exports are complete.

Each test gets a database of its own, because these tests edit, delete and
renumber access-log rows on purpose and a shared chain would then fail every
later verification.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from click.testing import CliRunner

from fsrecrypt import db
from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.lifecycle.audit import verify_audit_chains
from fsrecrypt.pipeline import Services
from tests.support.pg import create_database, drop_database, ensure_postgres


@pytest.fixture
def audit_env(tmp_path: Path) -> Iterator[tuple[str, Path, Services]]:
    ensure_postgres()
    name = f"fsrecrypt_test_audit_{uuid.uuid4().hex[:10]}"
    dsn = create_database(name)
    db.migrate(dsn)
    cfg = tmp_path / "fsrecrypt.toml"
    cfg.write_text(
        f'[database]\ndsn = "{dsn}"\n'
        f'[keys]\nkeyring = "{tmp_path / "keyring.json"}"\n'
        f'[storage]\npath = "{tmp_path / "objects"}"\n'
    )
    services = Services(load_config(cfg))
    try:
        yield dsn, cfg, services
    finally:
        services.close()
        drop_database(name)


def _populate(services: Services) -> tuple[str, str]:
    """Two tenants with five rows each plus three global rows, interleaved."""
    a = services.db.add_tenant("acme", "k1").id
    b = services.db.add_tenant("globex", "k1").id
    for i in range(5):
        for tenant in (a, b):
            services.db.audit(
                action="download" if i % 2 else "stream",
                user_id=f"user{i}",
                success=bool(i % 3),
                tenant_id=tenant,
                ip_address="10.0.0.7",
                user_agent="pytest",
                decryption_duration_ms=1.5 + i,
                error_message=None if i % 3 else "AuthError: nope",
                details={"bytes": 100 * i, "range": [0, i]},
            )
        if i < 3:
            services.db.audit(action="expire", user_id="cron", success=True, details={"n": i})
    return a, b


def _sql(dsn: str, statement: str, params: tuple = ()) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
    finally:
        conn.close()


def _ids(services: Services, tenant_id: str) -> list[int]:
    return [r["id"] for r in services.db.audit_rows(tenant_id=tenant_id)]


def _cli(cfg: Path, *args: str) -> object:
    return CliRunner().invoke(main, ["-c", str(cfg), *args], catch_exceptions=False)


def test_intact_chains_pass(audit_env) -> None:
    _dsn, cfg, services = audit_env
    _populate(services)
    result = verify_audit_chains(services)
    assert result.ok, [p.line() for p in result.problems]
    assert result.chains == 3 and result.rows == 13
    run = _cli(cfg, "audit", "verify")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "chains": 3,
        "rows": 13,
        "problems": 0,
    }
    # The verification run is itself logged, and the chain stays intact.
    assert services.db.audit_rows(action="audit_verify")
    assert verify_audit_chains(services).ok


def test_edited_row_is_named(audit_env) -> None:
    dsn, cfg, services = audit_env
    a, _b = _populate(services)
    victim = _ids(services, a)[2]
    _sql(dsn, "UPDATE recording_access_logs SET action = 'nothing' WHERE id = %s", (victim,))
    run = _cli(cfg, "audit", "verify")
    assert run.exit_code == 1
    assert f"[acme] row {victim}: edited" in run.stdout
    assert "not intact" in run.stderr
    problems = verify_audit_chains(services).problems
    assert [(p.row_id, p.kind) for p in problems] == [(victim, "edited")]


def test_edited_details_and_success_are_named(audit_env) -> None:
    dsn, _cfg, services = audit_env
    a, b = _populate(services)
    one, two = _ids(services, a)[0], _ids(services, b)[4]
    _sql(dsn, "UPDATE recording_access_logs SET success = NOT success WHERE id = %s", (one,))
    _sql(
        dsn,
        "UPDATE recording_access_logs SET details = '{\"bytes\": 1}'::jsonb WHERE id = %s",
        (two,),
    )
    found = {(p.chain, p.row_id, p.kind) for p in verify_audit_chains(services).problems}
    assert found == {("acme", one, "edited"), ("globex", two, "edited")}


def test_deleted_row_is_named(audit_env) -> None:
    dsn, cfg, services = audit_env
    a, _b = _populate(services)
    ids = _ids(services, a)
    _sql(dsn, "DELETE FROM recording_access_logs WHERE id = %s", (ids[2],))
    problems = verify_audit_chains(services).problems
    kinds = {(p.row_id, p.kind) for p in problems}
    assert (ids[3], "deleted") in kinds  # the row after the gap names it
    assert any(p.row_id is None and "1 row(s) missing" in p.detail for p in problems)
    text = next(p.line() for p in problems if p.row_id == ids[3])
    assert f"between row {ids[1]} and row {ids[3]}" in text
    run = _cli(cfg, "audit", "verify", "--tenant", "acme")
    assert run.exit_code == 1 and f"row {ids[3]}: deleted" in run.stdout


def test_deleted_newest_rows_are_named(audit_env) -> None:
    dsn, _cfg, services = audit_env
    _a, b = _populate(services)
    ids = _ids(services, b)
    _sql(dsn, "DELETE FROM recording_access_logs WHERE id = ANY(%s)", (ids[-2:],))
    problems = verify_audit_chains(services).problems
    assert any(
        p.kind == "truncated" and p.row_id == ids[-3] and f"records row {ids[-1]}" in p.detail
        for p in problems
    ), [p.line() for p in problems]


def test_swapped_rows_are_named(audit_env) -> None:
    dsn, _cfg, services = audit_env
    a, _b = _populate(services)
    ids = _ids(services, a)
    x, y = ids[1], ids[3]
    # Renumber: swap the two rows' positions in the table's order.
    _sql(dsn, "UPDATE recording_access_logs SET id = -1 WHERE id = %s", (x,))
    _sql(dsn, "UPDATE recording_access_logs SET id = %s WHERE id = %s", (x, y))
    _sql(dsn, "UPDATE recording_access_logs SET id = %s WHERE id = -1", (y,))
    problems = verify_audit_chains(services).problems
    reordered = {p.row_id for p in problems if p.kind == "reordered"}
    assert x in reordered and y in reordered, [p.line() for p in problems]
    assert not [p for p in problems if p.kind == "edited"]  # the contents are untouched
    line = next(p.line() for p in problems if p.row_id == x)
    assert "higher id" in line


def test_row_moved_to_another_tenant_is_named(audit_env) -> None:
    dsn, _cfg, services = audit_env
    a, b = _populate(services)
    victim = _ids(services, a)[1]
    _sql(dsn, "UPDATE recording_access_logs SET tenant_id = %s WHERE id = %s", (b, victim))
    problems = verify_audit_chains(services).problems
    assert any(p.row_id == victim and p.kind == "edited" for p in problems)
    assert any(p.chain == "acme" and p.kind == "deleted" for p in problems)


def test_export_jsonl_and_csv(audit_env, tmp_path: Path) -> None:
    _dsn, cfg, services = audit_env
    a, _b = _populate(services)
    rows = services.db.audit_rows(tenant_id=a)
    out = tmp_path / "acme.jsonl"
    run = _cli(cfg, "audit", "export", "--tenant", "acme", "-o", str(out), "--user", "auditor")
    assert run.exit_code == 0, run.output
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in exported] == [r["id"] for r in rows]
    assert all(r["tenant_id"] == a for r in exported)
    assert exported[1]["details"] == {"bytes": 100, "range": [0, 1]}
    assert exported[0]["ip_address"] == "10.0.0.7"
    # The hashes let an auditor recompute the chain offline.
    prev = db.GENESIS_HASH
    for r in exported:
        assert r["prev_hash"] == prev
        assert db.audit_row_hash(prev, r) == r["row_hash"]
        prev = r["row_hash"]
    # The export was logged (after the exported rows).
    logged = services.db.audit_rows(tenant_id=a, action="audit_export")
    assert logged and logged[-1]["user_id"] == "auditor" and logged[-1]["details"]["rows"] == 5

    # Time window: [from, to) in ISO 8601.
    t2, t4 = rows[2]["accessed_at"].isoformat(), rows[4]["accessed_at"].isoformat()
    run = _cli(cfg, "audit", "export", "--tenant", "acme", "--from", t2, "--to", t4)
    assert run.exit_code == 0, run.output
    window = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["id"] for r in window] == [rows[2]["id"], rows[3]["id"]]

    run = _cli(cfg, "audit", "export", "--tenant", "acme", "--format", "csv", "--to", t4)
    assert run.exit_code == 0, run.output
    table = list(csv.DictReader(io.StringIO(run.stdout)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in rows[:4]]
    assert table[0]["action"] == "stream" and table[1]["success"] == "True"
    assert json.loads(table[2]["details"]) == {"bytes": 200, "range": [0, 2]}
    assert table[3]["row_hash"] == rows[3]["row_hash"]


def test_export_refuses_bad_dates_and_unknown_tenant(audit_env) -> None:
    _dsn, cfg, services = audit_env
    _populate(services)
    run = _cli(cfg, "audit", "export", "--tenant", "acme", "--from", "last tuesday")
    assert run.exit_code == 2 and "ISO 8601" in run.stderr
    run = _cli(cfg, "audit", "export", "--tenant", "nobody")
    assert run.exit_code == 1 and "unknown tenant" in run.stderr
