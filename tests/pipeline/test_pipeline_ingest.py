"""Where a RECORD_STOP becomes a stored row: store one recording, against real PostgreSQL,
the local store and moto (S3 + KMS); and the wrapped data key as the row keeps it."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from fsrecrypt import errors
from fsrecrypt import format as esdk
from fsrecrypt.pipeline import (
    Services,
    edk_from_bytes,
    edk_to_bytes,
    fetch_recording,
    ingest_file,
    register_source,
    store_recording,
    worker_id,
)
from fsrecrypt.plaintext import open_source
from tests.support.factories import make_wav

pytestmark = pytest.mark.integration


def _roundtrip(services: Services, tenant, recordings: Path, seconds: float) -> None:
    wav = recordings / "call.wav"
    original = make_wav(wav, seconds, seed=3)
    outcome = ingest_file(services, str(wav), tenant.name, call_uuid="c-1", user_id="tester")
    assert outcome.plaintext_deleted and not wav.exists()
    row = services.db.recording(outcome.recording.id)
    assert row.status == "stored" and row.encrypted
    assert row.file_size_bytes == len(original)
    assert row.encrypted_size_bytes == services.store.head(row.s3_path).size
    assert row.encryption_metadata["wav"]["sample_rate"] == 8000
    assert row.encryption_metadata["suite"] == "0x0478"
    assert row.call_uuid == "c-1"
    # The object key carries identifiers only.
    assert row.s3_path.startswith(f"recordings/{tenant.id}/")
    assert "call" not in row.s3_path
    out = io.BytesIO()
    fetch_recording(services, row.id, out, user_id="auditor")
    assert out.getvalue() == original
    actions = [(r["action"], r["success"]) for r in services.db.audit_rows(recording_id=row.id)]
    assert actions == [("encrypt", True), ("download", True)]


def test_local_round_trip(local_services) -> None:
    _roundtrip(*local_services, seconds=2.0)


def test_s3_kms_round_trip_single_put(s3_services, moto_server, s3_bucket) -> None:
    services, tenant, recordings = s3_services
    _roundtrip(services, tenant, recordings, seconds=2.0)
    row = services.db.recordings(tenant_id=tenant.id)[0]
    edk = edk_from_bytes(row.encrypted_dek_bytes())
    assert edk.provider_id == "aws-kms"
    assert edk.provider_info.decode().startswith("arn:aws:kms:")
    assert row.kms_key_id.startswith("arn:aws:kms:")


def test_s3_multipart_path(s3_services, moto_server, s3_bucket) -> None:
    services, tenant, recordings = s3_services
    # 6 minutes of 8 kHz 16-bit mono = 5.76 MB plaintext > one 5 MiB part.
    _roundtrip(services, tenant, recordings, seconds=360.0)
    row = services.db.recordings(tenant_id=tenant.id)[0]
    s3 = moto_server.client("s3")
    head = s3.head_object(Bucket=s3_bucket.name, Key=row.s3_path)
    assert head["ETag"].strip('"').endswith("-2"), "expected a two-part multipart upload"


def test_failure_mid_upload_aborts_and_keeps_plaintext(s3_services, moto_server, s3_bucket) -> None:
    services, tenant, recordings = s3_services
    wav = recordings / "long.wav"
    make_wav(wav, 400.0, seed=5)
    source = open_source(str(wav))
    recording, created = register_source(services, source, tenant)
    assert created
    seen = 0

    def explode(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > 6 * 1024 * 1024:
            raise errors.KeyProviderUnavailable("injected failure after the first part")

    with pytest.raises(errors.KeyProviderUnavailable):
        store_recording(services, recording, source, tenant, worker=worker_id(), on_chunk=explode)
    s3 = moto_server.client("s3")
    assert s3.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount", 0) == 0
    assert wav.exists()
    assert services.db.recording(recording.id).status == "pending"


def test_ingest_is_idempotent_for_the_same_file(local_services) -> None:
    services, tenant, recordings = local_services
    wav = recordings / "same.wav"
    make_wav(wav, 0.5, seed=9)
    source = open_source(str(wav))
    first, created = register_source(services, source, tenant)
    again, created_again = register_source(services, source, tenant)
    assert created and not created_again and first.id == again.id
    outcome = ingest_file(services, str(wav), tenant.name)
    assert outcome.recording.id == first.id
    assert len(services.db.recordings(tenant_id=tenant.id)) == 1


def test_concurrent_workers_store_once(local_services) -> None:
    services, tenant, recordings = local_services
    wav = recordings / "race.wav"
    original = make_wav(wav, 1.0, seed=1)
    source = open_source(str(wav))
    recording, _ = register_source(services, source, tenant)
    results: list[object] = []

    def attempt() -> None:
        src = open_source(str(wav))
        try:
            results.append(
                store_recording(services, recording, src, tenant, worker=worker_id(), delete=False)
            )
        except errors.FsrecryptError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = [r for r in results if not isinstance(r, Exception)]
    assert len(stored) == 1, results
    assert all(isinstance(r, errors.InvalidState) for r in results if isinstance(r, Exception))
    keys = list(services.store.list_keys(f"recordings/{tenant.id}/"))
    assert len(keys) == 1
    out = io.BytesIO()
    fetch_recording(services, recording.id, out, user_id="t")
    assert out.getvalue() == original


def test_unknown_tenant_leaves_file(local_services) -> None:
    services, _tenant, recordings = local_services
    wav = recordings / "orphan.wav"
    make_wav(wav, 0.1)
    with pytest.raises(errors.UnknownTenant):
        ingest_file(services, str(wav), "no-such-tenant")
    assert wav.exists()


def test_edk_serialisation_round_trip() -> None:
    edk = esdk.EncryptedDataKey("aws-kms", b"arn:aws:kms:x", bytes(range(200)))
    assert edk_from_bytes(edk_to_bytes(edk)) == edk
    with pytest.raises(errors.MalformedMessage):
        edk_from_bytes(edk_to_bytes(edk)[:-1])
    with pytest.raises(errors.MalformedMessage):
        edk_from_bytes(edk_to_bytes(edk) + b"x")


def test_a_failed_ingest_writes_a_failed_audit_row_for_its_operator(local_services) -> None:
    """Before, a failed attempt left no audit row: only the stored outcome was on record."""
    services, tenant, recordings = local_services
    wav = recordings / "refused.wav"
    make_wav(wav, 0.2, seed=11)
    keyring = Path(services.config.keys.keyring)
    keyring.chmod(0o644)  # refused: others may read it
    try:
        with pytest.raises(errors.KeyAccessError):
            ingest_file(services, str(wav), tenant.name, user_id="cli:ops")
    finally:
        keyring.chmod(0o600)
    (row,) = services.db.recordings(source_path=str(wav))
    assert row.status == "failed" and wav.exists()
    (audit,) = services.db.audit_rows(recording_id=row.id, action="encrypt")
    assert audit["user_id"] == "cli:ops" and not audit["success"]
    assert "keyring" in audit["error_message"] and audit["details"]["final"] is True
