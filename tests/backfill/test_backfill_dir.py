"""Backfill from a directory into the local store, against real PostgreSQL.

Each stored recording must be what the daemon would have stored: readable
by the official AWS Encryption SDK under the tenant's key with the same
encryption context, a ``stored`` row with the custody fingerprint, an
``encrypt`` audit row with origin ``backfill``. The hostile cases are what
an archive written by others holds: symbolic links, odd names, documents
named like audio, truncated WAVs, files replaced between listing and reading.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from fsrecrypt.backfill.item import ItemWorker, ReadBackFailed
from fsrecrypt.backfill.job import BackfillRequest, dry_run, finish, start_backfill
from fsrecrypt.backfill.naming import Naming
from fsrecrypt.backfill.sources import iter_directory
from fsrecrypt.jobs import FinishedJob, JobContext, run_job
from fsrecrypt.pipeline import worker_id
from tests.backfill.conftest import sdk_decrypt_local
from tests.support.factories import make_wav

pytestmark = pytest.mark.integration


def _run(services, sources, naming, **kw):
    request = BackfillRequest([str(s) for s in sources], naming, **kw)
    job = start_backfill(services, request, user_id="test")
    return run_job(services, job.id)


def _rows(services, tenant):
    return services.db.recordings(tenant_id=tenant.id)


def test_directory_backfill_stores_like_the_daemon(local_services) -> None:
    services, tenant, archive = local_services
    calls = [str(uuid.uuid4()) for _ in range(3)]
    (archive / "2024" / "01").mkdir(parents=True)
    wavs = {
        calls[0]: make_wav(archive / "2024" / "01" / f"{calls[0]}.wav", 0.5, seed=1),
        calls[1]: make_wav(archive / "2024" / f"out_{calls[1]}_leg-a.wav", 0.3, seed=2),
    }
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + os.urandom(3000)
    (archive / f"{calls[2]}.mp3").write_bytes(mp3)
    (archive / "notes.txt").write_text("not audio")

    final = _run(services, [archive], Naming(tenant=tenant.name))

    assert final.state == "done", final.error
    assert final.result["counts"] == {"stored": 3, "skipped": 1}
    rows = {r.call_uuid: r for r in _rows(services, tenant)}
    assert set(rows) == set(calls)
    for call, rec in rows.items():
        assert rec.status == "stored"
        blob = services.store.read_bytes(rec.s3_path)
        plaintext, context = sdk_decrypt_local(services, blob, tenant.kms_key_id)
        assert plaintext == (wavs.get(call) or mp3)
        assert context == {"tenant_id": tenant.id, "recording_id": rec.id}
        assert rec.encryption_metadata["origin"] == "backfill"
        custody = services.db.custody_columns(rec.id)
        assert custody["plaintext_hmac"] and custody["plaintext_deleted_at"] is not None
        audit = [a for a in services.db.audit_rows(recording_id=rec.id) if a["action"] == "encrypt"]
        assert len(audit) == 1 and audit[0]["details"]["origin"] == "backfill"
    assert rows[calls[2]].encryption_metadata["content_type"] == "audio/mpeg"
    assert rows[calls[0]].encryption_metadata["wav"]["sample_rate"] == 8000
    # Audio gone, the document left alone and reported.
    left = sorted(p.name for p in archive.rglob("*") if p.is_file())
    assert left == ["notes.txt"]
    assert final.result["skipped"][0]["source"].endswith("notes.txt")
    assert "not audio" in final.result["skipped"][0]["why"]
    # One summary audit row, even if the summary is written again (a finisher that died).
    job_ctx = JobContext(services, final, "test")
    again = finish(job_ctx, FinishedJob(final, {}, lambda: services.db.iter_job_items(final.id)))
    assert again["counts"] == final.result["counts"]
    summaries = [
        r for r in services.db.audit_rows(action="backfill") if r["details"]["job"] == final.id
    ]
    assert len(summaries) == 1 and summaries[0]["details"]["counts"]["stored"] == 3


def test_hostile_archive_entries_are_skipped_and_reported(local_services, tmp_path) -> None:
    services, tenant, archive = local_services
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = make_wav(outside / f"{uuid.uuid4()}.wav", 0.2, seed=9)
    (archive / "link.wav").symlink_to(outside / os.listdir(outside)[0])
    (archive / "linkdir").symlink_to(outside, target_is_directory=True)
    full = make_wav(archive / "truncated.wav", 0.5, seed=3)
    (archive / "truncated.wav").write_bytes(full[: len(full) // 2])
    (archive / "fake.mp3").write_bytes(b"%PDF-1.7 this is a document")
    (archive / ".hidden.wav").write_bytes(full)
    os.mkfifo(archive / "pipe.wav")
    # A name with non-UTF-8 bytes cannot be recorded faithfully: skipped, not mangled.
    with open(os.path.join(os.fsencode(archive), b"bad-\xff.wav"), "wb") as f:
        f.write(full)
    # Full-width / Arabic-Indic digits are not a UUID: stored, but without a call UUID.
    odd = "\uff11" * 8 + "-" + "\u0661" * 4 + "-1111-1111-111111111111.wav"
    odd_wav = make_wav(archive / odd, 0.2, seed=4)

    final = _run(services, [archive], Naming(tenant=tenant.name))

    assert final.state == "done", final.error
    rows = _rows(services, tenant)
    assert [r.file_size_bytes for r in rows] == [len(odd_wav)]
    assert rows[0].call_uuid is None
    reasons = {s["source"].rsplit("/", 1)[-1]: s["why"] for s in final.result["skipped"]}
    assert "symbolic link" in reasons["link.wav"] and "symbolic link" in reasons["linkdir"]
    assert "incomplete WAV" in reasons["truncated.wav"]
    assert "does not look like .mp3" in reasons["fake.mp3"]
    assert "hidden" in reasons[".hidden.wav"]
    assert "not a regular file" in reasons["pipe.wav"]
    assert "not valid UTF-8" in reasons["bad-\\xff.wav"]
    # Nothing outside the archive was read or removed; nothing refused was removed.
    assert (outside / os.listdir(outside)[0]).read_bytes() == secret
    assert (archive / "truncated.wav").exists() and (archive / "fake.mp3").exists()
    assert not (archive / odd).exists()


def test_file_replaced_between_listing_and_reading_is_kept(local_services) -> None:
    services, tenant, archive = local_services
    name = archive / f"{uuid.uuid4()}.wav"
    make_wav(name, 0.3, seed=5)
    items = list(iter_directory(str(archive), Naming(tenant=tenant.name)))
    # Replaced by rename (another inode) after the listing saw it.
    replacement = make_wav(archive / "new.tmp", 0.3, seed=6)
    os.rename(archive / "new.tmp", name)

    worker = ItemWorker(services, worker=worker_id())
    outcome = worker.run(items[0])

    assert outcome.status == "changed" and "since it was listed" in outcome.reason
    assert name.read_bytes() == replacement
    assert _rows(services, tenant) == []


def test_keep_source_and_dry_run_remove_nothing(local_services) -> None:
    services, tenant, archive = local_services
    data = make_wav(archive / f"{uuid.uuid4()}.wav", 0.2, seed=7)
    seen = []
    request = BackfillRequest([str(archive)], Naming(tenant=tenant.name))
    summary = dry_run(services, request, seen.append)
    assert summary["counts"] == {"would-store": 1} and seen[0].bytes == len(data)
    assert _rows(services, tenant) == []

    final = _run(services, [archive], Naming(tenant=tenant.name), keep_source=True)
    assert final.result["counts"] == {"stored": 1}
    assert [p.read_bytes() for p in archive.iterdir()] == [data]
    # Run again: found stored, verified, still kept; nothing stored twice.
    final = _run(services, [archive], Naming(tenant=tenant.name), keep_source=True)
    assert final.result["counts"] == {"already-stored": 1}
    assert len(_rows(services, tenant)) == 1
    # Touched (new mtime, so a new source identity), same audio: still not stored twice.
    (path,) = archive.iterdir()
    os.utime(path, (1_700_000_000, 1_700_000_000))
    final = _run(services, [archive], Naming(tenant=tenant.name))
    assert final.result["counts"] == {"already-stored": 1}
    assert len(_rows(services, tenant)) == 1 and list(archive.iterdir()) == []


def test_tenant_and_call_from_the_name(local_services) -> None:
    services, tenant, archive = local_services
    other = services.db.add_tenant(f"other-{uuid.uuid4().hex[:6]}", tenant.kms_key_id)
    (archive / tenant.name).mkdir()
    (archive / other.name).mkdir()
    (archive / "nobody").mkdir()
    make_wav(archive / tenant.name / "call-42.wav", 0.1, seed=1)
    make_wav(archive / other.name / "call-43.wav", 0.1, seed=2)
    make_wav(archive / "nobody" / "call-44.wav", 0.1, seed=3)
    naming = Naming(tenant_from=r"^(?P<tenant>[^/]+)/", call_uuid_from=r"call-(?P<call>\d+)")

    final = _run(services, [archive], naming)

    assert final.result["counts"] == {"stored": 2, "skipped": 1}
    assert [r.call_uuid for r in _rows(services, tenant)] == ["42"]
    assert [r.call_uuid for r in _rows(services, other)] == ["43"]
    assert "tenant 'nobody' does not exist" in final.result["skipped"][0]["why"]
    assert (archive / "nobody" / "call-44.wav").exists()


def test_directory_swapped_for_a_symlink_after_listing_is_refused(local_services, tmp_path):
    """The listing is a stream; a directory swapped for a link before reading is not followed."""
    services, tenant, archive = local_services
    (archive / "d").mkdir()
    name = f"{uuid.uuid4()}.wav"
    make_wav(archive / "d" / name, 0.1, seed=1)
    items = iter_directory(str(archive), Naming(tenant=tenant.name))
    item = next(items)
    assert item.locator == str(archive / "d" / name)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = make_wav(outside / name, 0.1, seed=2)
    os.rename(archive / "d", tmp_path / "moved")
    (archive / "d").symlink_to(outside, target_is_directory=True)

    outcome = ItemWorker(services, worker=worker_id()).run(item)

    assert outcome.status == "skipped" and "symbolic link" in outcome.reason
    assert (outside / name).read_bytes() == secret
    assert _rows(services, tenant) == []
    assert list(items) == []


def test_source_kept_when_the_stored_object_does_not_read_back(local_services) -> None:
    """A store that damages what it was given: the item fails, the plaintext stays."""
    services, tenant, archive = local_services
    path = archive / f"{uuid.uuid4()}.wav"
    data = make_wav(path, 0.3, seed=8)
    store = services.store
    put = store.put_stream

    def damaging_put(key, chunks, **kw):
        info = put(key, chunks, **kw)
        target = store.root / key
        blob = bytearray(target.read_bytes())
        blob[-40] ^= 0x01  # one bit in the last frame
        os.chmod(target, 0o600)
        target.write_bytes(bytes(blob))
        return info

    store.put_stream = damaging_put
    (item,) = list(iter_directory(str(archive), Naming(tenant=tenant.name)))
    with pytest.raises(ReadBackFailed):
        ItemWorker(services, worker=worker_id()).run(item)
    assert path.read_bytes() == data
    (rec,) = _rows(services, tenant)
    assert services.db.custody_columns(rec.id)["plaintext_deleted_at"] is None


def test_an_item_run_again_after_its_source_went_is_already_stored(local_services) -> None:
    """A worker killed after removing the source but before recording the outcome."""
    services, tenant, archive = local_services
    make_wav(archive / f"{uuid.uuid4()}.wav", 0.2, seed=1)
    (item,) = list(iter_directory(str(archive), Naming(tenant=tenant.name)))
    worker = ItemWorker(services, worker=worker_id())
    first = worker.run(item)
    assert first.status == "stored" and first.source_removed
    again = worker.run(item)
    assert again.status == "already-stored" and again.recording_id == first.recording_id


def test_a_rerun_resumes_the_sealed_job_and_replaces_a_half_listed_one(local_services) -> None:
    import socket
    import subprocess

    services, tenant, archive = local_services
    make_wav(archive / f"{uuid.uuid4()}.wav", 0.1, seed=1)
    request = BackfillRequest([str(archive)], Naming(tenant=tenant.name))
    sealed = start_backfill(services, request, user_id="test")
    assert start_backfill(services, request, user_id="test").id == sealed.id  # resumed
    services.db.cancel_job(sealed.id)

    # A run SIGKILLed while listing: its job stays 'creating' with a partial list.
    gone = subprocess.Popen(["true"])
    gone.wait()
    params = {**request.params(), "listed_by": f"{socket.gethostname()}:{gone.pid}"}
    half = services.db.create_job("backfill", params, "test")
    fresh = start_backfill(services, request, user_id="test")

    assert fresh.id not in (half.id, sealed.id) and fresh.total_items == 1
    assert services.db.job(half.id).state == "cancelled"
    assert "listing process" in services.db.job(half.id).error
    assert run_job(services, fresh.id).result["counts"] == {"stored": 1}


def test_directory_listing_memory_does_not_grow_with_the_directory(tmp_path) -> None:
    """One directory of 20,000 files costs the listing what one of 2,000 does."""
    import tracemalloc

    def peak(count: int) -> int:
        root = tmp_path / f"n{count}"
        (root / "flat").mkdir(parents=True)
        for i in range(count):
            (root / "flat" / f"{i:06d}-{uuid.uuid4()}.wav").touch()
        tracemalloc.start()
        try:
            seen = sum(1 for _ in iter_directory(str(root), Naming(tenant="acme")))
            return tracemalloc.get_traced_memory()[1] if seen == count else -1
        finally:
            tracemalloc.stop()

    small, large = peak(2000), peak(20000)
    assert small > 0 and large > 0
    assert large < small * 1.5 + 64 * 1024, (small, large)


def test_a_copy_of_audio_already_stored_for_the_call_is_not_stored_again(
    local_services, tmp_path
) -> None:
    """The daemon stored the call; the archive holds a copy: removed, not stored twice."""
    from fsrecrypt.pipeline import ingest_file

    services, tenant, archive = local_services
    call = str(uuid.uuid4())
    recordings = Path(services.config.freeswitch.recordings_dirs[0])
    data = make_wav(recordings / f"{call}.wav", 0.3, seed=3)
    stored = ingest_file(services, str(recordings / f"{call}.wav"), tenant.name, call_uuid=call)
    (archive / f"{call}.wav").write_bytes(data)  # the copy
    other = make_wav(archive / f"{call}_b-leg.wav", 0.3, seed=4)  # same call, other audio
    assert len(other) == len(data)

    final = _run(services, [archive], Naming(tenant=tenant.name))

    assert final.result["counts"] == {"already-stored": 1, "stored": 1}
    rows = _rows(services, tenant)
    assert len(rows) == 2 and stored.recording.id in {r.id for r in rows}
    assert list(archive.iterdir()) == []
