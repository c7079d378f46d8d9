"""Backfill from S3 (a moto server in its own process), into the local store and into S3.

A versioned bucket keeps every version of a plaintext object: after the
backfill none may be left, every distinct content must be stored once, and
an object overwritten since it was listed must be kept and reported.
"""

from __future__ import annotations

import os
import uuid

import pytest

from fsrecrypt.backfill.item import ItemWorker
from fsrecrypt.backfill.job import BackfillRequest, start_backfill
from fsrecrypt.backfill.naming import Naming, SourceSpec
from fsrecrypt.backfill.sources import S3Options, iter_source
from fsrecrypt.jobs import run_job
from fsrecrypt.pipeline import iter_plaintext, open_recording, worker_id
from tests.backfill.conftest import sdk_decrypt_local
from tests.support.factories import make_wav

pytestmark = pytest.mark.integration


def _versions(bucket) -> list[tuple[str, str]]:
    out = []
    for page in bucket.client.get_paginator("list_object_versions").paginate(Bucket=bucket.name):
        out += [(v["Key"], v["ETag"]) for v in page.get("Versions", [])]
    return sorted(out)


def _run(services, bucket, naming, prefix="rec/", **kw):
    request = BackfillRequest(
        [f"s3://{bucket.name}/{prefix}"],
        naming,
        s3=S3Options(bucket.endpoint_url, bucket.region),
        **kw,
    )
    return run_job(services, start_backfill(services, request, user_id="test").id)


def test_versioned_bucket_every_content_stored_once_no_plaintext_left(
    local_services, versioned_s3_bucket, tmp_path
) -> None:
    services, tenant, _archive = local_services
    b = versioned_s3_bucket
    put = lambda key, body: b.client.put_object(Bucket=b.name, Key=key, Body=body)  # noqa: E731
    calls = {k: str(uuid.uuid4()) for k in "ABCE"}
    wav = {i: make_wav(tmp_path / f"{i}.wav", 0.2, seed=i) for i in range(5)}
    put(f"rec/a/{calls['A']}.wav", wav[0])  # older content, then overwritten
    put(f"rec/a/{calls['A']}.wav", wav[1])
    put(f"rec/b/{calls['B']}.wav", wav[2])  # the same content twice
    put(f"rec/b/{calls['B']}.wav", wav[2])
    mp3 = b"ID3\x03\x00" + os.urandom(2000)
    put(f"rec/{calls['C']}.mp3", mp3)
    put("rec/readme.txt", b"not audio")
    put(f"rec/e/{calls['E']}.wav", wav[3])  # deleted: only a delete marker hides it
    b.client.delete_object(Bucket=b.name, Key=f"rec/e/{calls['E']}.wav")
    put("other/untouched.wav", wav[4])

    final = _run(services, b, Naming(tenant=tenant.name))

    assert final.state == "done", final.error
    assert final.result["counts"] == {"stored": 5, "skipped": 1}
    rows = services.db.recordings(tenant_id=tenant.id)
    contents = []
    for rec in rows:
        plaintext, context = sdk_decrypt_local(
            services, services.store.read_bytes(rec.s3_path), tenant.kms_key_id
        )
        assert context == {"tenant_id": tenant.id, "recording_id": rec.id}
        assert rec.source_path.startswith(f"s3://{b.name}/rec/")
        contents.append((rec.call_uuid, plaintext))
    expected = [
        (calls["A"], wav[0]),
        (calls["A"], wav[1]),
        (calls["B"], wav[2]),
        (calls["C"], mp3),
        (calls["E"], wav[3]),
    ]
    assert sorted(contents) == sorted(expected)
    # No plaintext version left below the prefix; the rest of the bucket untouched.
    assert [k for k, _ in _versions(b)] == ["other/untouched.wav", "rec/readme.txt"]
    # Run again: nothing listed but the document, nothing stored twice.
    again = _run(services, b, Naming(tenant=tenant.name))
    assert again.result["counts"] == {"skipped": 1}
    assert len(services.db.recordings(tenant_id=tenant.id)) == 5


