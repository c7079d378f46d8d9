"""``fsrecrypt recordings list/show/pending`` and ``fsrecrypt retry``: the queue without psql.

Before, an operator had to query PostgreSQL to see what was stored or still
plaintext, and a failed recording could only be stored again by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fsrecrypt import db
from fsrecrypt.cli import main
from fsrecrypt.pipeline import Services, ingest_file, register_source
from fsrecrypt.plaintext import open_source
from tests.support.factories import local_config, make_wav, unique, write_config


@pytest.fixture
def world(tmp_path: Path, fresh_dsn: str) -> Iterator[dict[str, Any]]:
    """A database of its own (``retry --all`` touches every failed row) with three rows."""
    db.migrate(fresh_dsn)
    config = local_config(tmp_path, fresh_dsn)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    svc = Services(config)
    key = unique("k")
    svc.keys.create_key(key)
    acme = svc.db.add_tenant("acme", key)
    other = svc.db.add_tenant("other", key)
    rec_dir = tmp_path / "recordings"
    rows = {}
    for name, tenant, call in (("a", acme, "call-a"), ("b", acme, "call-b"), ("c", other, None)):
        wav = rec_dir / f"{name}.wav"
        make_wav(wav, 0.2, seed=ord(name))
        source = open_source(str(wav))
        rows[name], _ = register_source(svc, source, tenant, call_uuid=call)
        source.fileobj.close()
    stored_wav = rec_dir / "s.wav"
    make_wav(stored_wav, 0.2, seed=9)
    stored = ingest_file(svc, str(stored_wav), "acme", call_uuid="call-s")
    rows["s"] = stored.recording
    svc.db.record_attempt_failure(rows["a"].id, "upload refused", final=True)
    svc.db.record_attempt_failure(rows["c"].id, "keyring unreadable", final=True)
    svc.db.hold_unassigned(
        source_path=str(rec_dir / "x.wav"),
        source_fingerprint="1:2:3:4",
        tenant_name="newco",
        reason="unknown tenant 'newco'",
        call_uuid="call-x",
    )
    try:
        yield {"svc": svc, "cfg": str(cfg), "rows": rows}
    finally:
        svc.close()


def _cli(world: dict[str, Any], *args: str) -> Any:
    return CliRunner().invoke(main, ["-c", world["cfg"], *args])


def test_recordings_list_filters_by_tenant_call_status_and_date(world: dict[str, Any]) -> None:
    rows = world["rows"]
    res = _cli(world, "recordings", "list", "--json")
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in json.loads(res.output)] == [rows[n].id for n in "abcs"]
    res = _cli(world, "recordings", "list", "--tenant", "acme", "--status", "failed", "--json")
    assert [r["id"] for r in json.loads(res.output)] == [rows["a"].id]
    res = _cli(world, "recordings", "list", "--call-uuid", "call-s", "--json")
    (only,) = json.loads(res.output)
    assert only["status"] == "stored" and only["tenant"] == "acme" and only["has_wrapped_key"]
    assert "encrypted_dek" not in only
    res = _cli(world, "recordings", "list", "--since", "2999-01-01", "--json")
    assert json.loads(res.output) == []
    res = _cli(world, "recordings", "list", "--until", "2000-01-01T00:00:00+02:00", "--json")
    assert json.loads(res.output) == []
    res = _cli(world, "recordings", "list", "--status", "failed")
    assert res.exit_code == 0
    assert "upload refused" in res.output and rows["b"].id not in res.output
    res = _cli(world, "recordings", "list", "--tenant", "nobody")
    assert res.exit_code != 0 and "nobody" in res.output


def test_recordings_show_and_pending(world: dict[str, Any]) -> None:
    rows = world["rows"]
    res = _cli(world, "recordings", "show", rows["s"].id, "--json")
    doc = json.loads(res.output)
    assert doc["id"] == rows["s"].id and doc["object_key"] and doc["call_uuid"] == "call-s"
    res = _cli(world, "recordings", "show", rows["a"].id)
    assert "last_error: upload refused" in res.output
    res = _cli(world, "recordings", "show", "00000000-0000-0000-0000-000000000000")
    assert res.exit_code != 0 and "no recording" in res.output

    res = _cli(world, "recordings", "pending", "--json")
    doc = json.loads(res.output)
    assert [r["id"] for r in doc["recordings"]] == [rows[n].id for n in "abc"]
    (waiting,) = doc["unassigned_files"]
    assert waiting["tenant"] == "newco" and not waiting["tenant_exists"]
    assert "ingest --tenant" in waiting["hint"]
    res = _cli(world, "recordings", "pending")
    assert "newco" in res.output and "ingest --tenant" in res.output


def test_retry_puts_failed_rows_back_to_pending_with_an_audit_row(world: dict[str, Any]) -> None:
    svc, rows = world["svc"], world["rows"]
    res = _cli(world, "retry")
    assert res.exit_code == 2 and "--all" in res.output  # one of the two is required
    res = _cli(world, "retry", "--recording", rows["s"].id)
    assert res.exit_code != 0 and "stored, not failed" in res.output
    res = _cli(world, "retry", "--recording", rows["a"].id, "--recording", rows["s"].id)
    assert res.exit_code != 0
    assert svc.db.recording(rows["a"].id).status == "failed"  # bad input changes nothing

    res = _cli(world, "retry", "--recording", rows["a"].id, "--user", "ops-1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"queued": [rows["a"].id]}
    again = svc.db.recording(rows["a"].id)
    assert again.status == "pending" and again.next_attempt_at is None
    assert again.id in [r.id for r in svc.db.due_pending(limit=100)]  # the sweep takes it
    (audit,) = svc.db.audit_rows(recording_id=again.id, action="retry")
    assert audit["user_id"] == "ops-1" and audit["success"]

    res = _cli(world, "retry", "--all")
    assert res.exit_code == 0 and "1 failed recording(s) queued" in res.output
    assert svc.db.recording(rows["c"].id).status == "pending"
    assert svc.db.recording(rows["s"].id).status == "stored"
    assert svc.db.failed_summary() == (0, None)


def test_pending_lists_orphan_plaintext_without_opening_it(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """A file no event and no row names (no default tenant: nothing adopts it) is listed
    as an orphan, with the ingest hint; files with rows are not; nothing is opened."""
    rec_dir = tmp_path / "recordings"
    orphan = rec_dir / "sub" / "9f1c.wav"
    orphan.parent.mkdir()
    orphan.write_bytes(b"RIFF....")
    orphan.chmod(0)  # only stat'ed, never opened (root could open it anyway)
    odd = rec_dir / "odd\udcff\u0663.wav"  # a name that is not UTF-8, odd digits
    odd.write_bytes(b"x")
    (rec_dir / ".hidden.wav").write_bytes(b"x")
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"x")
    (rec_dir / "link.wav").symlink_to(outside)  # never followed
    res = _cli(world, "recordings", "pending", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    paths = sorted(o["source_path"] for o in doc["orphan_files"])
    assert paths == sorted([str(orphan), str(odd)])
    first = next(o for o in doc["orphan_files"] if o["source_path"] == str(orphan))
    assert first["size_bytes"] == 8 and "ingest --tenant" in first["hint"]
    res = _cli(world, "recordings", "pending")
    assert "orphan" in res.output and "9f1c.wav" in res.output
    assert "ingest --tenant" in res.output
