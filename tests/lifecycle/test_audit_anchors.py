"""Anchors: a chain rewritten consistently in SQL passes `audit verify` and fails `--anchors`.

Each test gets a database of its own: these tests rewrite the access log on
purpose. The attack is written the way a DBA would do it: plain SQL plus the
project's own row hash function, recomputing every later hash and the head.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from click.testing import CliRunner

from fsrecrypt import db
from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.db import audit_row_hash
from fsrecrypt.errors import ConfigError, ObjectExists, UnknownTenant
from fsrecrypt.lifecycle.anchors import (
    anchor_hash,
    anchor_if_due,
    anchor_sinks,
    parse_anchor,
    verify_against_anchors,
    write_anchor,
)
from fsrecrypt.lifecycle.audit import verify_audit_chains
from fsrecrypt.pipeline import Services
from tests.support.pg import create_database, drop_database, ensure_postgres


def _make_env(
    tmp_path: Path, extra: str = "", storage: str = ""
) -> Iterator[tuple[str, Path, Services]]:
    ensure_postgres()
    name = f"fsrecrypt_test_anchor_{uuid.uuid4().hex[:10]}"
    dsn = create_database(name)
    db.migrate(dsn)
    cfg = tmp_path / "fsrecrypt.toml"
    cfg.write_text(
        f'[database]\ndsn = "{dsn}"\n'
        f'[keys]\nkeyring = "{tmp_path / "keyring.json"}"\n'
        f'[storage]\npath = "{tmp_path / "objects"}"\n{storage}'
        f'[audit]\nanchor_dir = "{tmp_path / "anchors"}"\n'
        f'anchor_key_file = "{tmp_path / "secrets" / "anchor.key"}"\n' + extra
    )
    services = Services(load_config(cfg))
    try:
        yield dsn, cfg, services
    finally:
        services.close()
        drop_database(name)


@pytest.fixture
def anchor_env(tmp_path: Path) -> Iterator[tuple[str, Path, Services]]:
    yield from _make_env(tmp_path)


def _populate(services: Services, n: int = 4, start: int = 0) -> tuple[str, str]:
    a = _tenant(services, "acme")
    b = _tenant(services, "globex")
    for i in range(start, start + n):
        for tenant in (a, b):
            services.db.audit(
                action="stream",
                user_id=f"user{i}",
                success=True,
                tenant_id=tenant,
                ip_address="10.0.0.7",
                decryption_duration_ms=1.5 + i,
                details={"bytes": 100 * i},
            )
    services.db.audit(action="expire", user_id="cron", success=True, details={"n": start})
    return a, b


def _tenant(services: Services, name: str) -> str:
    try:
        return services.db.tenant_by_name(name).id
    except UnknownTenant:  # the first call creates it
        return services.db.add_tenant(name, "k1").id


def rewrite_chain_consistently(dsn: str, tenant_id: str, victim: int, action: str) -> None:
    """The attack: edit one row, recompute every later hash of its chain and the chain head."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT * FROM recording_access_logs WHERE tenant_id = %s ORDER BY id",
                (tenant_id,),
            )
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
            prev = None
            for row in rows:
                if row["id"] == victim:
                    row["action"] = action
                if row["id"] >= victim:
                    if prev is not None:
                        row["prev_hash"] = prev
                    row["row_hash"] = audit_row_hash(row["prev_hash"], row)
                    cur.execute(
                        "UPDATE recording_access_logs SET action = %s, prev_hash = %s,"
                        " row_hash = %s WHERE id = %s",
                        (row["action"], row["prev_hash"], row["row_hash"], row["id"]),
                    )
                prev = row["row_hash"]
            cur.execute(
                "UPDATE audit_chain_heads SET last_hash = %s WHERE chain = %s",
                (prev, tenant_id),
            )
    finally:
        conn.close()


def _cli(cfg: Path, *args: str):
    return CliRunner().invoke(main, ["-c", str(cfg), *args], catch_exceptions=False)