def test_object_changed_since_listing_is_stored_as_listed_and_kept(
    local_services, versioned_s3_bucket, tmp_path
) -> None:
    services, tenant, _archive = local_services
    b = versioned_s3_bucket
    key = f"rec/{uuid.uuid4()}.wav"
    listed = make_wav(tmp_path / "1.wav", 0.2, seed=1)
    b.client.put_object(Bucket=b.name, Key=key, Body=listed)
    request = BackfillRequest(
        [f"s3://{b.name}/rec/"],
        Naming(tenant=tenant.name),
        s3=S3Options(b.endpoint_url, b.region),
    )
    job = start_backfill(services, request, user_id="test")  # listed now
    newer = make_wav(tmp_path / "2.wav", 0.2, seed=2)
    b.client.put_object(Bucket=b.name, Key=key, Body=newer)

    final = run_job(services, job.id)

    assert final.result["counts"] == {"changed": 1}
    (changed,) = final.result["changed"]
    assert changed["source"] == f"s3://{b.name}/{key}"
    assert "changed since it was listed" in changed["why"]
    (rec,) = services.db.recordings(tenant_id=tenant.id)
    assert b"".join(iter_plaintext(services, open_recording(services, rec))) == listed
    assert len(_versions(b)) == 2  # nothing deleted: the newer content is not stored yet
    # The next run stores the newer content and removes both versions.
    final = _run(services, b, Naming(tenant=tenant.name))
    assert final.result["counts"] == {"stored": 1, "already-stored": 1}
    assert _versions(b) == []


def test_unversioned_object_changed_since_listing_is_neither_stored_nor_deleted(
    local_services, s3_bucket, tmp_path
) -> None:
    services, tenant, _archive = local_services
    b = s3_bucket
    key = f"rec/{uuid.uuid4()}.wav"
    b.client.put_object(Bucket=b.name, Key=key, Body=make_wav(tmp_path / "1.wav", 0.2, seed=1))
    s3 = S3Options(b.endpoint_url, b.region)
    spec = SourceSpec("s3", bucket=b.name, prefix="rec/")
    (item,) = list(iter_source(spec, Naming(tenant=tenant.name), s3))
    newer = make_wav(tmp_path / "2.wav", 0.2, seed=2)
    b.client.put_object(Bucket=b.name, Key=key, Body=newer)

    outcome = ItemWorker(services, worker=worker_id(), s3=s3).run(item)

    assert outcome.status == "changed"
    assert services.db.recordings(tenant_id=tenant.id) == []
    assert b.client.get_object(Bucket=b.name, Key=key)["Body"].read() == newer


def test_s3_source_into_s3_store(
    s3_target_services, versioned_s3_bucket, tmp_path, monkeypatch
) -> None:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    services, tenant, target = s3_target_services
    b = versioned_s3_bucket
    data = make_wav(tmp_path / "1.wav", 0.3, seed=1)
    b.client.put_object(Bucket=b.name, Key=f"rec/{uuid.uuid4()}.wav", Body=data)

    final = _run(services, b, Naming(tenant=tenant.name))

    assert final.result["counts"] == {"stored": 1}
    (rec,) = services.db.recordings(tenant_id=tenant.id)
    assert b"".join(iter_plaintext(services, open_recording(services, rec))) == data
    assert _versions(b) == []
    # The official ESDK reads the stored object with the tenant's KMS key (on moto).
    monkeypatch.setenv("AWS_ENDPOINT_URL", target.endpoint_url)
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[tenant.kms_key_id])
    blob = target.client.get_object(Bucket=target.name, Key=rec.s3_path)["Body"].read()
    plaintext, header = client.decrypt(source=blob, key_provider=provider)
    assert plaintext == data
    assert dict(header.encryption_context) == {"tenant_id": tenant.id, "recording_id": rec.id}
    assert rec.encryption_metadata["store"] == "s3"
    assert services.store.exists(rec.s3_path) and target.name in repr(services.store)


def test_an_s3_item_run_again_after_its_versions_went_is_already_stored(
    local_services, versioned_s3_bucket, tmp_path
) -> None:
    services, tenant, _archive = local_services
    b = versioned_s3_bucket
    b.client.put_object(
        Bucket=b.name, Key=f"rec/{uuid.uuid4()}.wav", Body=make_wav(tmp_path / "1.wav", 0.2)
    )
    s3 = S3Options(b.endpoint_url, b.region)
    spec = SourceSpec("s3", bucket=b.name, prefix="rec/")
    (item,) = list(iter_source(spec, Naming(tenant=tenant.name), s3))
    worker = ItemWorker(services, worker=worker_id(), s3=s3)
    first = worker.run(item)
    assert first.status == "stored" and first.versions_removed == 1
    again = worker.run(item)
    assert again.status == "already-stored" and again.recording_id == first.recording_id


