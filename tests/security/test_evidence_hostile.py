"""Hostile input to the evidence features: anchors, exports, key files, custody checks.

Anchors and exports cross a trust boundary (an anchor directory anyone with
the right access can drop files into; an export an auditor received by mail):
every malformed one is named as a problem, never a traceback, and never
accepted.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsrecrypt import db
from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.errors import ConfigError, ObjectExists
from fsrecrypt.keyfile import load_key_file
from fsrecrypt.lifecycle.anchor_check import check_export
from fsrecrypt.lifecycle.anchors import (
    ANCHOR_KEY,
    AnchorSigner,
    anchor_sinks,
    verify_against_anchors,
    write_anchor,
)
from fsrecrypt.pipeline import Services
from tests.support.pg import create_database, drop_database, ensure_postgres


@pytest.fixture
def env(tmp_path: Path):
    ensure_postgres()
    name = f"fsrecrypt_test_evh_{uuid.uuid4().hex[:10]}"
    dsn = create_database(name)
    db.migrate(dsn)
    cfg = tmp_path / "fsrecrypt.toml"
    cfg.write_text(
        f'[database]\ndsn = "{dsn}"\n'
        f'[keys]\nkeyring = "{tmp_path / "keyring.json"}"\n'
        f'[storage]\npath = "{tmp_path / "objects"}"\n'
        f'[audit]\nanchor_dir = "{tmp_path / "anchors"}"\n'
        f'anchor_key_file = "{tmp_path / "anchor.key"}"\n'
    )
    services = Services(load_config(cfg))
    services.db.audit(action="expire", user_id="cron", success=True)
    try:
        yield cfg, services, tmp_path
    finally:
        services.close()
        drop_database(name)


def test_a_symlinked_or_directory_anchor_is_named_not_followed(env) -> None:
    _cfg, services, tmp = env
    write_anchor(services, user_id="t")
    secret = tmp / "elsewhere.json"
    secret.write_text((tmp / "anchors" / "000000000001.json").read_text())
    (tmp / "anchors" / "000000000002.json").symlink_to(secret)
    (tmp / "anchors" / "000000000003.json").mkdir()
    problems = {(p.seq, p.kind) for p in verify_against_anchors(services).problems}
    assert problems == {(2, "unreadable"), (3, "unreadable")}
    # A planted file at the next name is never overwritten: the writer refuses.
    with pytest.raises(ObjectExists):
        anchor_sinks(services.config)[0].write(2, b"{}")


def test_an_anchor_signed_with_another_key_is_forged(env) -> None:
    _cfg, services, tmp = env
    write_anchor(services, user_id="t")
    other = AnchorSigner("hmac-sha256", secret=os.urandom(32))
    doc = json.loads((tmp / "anchors" / "000000000001.json").read_text())
    body = {k: v for k, v in doc.items() if k != "signature"}
    body["seq"] = 2
    forged = {**body, "signature": other.sign(body)}
    (tmp / "anchors" / "000000000002.json").write_text(json.dumps(forged))
    found = [p for p in verify_against_anchors(services).problems]
    assert [(p.seq, p.kind) for p in found] == [(2, "forged")]
    assert "not the configured" in found[0].detail


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[" * 100_000,
        '{"id": ' + "9" * 5000 + "}",
        '{"anchor": {"format": "fsrecrypt-audit-anchor/1", "seq": "1", "chains": []}}',
        '{"anchor": ' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"id": 1, "prev_hash": "0", "row_hash": "x", "ip_address": "999.1.1.1"}',
        '{"id": 1, "prev_hash": "0", "row_hash": "x", "decryption_duration_ms": "abc"}',
        '"\\u0000"',
    ],
)
def test_hostile_export_lines_are_problems_not_tracebacks(line: str) -> None:
    signer = AnchorSigner("hmac-sha256", secret=b"k" * 32)
    result = check_export([line + "\n"], signer)
    assert not result.ok and result.problems


def test_check_export_cli_on_hostile_file_exits_with_a_message(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")
    key.chmod(0o600)
    export = tmp_path / "x.jsonl"
    export.write_bytes(b"\xff\xfe garbage\n" + b"{" * 1000 + b"\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[database]\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n')
    run = CliRunner().invoke(
        main, ["-c", str(cfg), "audit", "check-export", str(export), "--key-file", str(key)]
    )
    assert run.exit_code == 1 and "Traceback" not in run.output
    assert "does not check out" in run.output


def test_key_files_refuse_symlinks_short_keys_and_missing_files(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_key_file(str(real), ANCHOR_KEY)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(ConfigError):
        load_key_file(str(link), ANCHOR_KEY)
    short = tmp_path / "short.key"
    short.write_text("c2hvcnQ=\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        load_key_file(str(short), ANCHOR_KEY)
    with pytest.raises(ConfigError, match="does not exist"):
        load_key_file(str(tmp_path / "absent.key"), ANCHOR_KEY, create=False)
    assert not (tmp_path / "absent.key").exists()


def test_check_export_public_key_that_is_not_base64_is_a_config_error(tmp_path: Path) -> None:
    export = tmp_path / "x.jsonl"
    export.write_text("")
    run = CliRunner().invoke(
        main, ["audit", "check-export", str(export), "--public-key", "not*base64"]
    )
    assert run.exit_code == 2 and "not base64" in run.output