def test_anchor_files_are_written_once_signed_and_chained(anchor_env) -> None:
    _dsn, cfg, services = anchor_env
    _populate(services)
    run = _cli(cfg, "audit", "anchor")
    assert run.exit_code == 0, run.output
    first = json.loads(run.stdout)
    assert first["seq"] == 1 and first["chains"] == 3
    _populate(services, start=10)
    second = write_anchor(services, user_id="test")
    assert second.seq == 2
    files = sorted((cfg.parent / "anchors").iterdir())
    assert [f.name for f in files] == ["000000000001.json", "000000000002.json"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o444
    doc1 = parse_anchor(files[0].read_bytes())
    doc2 = parse_anchor(files[1].read_bytes())
    assert doc2["prev_anchor_sha256"] == anchor_hash(doc1) == first["sha256"]
    heads = {c["tenant"] or c["chain"]: c for c in doc2["chains"]}
    assert set(heads) == {"acme", "globex", "global"} and heads["acme"]["row_count"] == 8
    key = cfg.parent / "secrets" / "anchor.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Never rewritten: creating an existing anchor again is refused.
    with pytest.raises(ObjectExists):
        anchor_sinks(services.config)[0].write(1, b"{}")
    assert files[0].read_bytes() != b"{}"
    # The anchor is itself logged, and everything checks out.
    assert services.db.audit_rows(action="audit_anchor")
    assert verify_against_anchors(services).ok
    run = _cli(cfg, "audit", "verify", "--anchors")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["anchors"] == 2


def test_consistent_sql_rewrite_passes_plain_verify_and_fails_anchors(anchor_env) -> None:
    dsn, cfg, services = anchor_env
    a, _b = _populate(services)
    write_anchor(services, user_id="test")
    _populate(services, start=10)
    write_anchor(services, user_id="test")
    _populate(services, start=20)
    acme_ids = [r["id"] for r in services.db.audit_rows(tenant_id=a)]
    victim = acme_ids[5]  # anchored by anchor 2 (covering acme rows 5..8), not by anchor 1
    rewrite_chain_consistently(dsn, a, victim, "nothing-happened")

    plain = verify_audit_chains(services)
    assert plain.ok, [p.line() for p in plain.problems]
    run = _cli(cfg, "audit", "verify")
    assert run.exit_code == 0, run.output

    result = verify_against_anchors(services)
    first = result.first_contradicted
    assert first is not None and first.seq == 2 and first.chain == "acme"
    assert (first.first_row, first.last_row) == (acme_ids[4], acme_ids[7])
    assert all(p.seq == 2 for p in result.problems), [p.line() for p in result.problems]
    run = _cli(cfg, "audit", "verify", "--anchors")
    assert run.exit_code == 1
    assert "first contradicted: anchor 2" in run.stderr
    assert f"[acme] rows {acme_ids[4]}..{acme_ids[7]}" in run.stderr
    assert f"[acme] rows {acme_ids[4]}..{acme_ids[7]}: contradicted" in run.stdout


def test_deleting_the_tail_and_rewinding_the_head_contradicts_the_anchor(anchor_env) -> None:
    dsn, _cfg, services = anchor_env
    a, _b = _populate(services)
    write_anchor(services, user_id="test")
    ids = [r["id"] for r in services.db.audit_rows(tenant_id=a)]
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM recording_access_logs WHERE id = %s", (ids[-1],))
        cur.execute(
            "UPDATE audit_chain_heads SET last_id = %s, last_hash = (SELECT row_hash FROM"
            " recording_access_logs WHERE id = %s), row_count = row_count - 1 WHERE chain = %s",
            (ids[-2], ids[-2], a),
        )
    conn.close()
    assert verify_audit_chains(services).ok
    first = verify_against_anchors(services).first_contradicted
    assert first is not None and first.seq == 1 and "gone" in first.detail


def test_forged_and_unreadable_anchors_are_named(anchor_env, tmp_path: Path) -> None:
    _dsn, _cfg, services = anchor_env
    _populate(services)
    write_anchor(services, user_id="test")
    write_anchor(services, user_id="test")
    path = tmp_path / "anchors" / "000000000002.json"
    doc = parse_anchor(path.read_bytes())
    doc["chains"][0]["row_count"] += 1  # edited after signing
    path.chmod(0o644)
    path.write_text(json.dumps(doc))
    (tmp_path / "anchors" / "000000000003.json").write_bytes(b"\x00not json\xff")
    problems = {(p.seq, p.kind) for p in verify_against_anchors(services).problems}
    assert problems == {(2, "forged"), (3, "unreadable")}


def test_export_carries_anchors_and_checks_offline(anchor_env, tmp_path: Path) -> None:
    _dsn, cfg, services = anchor_env
    _populate(services)
    write_anchor(services, user_id="test")
    _populate(services, start=10)
    write_anchor(services, user_id="test")
    out = tmp_path / "acme.jsonl"
    run = _cli(cfg, "audit", "export", "--tenant", "acme", "-o", str(out))
    assert run.exit_code == 0, run.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["anchor"]["seq"] for line in lines if "anchor" in line] == [1, 2]
    # Offline: the configuration points at no database at all.
    offline = tmp_path / "offline.toml"
    offline.write_text(
        '[database]\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n'
        f'[audit]\nanchor_key_file = "{tmp_path / "secrets" / "anchor.key"}"\n'
    )
    run = _cli(offline, "audit", "check-export", str(out))
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 8 and summary["anchors"] == 2 and summary["unanchored_rows"] == 0

    # The same consistent rewrite, done in the export file: still caught offline.
    rows = [line for line in lines if "id" in line]
    rows[1]["action"] = "nothing-happened"
    prev = rows[0]["row_hash"]
    for row in rows[1:]:
        row["prev_hash"] = prev
        row["row_hash"] = prev = audit_row_hash(row["prev_hash"], row)
    forged = tmp_path / "forged.jsonl"
    forged.write_text(
        "".join(json.dumps(x) + "\n" for x in rows + [y for y in lines if "anchor" in y])
    )
    run = _cli(offline, "audit", "check-export", str(forged))
    assert run.exit_code == 1
    assert "anchor 1: row" in run.stdout and "rewritten after anchor 1" in run.stdout
    # With a different key, the genuine export's anchors do not verify.
    other = tmp_path / "other.key"
    other.write_text("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")
    other.chmod(0o600)
    run = _cli(offline, "audit", "check-export", str(out), "--key-file", str(other))
    assert run.exit_code == 1 and "not the configured" in run.stdout


