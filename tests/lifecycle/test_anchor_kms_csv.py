"""Anchors signed by an AWS KMS key (moto), and CSV exports that carry their anchors.

KMS: the private key never leaves KMS, so nothing signing-related is on
disk; the public key alone checks anchors offline. CSV: a spreadsheet
export is as checkable offline as a JSON-lines one, including rows whose
empty texts and NULLs CSV spells the same way.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

import pytest

from fsrecrypt.db import audit_row_hash
from fsrecrypt.errors import ConfigError, KeyAccessError
from fsrecrypt.lifecycle.anchor_signing import KMS_ALG, AnchorSigner, public_key_from_text
from fsrecrypt.lifecycle.anchors import parse_anchor, verify_against_anchors, write_anchor
from fsrecrypt.lifecycle.audit import EXPORT_COLUMNS
from tests.lifecycle.test_audit_anchors import (
    _cli,
    _make_env,
    _populate,
    rewrite_chain_consistently,
)


def _signing_key(moto_server, spec: str = "ECC_NIST_P256", usage: str = "SIGN_VERIFY") -> str:
    kms = moto_server.client("kms")
    return kms.create_key(KeyUsage=usage, KeySpec=spec)["KeyMetadata"]["KeyId"]


def _kms_env(tmp_path: Path, moto_server, key_id: str):
    extra = (
        f'anchor_signature = "{KMS_ALG}"\nanchor_kms_key = "{key_id}"\n'
        f'anchor_kms_endpoint_url = "{moto_server.endpoint_url}"\n'
    )
    return _make_env(tmp_path, extra)


def _offline_config(tmp_path: Path) -> Path:
    offline = tmp_path / "offline.toml"
    offline.write_text(
        '[database]\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n'
        f'[audit]\nanchor_key_file = "{tmp_path / "secrets" / "anchor.key"}"\n'
    )
    return offline


def test_kms_signed_anchors_verify_and_catch_a_consistent_rewrite(tmp_path, moto_server) -> None:
    key_id = _signing_key(moto_server)
    env = _kms_env(tmp_path, moto_server, key_id)
    dsn, cfg, services = next(env)
    try:
        a, _b = _populate(services)
        receipt = write_anchor(services, user_id="test")
        doc = parse_anchor(Path(receipt.locations[0]).read_bytes())
        assert doc["signature"]["alg"] == KMS_ALG
        # The private key lives in KMS: no key file was created.
        assert not (tmp_path / "secrets" / "anchor.key").exists()
        assert verify_against_anchors(services).ok

        # The public key KMS holds checks the signature with plain cryptography.
        run = _cli(cfg, "audit", "anchor", "--public-key")
        printed = json.loads(run.stdout)
        kms_public = moto_server.client("kms").get_public_key(KeyId=key_id)["PublicKey"]
        assert base64.b64decode(printed["public_key"]) == kms_public
        assert printed["alg"] == KMS_ALG

        ids = [r["id"] for r in services.db.audit_rows(tenant_id=a)]
        rewrite_chain_consistently(dsn, a, ids[1], "nothing-happened")
        run = _cli(cfg, "audit", "verify", "--anchors")
        assert run.exit_code == 1
        assert "first contradicted: anchor 1" in run.stderr
    finally:
        next(env, None)


def test_kms_anchor_export_checks_offline_with_the_public_key_only(tmp_path, moto_server) -> None:
    key_id = _signing_key(moto_server)
    env = _kms_env(tmp_path, moto_server, key_id)
    _dsn, cfg, services = next(env)
    try:
        _populate(services)
        write_anchor(services, user_id="test")
        public = json.loads(_cli(cfg, "audit", "anchor", "--public-key").stdout)["public_key"]
        out = tmp_path / "acme.jsonl"
        assert _cli(cfg, "audit", "export", "--tenant", "acme", "-o", str(out)).exit_code == 0
        offline = _offline_config(tmp_path)
        run = _cli(offline, "audit", "check-export", str(out), "--public-key", public)
        assert run.exit_code == 0, run.output

        # Another P-256 key (someone's own, not the KMS one) does not check these anchors.
        other = base64.b64encode(
            moto_server.client("kms").get_public_key(KeyId=_signing_key(moto_server))["PublicKey"]
        ).decode()
        run = _cli(offline, "audit", "check-export", str(out), "--public-key", other)
        assert run.exit_code == 1 and "not the configured" in run.stdout

        # An anchor edited after signing (its head moved) no longer matches its signature.
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        for line in lines:
            if "anchor" in line:
                line["anchor"]["created_at"] = "2020-01-01T00:00:00.000000+00:00"
        forged = tmp_path / "forged.jsonl"
        forged.write_text("".join(json.dumps(x) + "\n" for x in lines))
        run = _cli(offline, "audit", "check-export", str(forged), "--public-key", public)
        assert run.exit_code == 1 and "forged or edited" in run.stdout
    finally:
        next(env, None)


def test_kms_signing_refuses_keys_that_cannot_sign(tmp_path, moto_server) -> None:
    encrypt_key = _signing_key(moto_server, spec="SYMMETRIC_DEFAULT", usage="ENCRYPT_DECRYPT")
    env = _kms_env(tmp_path, moto_server, encrypt_key)
    _dsn, _cfg, services = next(env)
    try:
        _populate(services)
        with pytest.raises(KeyAccessError) as caught:
            write_anchor(services, user_id="test")
        assert "SIGN_VERIFY" in str(caught.value) or "SIGN_VERIFY" in caught.value.hint
        assert not list((tmp_path / "anchors").glob("*.json"))
    finally:
        next(env, None)
    rsa = _signing_key(moto_server, spec="RSA_2048")
    public = moto_server.client("kms").get_public_key(KeyId=rsa)["PublicKey"]
    with pytest.raises(ConfigError, match="P-256"):
        public_key_from_text(base64.b64encode(public).decode())
    with pytest.raises(ConfigError, match="neither an Ed25519"):
        public_key_from_text(base64.b64encode(os.urandom(40)).decode())
    with pytest.raises(ConfigError, match="not base64"):
        public_key_from_text("not base64 at all\x00")


def test_kms_signer_config_needs_a_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[audit]\nanchor_signature = "{KMS_ALG}"\n')
    from fsrecrypt.config import load_config

    with pytest.raises(ConfigError, match="anchor_kms_key"):
        load_config(cfg)


# --- CSV ------------------------------------------------------------------------------------


def _csv_records(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _write_csv(path: Path, records: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    path.write_text(buf.getvalue())


def test_csv_export_carries_anchors_and_checks_offline(tmp_path: Path) -> None:
    env = _make_env(tmp_path)
    _dsn, cfg, services = next(env)
    try:
        a, _b = _populate(services)
        # Rows CSV spells ambiguously: an empty User-Agent, no error text, no details.
        services.db.audit(
            action="stream", user_id="u-empty", success=False, tenant_id=a, user_agent=""
        )
        services.db.audit(action="stream", user_id="u-none", success=True, tenant_id=a)
        write_anchor(services, user_id="test")
        _populate(services, start=10)
        write_anchor(services, user_id="test")
        out = tmp_path / "acme.csv"
        run = _cli(cfg, "audit", "export", "--tenant", "acme", "--format", "csv", "-o", str(out))
        assert run.exit_code == 0, run.output
        records = _csv_records(out)
        anchors = [r for r in records if r["action"] == "anchor" and r["id"] == ""]
        assert [json.loads(r["details"])["anchor"]["seq"] for r in anchors] == [1, 2]
        offline = _offline_config(tmp_path)
        run = _cli(offline, "audit", "check-export", str(out))
        assert run.exit_code == 0, run.output
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["rows"] == 10 and summary["anchors"] == 2
        assert summary["unanchored_rows"] == 0

        # A cell edited in the spreadsheet: the row no longer matches its hash.
        edited = [dict(r) for r in records]
        edited[2]["user_id"] = "someone-else"
        _write_csv(tmp_path / "edited.csv", edited)
        run = _cli(offline, "audit", "check-export", str(tmp_path / "edited.csv"))
        assert run.exit_code == 1 and "no longer match its hash" in run.stdout

        # The consistent rewrite (every later hash recomputed): the anchors catch it.
        rows = [dict(r) for r in records if r["id"]]
        rows[1]["action"] = "nothing-happened"
        prev = rows[0]["row_hash"]
        for row in rows[1:]:
            typed = {
                **row,
                "success": row["success"] == "True",
                "details": json.loads(row["details"]),
                "decryption_duration_ms": float(row["decryption_duration_ms"])
                if row["decryption_duration_ms"]
                else None,
                "user_agent": row["user_agent"] or (None if row["user_id"] != "u-empty" else ""),
                "error_message": row["error_message"] or None,
                "ip_address": row["ip_address"] or None,
                "recording_id": row["recording_id"] or None,
            }
            row["prev_hash"] = prev
            row["row_hash"] = prev = audit_row_hash(prev, typed)
        _write_csv(tmp_path / "forged.csv", rows + anchors)
        run = _cli(offline, "audit", "check-export", str(tmp_path / "forged.csv"))
        assert run.exit_code == 1
        assert "rewritten after anchor 1" in run.stdout
    finally:
        next(env, None)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.update(id="\uff11\uff12"), "not a row number"),  # fullwidth digits
        (lambda r: r.update(id="9" * 40), "not a row number"),
        (lambda r: r.update(success="yes"), "neither True nor False"),
        (lambda r: r.update(details="{not json"), "unreadable"),
        (lambda r: r.update(decryption_duration_ms="1e999999"), "no longer match"),
    ],
)
def test_hostile_csv_cells_are_named_not_crashed_on(tmp_path: Path, mutate, expected) -> None:
    env = _make_env(tmp_path)
    _dsn, cfg, services = next(env)
    try:
        _populate(services)
        write_anchor(services, user_id="test")
        out = tmp_path / "acme.csv"
        assert (
            _cli(cfg, "audit", "export", "--tenant", "acme", "--format", "csv", "-o", str(out))
        ).exit_code == 0
        records = _csv_records(out)
        mutate(records[0])
        _write_csv(out, records)
        run = _cli(_offline_config(tmp_path), "audit", "check-export", str(out))
        assert run.exit_code == 1
        assert expected in run.stdout
    finally:
        next(env, None)


def test_malformed_csv_and_ragged_rows_are_reported(tmp_path: Path) -> None:
    signer = AnchorSigner("hmac-sha256", secret=b"k" * 32)
    from fsrecrypt.lifecycle.anchor_check import check_export

    header = ",".join(EXPORT_COLUMNS) + "\n"
    ragged = check_export([header, "1,2,3\n"], signer)
    assert not ragged.ok and any("columns" in p for p in ragged.problems)
    nul = check_export([header, '"a\x00b' + "," * 13 + "\n"], signer)
    assert not nul.ok
    huge = check_export([header, "x" * (9 * 1024 * 1024) + "\n"], signer)
    assert not huge.ok and any("longer" in p for p in huge.problems)
