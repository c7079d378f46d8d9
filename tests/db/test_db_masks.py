"""Mask sessions in PostgreSQL: matched by core, channel and path; capped; idempotent."""

from __future__ import annotations

import uuid

import pytest

from fsrecrypt import db
from fsrecrypt.db import masks as masks_module
from fsrecrypt.errors import InvalidState, NotFound


@pytest.fixture
def database(pg_dsn: str):
    d = db.Database(pg_dsn)
    try:
        yield d
    finally:
        d.close()


def test_marks_follow_the_open_session_of_their_channel_and_path(database) -> None:
    ch, path = str(uuid.uuid4()), f"/rec/{uuid.uuid4()}.wav"
    assert database.mask_mark("core", ch, path, "mask", "api", 10**15) == (
        "unknown-recording",
        None,
    )
    sid = database.mask_session_start("core", ch, path, 10**15)
    assert database.mask_session_start("core", ch, path, 10**15) == sid  # replayed start
    assert database.mask_mark("core", ch, path, "mask", "api", 10**15 + 1) == ("stored", sid)
    assert database.mask_mark("other-core", ch, path, "unmask", "api", 2) == (
        "unknown-recording",
        None,
    )
    assert database.mask_mark("core", str(uuid.uuid4()), path, "unmask", "api", 3)[0] == (
        "unknown-recording"
    )
    assert database.mask_session_stop("core", ch, path, 10**15 + 9) == sid
    # Closed: a late mask for it is not taken, and a second stop finds nothing.
    assert database.mask_mark("core", ch, path, "mask", "api", 10**15 + 10)[0] == (
        "unknown-recording"
    )
    assert database.mask_session_stop("core", ch, path, 10**15 + 11) is None
    ann = database.mask_announcement(sid, path)
    assert ann is not None and ann.marks == (("mask", "api", 10**15 + 1),)
    assert (ann.started_us, ann.stopped_us, ann.total_marks) == (10**15, 10**15 + 9, 1)
    # Without the id: only an open session of the path (a RECORD_STOP never
    # handled); a closed one belongs to the row its RECORD_STOP registered.
    assert database.mask_announcement(None, path) is None
    later = database.mask_session_start("core", ch, path, 10**15 + 20)
    assert database.mask_announcement(None, path).session_id == later


def test_marks_are_capped_per_recording(database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masks_module, "MAX_MARKS", 3)
    ch, path = str(uuid.uuid4()), f"/rec/{uuid.uuid4()}.wav"
    sid = database.mask_session_start("core", ch, path, 10**15)
    outcomes = [database.mask_mark("core", ch, path, "mask", "api", 10**15)[0] for _ in range(5)]
    assert outcomes == ["stored", "stored", "stored", "too-many", "too-many"]
    assert database.mask_announcement(sid, path).total_marks == 3


def test_acknowledging_needs_an_unverified_mask(database) -> None:
    with pytest.raises(NotFound):
        database.acknowledge_mask(str(uuid.uuid4()), "auditor", "checked")
    tenant = database.add_tenant(f"t{uuid.uuid4().hex[:8]}", "key")
    rec, _ = database.create_pending(
        tenant_id=tenant.id, source_path=f"/rec/{uuid.uuid4()}.wav", source_fingerprint="1:2:3:4"
    )
    with pytest.raises(InvalidState, match="no unverified mask"):
        database.acknowledge_mask(rec.id, "auditor", "checked")
    with database.transaction("test") as cur:
        cur.execute("UPDATE call_recordings SET mask_verified = false WHERE id = %s", (rec.id,))
    assert database.unacknowledged_masks([tenant.id]) == 1
    assert database.unacknowledged_masks([str(uuid.uuid4())]) == 0
    database.acknowledge_mask(rec.id, "auditor", "checked the spans")
    assert database.unacknowledged_masks([tenant.id]) == 0
    with pytest.raises(InvalidState, match="already"):
        database.acknowledge_mask(rec.id, "auditor", "again")
    (row,) = database.audit_rows(recording_id=rec.id, action="ack-mask")
    assert row["user_id"] == "auditor" and row["details"]["note"] == "checked the spans"
