"""Erasure also removes plaintext that is still on disk, and only that file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsrecrypt.lifecycle.erase import erase_recordings
from fsrecrypt.pipeline import Services, ingest_file, register_source
from fsrecrypt.plaintext import open_source
from tests.support.factories import local_config, make_wav, unique

pytestmark = pytest.mark.integration


@pytest.fixture
def services(tmp_path: Path, pg_dsn: str):
    svc = Services(local_config(tmp_path, pg_dsn))
    key = unique("k")
    svc.keys.create_key(key)
    tenant = svc.db.add_tenant(unique("t"), key)
    yield svc, tenant, tmp_path / "recordings"
    svc.close()


def test_erase_removes_kept_plaintext_of_a_stored_recording(services) -> None:
    svc, tenant, recordings = services
    wav = recordings / "kept.wav"
    make_wav(wav, 0.5, seed=1)
    outcome = ingest_file(svc, str(wav), tenant.name, delete=False)
    assert wav.exists()
    receipt = erase_recordings(
        svc, [outcome.recording], reason="GDPR", user_id="dpo", override_retention=True
    )
    assert receipt["recordings"][0]["plaintext_deleted"] is True
    assert not wav.exists()
    audit = svc.db.audit_rows(recording_id=outcome.recording.id, action="erase")
    assert audit[-1]["details"]["plaintext_deleted"] is True


def test_erase_removes_plaintext_of_a_failed_recording(services) -> None:
    svc, tenant, recordings = services
    wav = recordings / "failed.wav"
    make_wav(wav, 0.5, seed=2)
    source = open_source(str(wav))
    row, _ = register_source(svc, source, tenant)
    source.fileobj.close()
    failed = svc.db.record_attempt_failure(row.id, "injected", final=True)
    assert failed.status == "failed"
    receipt = erase_recordings(svc, [failed], reason="GDPR", user_id="dpo", override_retention=True)
    assert receipt["recordings"][0]["plaintext_deleted"] is True
    assert not wav.exists()
    assert svc.db.recording(row.id).status == "erased"


def test_erase_leaves_a_different_file_at_the_same_path(services) -> None:
    svc, tenant, recordings = services
    wav = recordings / "reused.wav"
    make_wav(wav, 0.5, seed=3)
    outcome = ingest_file(svc, str(wav), tenant.name, delete=False)
    os.unlink(wav)
    make_wav(wav, 0.7, seed=4)  # a new recording written to the same name
    receipt = erase_recordings(
        svc, [outcome.recording], reason="GDPR", user_id="dpo", override_retention=True
    )
    assert receipt["recordings"][0]["plaintext_deleted"] is False
    assert wav.exists()
