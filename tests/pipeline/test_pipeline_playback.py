"""The way back: open, verify and decrypt one recording; Range reads and the header cache."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from fsrecrypt import errors
from fsrecrypt.pipeline import (
    HeaderCache,
    fetch_recording,
    ingest_file,
    iter_plaintext_range,
    open_recording,
)
from tests.support.factories import make_wav

pytestmark = pytest.mark.integration


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


def test_seek_reuses_the_object_header_but_never_the_erased_state(local_services) -> None:
    services, tenant, recordings = local_services
    wav = recordings / "cache.wav"
    original = make_wav(wav, 2.0, seed=6)
    rec = ingest_file(services, str(wav), tenant.name).recording
    reads: list[tuple[int, int | None]] = []
    store = services.store
    real_read = store.read_described

    def counting_read(key: str, start: int, end: int):  # type: ignore[no-untyped-def]
        reads.append((start, end))
        return real_read(key, start, end)

    store.read_described = counting_read  # type: ignore[method-assign]
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