def test_anchor_if_due_writes_once_per_interval_and_one_writer_at_a_time(anchor_env) -> None:
    dsn, _cfg, services = anchor_env
    _populate(services)
    first = anchor_if_due(services)
    assert first is not None and first.seq == 1
    assert anchor_if_due(services) is None  # not due yet
    import time

    later = time.time() + services.config.audit.anchor_interval + 1
    # Another writer holds the anchor lock: this caller returns at once.
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtextextended('audit:anchor', 7))")
        assert anchor_if_due(services, now=later) is None
        with conn.cursor() as cur:  # released now, not whenever the backend exits
            cur.execute("SELECT pg_advisory_unlock(hashtextextended('audit:anchor', 7))")
    finally:
        conn.close()
    second = anchor_if_due(services, now=later)
    assert second is not None and second.seq == 2


def test_ed25519_anchors_check_with_the_public_key(tmp_path: Path) -> None:
    env = _make_env(tmp_path, 'anchor_signature = "ed25519"\n')
    _dsn, cfg, services = next(env)
    try:
        _populate(services)
        write_anchor(services, user_id="test")
        run = _cli(cfg, "audit", "anchor", "--public-key")
        public = json.loads(run.stdout)["public_key"]
        assert public and json.loads(run.stdout)["alg"] == "ed25519"
        out = tmp_path / "acme.jsonl"
        assert _cli(cfg, "audit", "export", "--tenant", "acme", "-o", str(out)).exit_code == 0
        run = _cli(cfg, "audit", "check-export", str(out), "--public-key", public)
        assert run.exit_code == 0, run.output
        wrong = "A" * 43 + "="
        run = _cli(cfg, "audit", "check-export", str(out), "--public-key", wrong)
        assert run.exit_code == 1
    finally:
        next(env, None)