def test_content_in_more_versions_than_an_item_carries(
    local_services, versioned_s3_bucket, tmp_path, monkeypatch
) -> None:
    import fsrecrypt.backfill.s3source as s3source

    monkeypatch.setattr(s3source, "MAX_VERSIONS", 2)
    services, tenant, _archive = local_services
    b = versioned_s3_bucket
    data = make_wav(tmp_path / "1.wav", 0.1)
    key = f"rec/{uuid.uuid4()}.wav"
    for _ in range(4):
        b.client.put_object(Bucket=b.name, Key=key, Body=data)

    final = _run(services, b, Naming(tenant=tenant.name))

    assert final.result["counts"] == {"stored": 1}
    assert _versions(b) == []


def test_listing_is_paged_and_a_key_split_across_pages_stays_one_group(
    local_services, versioned_s3_bucket, monkeypatch
) -> None:
    """Pages of 3 versions: a key's 4 versions straddle pages and still make 2 items."""
    import fsrecrypt.backfill.s3source as s3source

    monkeypatch.setattr(s3source, "PAGE_SIZE", 3)
    _services, tenant, _archive = local_services
    b = versioned_s3_bucket
    calls = []
    original = s3source.S3Source._pages

    def counting(self, op, prefix):
        for page in original(self, op, prefix):
            calls.append(len(page.get("Versions", [])))
            yield page

    monkeypatch.setattr(s3source.S3Source, "_pages", counting)
    for i in range(5):
        key = f"rec/k{i}.mp3"
        for body in (b"ID3-one", b"ID3-two", b"ID3-one", b"ID3-two"):
            b.client.put_object(Bucket=b.name, Key=key, Body=body + bytes([i]))
    spec = SourceSpec("s3", bucket=b.name, prefix="rec/")
    items = list(iter_source(spec, Naming(tenant=tenant.name), S3Options(b.endpoint_url, b.region)))

    assert len(calls) >= 7 and max(calls) <= 3
    assert sorted((i.locator, len(i.versions)) for i in items) == sorted(
        (f"rec/k{n}.mp3", 2) for n in range(5) for _ in range(2)
    )
    assert sum(i.latest for i in items) == 5


def test_an_s3_copy_of_audio_already_stored_for_the_call_is_not_stored_again(
    local_services, versioned_s3_bucket
) -> None:
    from pathlib import Path

    from fsrecrypt.pipeline import ingest_file

    services, tenant, _archive = local_services
    b = versioned_s3_bucket
    call = str(uuid.uuid4())
    recordings = Path(services.config.freeswitch.recordings_dirs[0])
    data = make_wav(recordings / f"{call}.wav", 0.3, seed=3)
    ingest_file(services, str(recordings / f"{call}.wav"), tenant.name, call_uuid=call)
    b.client.put_object(Bucket=b.name, Key=f"rec/{call}.wav", Body=data)

    final = _run(services, b, Naming(tenant=tenant.name))

    assert final.result["counts"] == {"already-stored": 1}
    assert len(services.db.recordings(tenant_id=tenant.id)) == 1
    assert _versions(b) == []


def test_hostile_object_names_and_contents_are_skipped_and_kept(
    local_services, s3_bucket, tmp_path
) -> None:
    """Unversioned: moto cannot list the versions of a key holding NUL (it answers 500)."""
    services, tenant, _archive = local_services
    b = s3_bucket
    wav = make_wav(tmp_path / "1.wav", 0.2, seed=1)
    nul_key = f"rec/a\x00b-{uuid.uuid4()}.wav"
    odd_key = "rec/" + "\u0661" * 8 + "-" + "\uff11" * 4 + ".wav"
    objects = {
        nul_key: wav,  # NUL: cannot be recorded faithfully
        "rec/truncated.wav": wav[: len(wav) // 2],
        "rec/invoice.mp3": b"%PDF-1.5 not audio",
        "rec/notes.txt": b"hello",
        odd_key: wav,  # stored, but its digits are not a call UUID
    }
    for key, body in objects.items():
        b.client.put_object(Bucket=b.name, Key=key, Body=body)

    final = _run(services, b, Naming(tenant=tenant.name))

    assert final.result["counts"] == {"stored": 1, "skipped": 4}
    (rec,) = services.db.recordings(tenant_id=tenant.id)
    assert rec.call_uuid is None and rec.source_path == f"s3://{b.name}/{odd_key}"
    reasons = " | ".join(s["why"] for s in final.result["skipped"])
    for needle in ("NUL", "incomplete WAV", "does not look like .mp3", "not audio"):
        assert needle in reasons
    left = b.client.list_objects_v2(Bucket=b.name)["Contents"]
    assert sorted(o["Key"] for o in left) == sorted(set(objects) - {odd_key})
