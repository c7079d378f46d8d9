"""The store/fetch pipeline against real PostgreSQL, the local store and moto (S3 + KMS)."""

from __future__ import annotations

import io
import os
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
    iter_plaintext_range,
    open_recording,
    open_source,
    register_source,
    store_recording,
    wav_info,
    worker_id,
)
from tests.support.factories import local_config, make_wav, s3_config, unique

pytestmark = pytest.mark.integration


@pytest.fixture
def local_services(tmp_path: Path, pg_dsn: str):
    services = Services(local_config(tmp_path, pg_dsn))
    key = unique("key")
    services.keys.create_key(key)
    tenant = services.db.add_tenant(unique("tenant"), key)
    yield services, tenant, tmp_path / "recordings"
    services.close()


@pytest.fixture
def s3_services(tmp_path: Path, pg_dsn: str, moto_server, s3_bucket):
    config = s3_config(tmp_path, pg_dsn, moto_server.endpoint_url, s3_bucket.name)
    services = Services(config)
    arn = services.keys.create_key(unique("tenant-key"))
    tenant = services.db.add_tenant(unique("tenant"), arn)
    yield services, tenant, tmp_path / "recordings"
    services.close()


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


def test_object_swapped_between_recordings_is_refused(local_services) -> None:
    services, tenant, recordings = local_services
    ids = []
    for i in range(2):
        wav = recordings / f"swap{i}.wav"
        make_wav(wav, 0.3, seed=i)
        ids.append(ingest_file(services, str(wav), tenant.name).recording.id)
    a, b = (services.db.recording(i) for i in ids)
    root = Path(services.config.storage.path)
    pa, pb = root / a.s3_path, root / b.s3_path
    data_a = pa.read_bytes()
    os.chmod(pa, 0o600)
    pa.write_bytes(pb.read_bytes())
    with pytest.raises(errors.ObjectMismatch):
        fetch_recording(services, a.id, io.BytesIO(), user_id="t")
    pa.write_bytes(data_a)
    fails = [r for r in services.db.audit_rows(recording_id=a.id) if not r["success"]]
    assert len(fails) == 1 and fails[0]["action"] == "download"


def test_tampered_object_fails_typed_and_is_audited(local_services) -> None:
    services, tenant, recordings = local_services
    wav = recordings / "tamper.wav"
    make_wav(wav, 1.0, seed=2)
    rec = ingest_file(services, str(wav), tenant.name).recording
    path = Path(services.config.storage.path) / rec.s3_path
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(blob))
    with pytest.raises(errors.IntegrityError):
        fetch_recording(services, rec.id, io.BytesIO(), user_id="t")
    last = services.db.audit_rows(recording_id=rec.id)[-1]
    assert last["success"] is False and "AuthenticationFailed" in last["error_message"]


def test_random_access_reads_only_needed_frames(local_services) -> None:
    services, tenant, recordings = local_services
    wav = recordings / "seek.wav"
    original = make_wav(wav, 5.0, seed=4)
    rec = ingest_file(services, str(wav), tenant.name).recording
    opened = open_recording(services, rec)
    for start, end in [(0, 1), (44, 4096 * 3 + 7), (len(original) - 5, None), (30000, 30001)]:
        plan, chunks = iter_plaintext_range(services, opened, start, end)
        assert b"".join(chunks) == original[start:end]
        assert plan.ciphertext_end - plan.ciphertext_start <= (
            ((end or len(original)) - start) // 4096 + 2
        ) * (4096 + 40)


def test_unknown_tenant_leaves_file(local_services) -> None:
    services, _tenant, recordings = local_services
    wav = recordings / "orphan.wav"
    make_wav(wav, 0.1)
    with pytest.raises(errors.UnknownTenant):
        ingest_file(services, str(wav), "no-such-tenant")
    assert wav.exists()


def test_path_refusals(tmp_path: Path) -> None:
    allowed = tmp_path / "rec"
    allowed.mkdir()
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"RIFF")
    link = allowed / "link.wav"
    link.symlink_to(outside)
    fifo = allowed / "pipe.wav"
    os.mkfifo(fifo)
    (allowed / "dir.wav").mkdir()
    linked_dir = tmp_path / "linkdir"
    linked_dir.symlink_to(allowed)
    make_wav(allowed / "ok.wav", 0.01)
    for bad in [
        str(outside),
        str(link),
        str(fifo),
        str(allowed / "dir.wav"),
        str(allowed / ".." / "secret.wav"),
        "relative.wav",
        str(linked_dir / "ok.wav"),
        "/etc/passwd",
        str(allowed) + "/bad\udcff.wav",
    ]:
        with pytest.raises(errors.PathRefused):
            open_source(bad, [str(allowed)])
    ok = open_source(str(allowed / "ok.wav"), [str(allowed)])
    ok.fileobj.close()
    assert outside.read_bytes() == b"RIFF" and fifo.exists()


def test_edk_serialisation_round_trip() -> None:
    edk = esdk.EncryptedDataKey("aws-kms", b"arn:aws:kms:x", bytes(range(200)))
    assert edk_from_bytes(edk_to_bytes(edk)) == edk
    with pytest.raises(errors.MalformedMessage):
        edk_from_bytes(edk_to_bytes(edk)[:-1])
    with pytest.raises(errors.MalformedMessage):
        edk_from_bytes(edk_to_bytes(edk) + b"x")


def test_wav_info_reads_freeswitch_header(tmp_path: Path) -> None:
    blob = make_wav(tmp_path / "s.wav", 3.0, channels=2)
    info = wav_info(blob[:4096], len(blob))
    assert info == {
        "container": "wav",
        "format_tag": 1,
        "channels": 2,
        "sample_rate": 8000,
        "bits": 16,
        "byte_rate": 32000,
        "data_bytes": 96000,
        "duration_s": 3.0,
    }
    assert wav_info(b"not a wav", 9) == {}


def test_seek_reuses_the_object_header_but_never_the_erased_state(local_services) -> None:
    from fsrecrypt.pipeline import HeaderCache

    services, tenant, recordings = local_services
    wav = recordings / "cache.wav"
    original = make_wav(wav, 2.0, seed=6)
    rec = ingest_file(services, str(wav), tenant.name).recording
    reads: list[tuple[int, int | None]] = []
    store = services.store
    real_read = store.read_bytes

    def counting_read(key: str, start: int = 0, end: int | None = None) -> bytes:
        reads.append((start, end))
        return real_read(key, start, end)

    store.read_bytes = counting_read  # type: ignore[method-assign]
    for start in (0, 10_000, 20_000):
        _plan, chunks = iter_plaintext_range(services, open_recording(services, rec), start, None)
        assert b"".join(chunks) == original[start:]
    assert len(reads) == 1, "the header is read once per object key"
    # A cache entry expires: the header is read again after its TTL.
    services.headers = HeaderCache(ttl=0.0)
    open_recording(services, rec)
    open_recording(services, rec)
    assert len(reads) == 3
    # Status is checked before any cached header is used.
    services.db.set_status(rec.id, "erased")
    with pytest.raises(errors.RecordingGone):
        open_recording(services, services.db.recording(rec.id))