def test_unsafe_anchor_key_file_is_refused(anchor_env, tmp_path: Path) -> None:
    _dsn, _cfg, services = anchor_env
    _populate(services)
    write_anchor(services, user_id="test")
    key = tmp_path / "secrets" / "anchor.key"
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="group/others"):
        write_anchor(services, user_id="test")
    key.chmod(0o600)
    assert not os.path.exists(tmp_path / "anchors" / "000000000002.json")


def test_without_a_sink_anchoring_says_what_to_set(tmp_path: Path) -> None:
    ensure_postgres()
    cfg = tmp_path / "plain.toml"
    cfg.write_text('[database]\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n')
    run = CliRunner().invoke(main, ["-c", str(cfg), "audit", "anchor"])
    assert run.exit_code != 0 and "anchor_dir or anchor_bucket" in run.output


def test_anchors_in_an_object_lock_bucket_cannot_be_deleted(tmp_path: Path, moto_server) -> None:
    s3 = moto_server.client("s3")
    bucket = f"fsrecrypt-anchors-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    extra = (
        f'anchor_bucket = "{bucket}"\nanchor_retention_days = 30\nanchor_lock_mode = "compliance"\n'
    )
    env = _make_env(tmp_path, extra, f'endpoint_url = "{moto_server.endpoint_url}"\n')
    dsn, cfg, services = next(env)
    try:
        a, _b = _populate(services)
        receipt = write_anchor(services, user_id="test")
        assert receipt.locations[0] == f"s3://{bucket}/audit-anchors/000000000001.json"
        assert receipt.locations[1].endswith("000000000001.json")  # and the local directory
        versions = s3.list_object_versions(Bucket=bucket)["Versions"]
        assert len(versions) == 1
        key, version = versions[0]["Key"], versions[0]["VersionId"]
        head = s3.head_object(Bucket=bucket, Key=key, VersionId=version)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"].year >= 2026
        from botocore.exceptions import ClientError

        with pytest.raises(ClientError):
            s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
        with pytest.raises(ClientError):
            s3.delete_object(
                Bucket=bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
            )
        # An overwrite of the same anchor is refused (If-None-Match).
        with pytest.raises(ObjectExists):
            anchor_sinks(services.config)[0].write(1, b"{}")
        _populate(services, start=10)
        write_anchor(services, user_id="test")
        ids = [r["id"] for r in services.db.audit_rows(tenant_id=a)]
        rewrite_chain_consistently(dsn, a, ids[1], "nothing-happened")
        assert verify_audit_chains(services).ok
        run = _cli(cfg, "audit", "verify", "--anchors")
        assert run.exit_code == 1
        assert f"first contradicted: anchor 1 (s3://{bucket}/audit-anchors/" in run.stderr
    finally:
        next(env, None)


def test_an_anchor_that_reached_only_one_sink_does_not_block_the_next(
    tmp_path: Path, moto_server
) -> None:
    s3 = moto_server.client("s3")
    bucket = f"fsrecrypt-anchors-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    env = _make_env(
        tmp_path,
        f'anchor_bucket = "{bucket}"\nanchor_lock_mode = "governance"\n',
        f'endpoint_url = "{moto_server.endpoint_url}"\n',
    )
    _dsn, _cfg, services = next(env)
    try:
        _populate(services)
        write_anchor(services, user_id="test")
        bucket_sink, dir_sink = anchor_sinks(services.config)
        # Anchor 2 reached the directory, then the bucket write failed.
        dir_sink.write(2, bucket_sink.latest().data.replace(b'"seq":1', b'"seq":2'))
        receipt = write_anchor(services, user_id="test")
        assert receipt.seq == 3 and len(receipt.locations) == 2
        problems = {(p.seq, p.kind) for p in verify_against_anchors(services).problems}
        assert problems == {(3, "missing")}  # the bucket names the gap
    finally:
        next(env, None)
