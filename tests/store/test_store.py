"""Object stores: the local directory store and S3 against a real moto server."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fsrecrypt.config import StorageConfig
from fsrecrypt.errors import ObjectExists, ObjectNotFound, StorageError
from fsrecrypt.store import (
    MIN_PART_SIZE,
    InvalidObjectKey,
    LocalStore,
    S3Store,
    StorageAccessError,
    build_store,
    object_key,
)

MiB = 1024 * 1024


class Boom(Exception):
    pass


def pattern(size: int, chunk: int = 64 * 1024, seed: int = 0) -> Iterator[bytes]:
    """Deterministic, non-repeating-per-chunk bytes, generated lazily."""
    produced = 0
    i = 0
    while produced < size:
        n = min(chunk, size - produced)
        block = hashlib.sha256(f"{seed}:{i}".encode()).digest()
        yield (block * (n // 32 + 1))[:n]
        produced += n
        i += 1


def failing(size_before_failure: int, exc: BaseException) -> Iterator[bytes]:
    yield from pattern(size_before_failure)
    raise exc


def test_object_key() -> None:
    created = datetime(2026, 3, 4, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert object_key("recordings/", "acme", "rec-1", created) == (
        "recordings/acme/2026/03/05/rec-1.esdk"
    )
    assert object_key("", "acme", "r", datetime(2026, 1, 2)) == "acme/2026/01/02/r.esdk"
    assert object_key("rec", "acme", "r", datetime(2026, 1, 2)) == "rec/acme/2026/01/02/r.esdk"
    for tenant, rid in [("..", "r"), ("a/b", "r"), ("acme", "../x"), ("acme", "+15551234567 x")]:
        with pytest.raises(InvalidObjectKey):
            object_key("p/", tenant, rid, created)
    with pytest.raises(InvalidObjectKey):
        object_key("p/", 42, "r", created)  # type: ignore[arg-type]


# --- local store ---------------------------------------------------------------------


# ``local``: the fixture in ``tests/store/conftest.py``.


def test_local_put_get_range_head_delete(local: LocalStore) -> None:
    data = b"".join(pattern(1_000_000))
    key = "acme/2026/01/02/rec.esdk"
    info = local.put_stream(key, pattern(1_000_000), metadata={"tenant": "acme"})
    assert info.key == key and info.size == len(data)
    assert (local.root / key).read_bytes() == data
    assert local.head(key).size == len(data)
    assert local.exists(key)
    assert b"".join(local.get_range(key)) == data
    assert local.read_bytes(key, 10, 20) == data[10:20]
    assert local.read_bytes(key, 999_990) == data[999_990:]
    assert local.read_bytes(key, 500_000, 2_000_000) == data[500_000:]
    assert local.read_bytes(key, 5, 5) == b""
    assert local.read_bytes(key, 2_000_000) == b""
    chunks = list(local.get_range(key, 1, 900_001))
    assert len(chunks) > 1 and b"".join(chunks) == data[1:900_001]
    with pytest.raises(ValueError):
        local.read_bytes(key, 10, 5)
    with pytest.raises(ObjectExists):
        local.put_stream(key, [b"other"])
    assert (local.root / key).read_bytes() == data
    local.put_stream("acme/2026/01/03/b.esdk", [b"x"])
    assert list(local.list_keys()) == [key, "acme/2026/01/03/b.esdk"]
    assert list(local.list_keys("acme/2026/01/03/")) == ["acme/2026/01/03/b.esdk"]
    assert list(local.list_keys("zzz/")) == []
    assert local.delete(key) == 1
    assert local.delete(key) == 0
    assert not local.exists(key)
    with pytest.raises(ObjectNotFound):
        local.head(key)
    with pytest.raises(ObjectNotFound):
        local.get_range(key)  # raises at call time, not on first next()
    local.put_stream("empty.esdk", [])
    assert local.head("empty.esdk").size == 0
    local.check()


@pytest.mark.parametrize(
    "exc", [Boom("encrypt failed"), KeyboardInterrupt(), OSError("input vanished")]
)
def test_local_put_is_atomic(local: LocalStore, exc: BaseException) -> None:
    key = "acme/x.esdk"
    seen: list[list[str]] = []

    def spy() -> Iterator[bytes]:
        yield b"a" * 1000
        seen.append(sorted(p.name for p in (local.root / "acme").iterdir()))
        yield b"b" * 1000
        raise exc

    with pytest.raises(type(exc)) as ei:
        local.put_stream(key, spy())
    assert ei.value is exc  # the iterator's own error, not re-labelled as a storage error
    # While writing, only a hidden temp name existed; afterwards nothing.
    assert len(seen[0]) == 1 and seen[0][0].startswith(".x.esdk.tmp-")
    assert not local.exists(key)
    assert list((local.root / "acme").iterdir()) == []
    assert list(local.list_keys()) == []


@pytest.mark.parametrize(
    "key",
    ["../evil", "a/../../evil", "/etc/passwd", "", "a//b", "./a", "a/.hidden", "a\x00b", "a\\b"],
)
def test_local_refuses_escaping_keys(local: LocalStore, key: str) -> None:
    with pytest.raises(InvalidObjectKey) as ei:
        local.put_stream(key, [b"x"])
    assert not ei.value.transient
    with pytest.raises(InvalidObjectKey):
        local.head(key)


def test_local_refuses_symlinked_escape(local: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (local.root / "link").symlink_to(outside)
    with pytest.raises(InvalidObjectKey):
        local.put_stream("link/x.esdk", [b"x"])
    assert list(outside.iterdir()) == []


def test_local_abort_incomplete_uploads(local: LocalStore) -> None:
    d = local.root / "acme"
    d.mkdir()
    stale = d / ".r.esdk.tmp-0123456789abcdef"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = d / ".s.esdk.tmp-fedcba9876543210"
    fresh.write_bytes(b"in progress")
    (d / "real.esdk").write_bytes(b"keep")
    assert local.abort_incomplete_uploads(older_than_seconds=600) == 1
    assert not stale.exists() and fresh.exists()
    assert local.abort_incomplete_uploads() == 1
    assert sorted(p.name for p in d.iterdir()) == ["real.esdk"]


def test_local_check_fails_on_missing_root(tmp_path: Path) -> None:
    with pytest.raises(StorageAccessError):
        LocalStore(tmp_path / "nope").check()


# --- S3 on moto ------------------------------------------------------------------------


def s3store(bucket, **kw) -> S3Store:  # type: ignore[no-untyped-def]
    kw.setdefault("part_size", MIN_PART_SIZE)
    return S3Store(
        bucket.name, region=bucket.region, endpoint_url=bucket.endpoint_url, prefix="rec/", **kw
    )


def count_calls(store: S3Store) -> dict[str, int]:
    """Count API operations the store actually sends (botocore event hook)."""
    calls: dict[str, int] = {}

    def hook(model, **_kw) -> None:  # type: ignore[no-untyped-def]
        calls[model.name] = calls.get(model.name, 0) + 1

    store.client.meta.events.register("before-call.s3", hook)
    return calls


def test_s3_small_object_single_put(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    calls = count_calls(store)
    data = b"".join(pattern(300_000))
    info = store.put_stream("rec/a.esdk", pattern(300_000), metadata={"tenant": "acme"})
    assert calls == {"PutObject": 1}
    assert info.size == len(data) and info.etag and "-" not in info.etag
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="rec/a.esdk")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"tenant": "acme"}
    assert store.head("rec/a.esdk").size == len(data)
    assert store.read_bytes("rec/a.esdk") == data
    assert store.read_bytes("rec/a.esdk", 1000, 2000) == data[1000:2000]
    assert store.read_bytes("rec/a.esdk", 299_990, None) == data[299_990:]
    assert store.read_bytes("rec/a.esdk", 400_000, 500_000) == b""
    with pytest.raises(ObjectExists):
        store.put_stream("rec/a.esdk", [b"overwrite"])
    assert store.read_bytes("rec/a.esdk") == data
    # An exactly-one-part object is still a single PutObject.
    calls.clear()
    store.put_stream("rec/b.esdk", pattern(MIN_PART_SIZE))
    assert calls == {"PutObject": 1}
    assert sorted(store.list_keys("rec/")) == ["rec/a.esdk", "rec/b.esdk"]
    assert store.exists("rec/b.esdk") and not store.exists("rec/zzz")
    with pytest.raises(ObjectNotFound):
        store.head("rec/zzz")
    with pytest.raises(ObjectNotFound):
        store.get_range("rec/zzz")


def test_s3_multipart_and_ranged_get(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    calls = count_calls(store)
    size = 12 * MiB + 12345
    data = b"".join(pattern(size, seed=7))
    info = store.put_stream("rec/big.esdk", pattern(size, seed=7))
    assert calls == {
        "HeadObject": 1,  # the early "already exists?" check
        "CreateMultipartUpload": 1,
        "UploadPart": 3,
        "CompleteMultipartUpload": 1,
    }
    assert info.size == size and info.etag is not None and info.etag.endswith("-3")
    assert store.head("rec/big.esdk").size == size
    calls.clear()
    got = b"".join(store.get_range("rec/big.esdk"))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # A range across the first part boundary, fetched with one request.
    calls.clear()
    start, end = 5 * MiB - 100, 5 * MiB + 300_000
    chunks = list(store.get_range("rec/big.esdk", start, end))
    assert calls == {"GetObject": 1}
    assert len(chunks) > 1
    assert b"".join(chunks) == data[start:end]
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


@pytest.mark.parametrize("exc", [Boom("encryption failed midway"), KeyboardInterrupt()])
def test_s3_failing_iterator_aborts_upload(s3_bucket, exc: BaseException) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    calls = count_calls(store)
    with pytest.raises(type(exc)) as ei:
        store.put_stream("rec/broken.esdk", failing(11 * MiB, exc))
    assert ei.value is exc
    assert calls.get("UploadPart") == 2  # the upload really was under way
    assert calls.get("AbortMultipartUpload") == 1
    c = s3_bucket.client
    assert c.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []
    assert c.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount") == 0
    # Failing within the first part: nothing was ever sent.
    calls.clear()
    with pytest.raises(Boom):
        store.put_stream("rec/broken.esdk", failing(1000, Boom("early")))
    assert calls == {}
    assert not store.exists("rec/broken.esdk")


def test_s3_multipart_refuses_overwrite_and_aborts(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.put_stream("rec/dup.esdk", [b"first"])
    with pytest.raises(ObjectExists):
        store.put_stream("rec/dup.esdk", pattern(6 * MiB))
    assert store.read_bytes("rec/dup.esdk") == b"first"
    c = s3_bucket.client
    assert c.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


def test_s3_sse(s3_bucket, kms_key: str) -> None:  # type: ignore[no-untyped-def]
    c = s3_bucket.client
    aes = s3store(s3_bucket, sse="AES256")
    aes.put_stream("rec/small.esdk", [b"abc"])
    aes.put_stream("rec/large.esdk", pattern(6 * MiB))
    for key in ("rec/small.esdk", "rec/large.esdk"):
        assert c.head_object(Bucket=s3_bucket.name, Key=key)["ServerSideEncryption"] == "AES256"
    kms = s3store(s3_bucket, sse="aws:kms", sse_kms_key_id=kms_key)
    kms.put_stream("rec/kms.esdk", [b"abc"])
    head = c.head_object(Bucket=s3_bucket.name, Key="rec/kms.esdk")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == kms_key
    assert kms.read_bytes("rec/kms.esdk") == b"abc"


@pytest.mark.parametrize("s3_bucket", [{"versioning": True}], indirect=True)
def test_s3_delete_removes_all_versions(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    c, b = s3_bucket.client, s3_bucket.name
    key = "rec/v.esdk"
    store.put_stream(key, [b"v1"])
    c.put_object(Bucket=b, Key=key, Body=b"v2")  # e.g. a re-upload by an operator
    c.delete_object(Bucket=b, Key=key)  # a delete marker
    c.put_object(Bucket=b, Key=key, Body=b"v3")
    c.put_object(Bucket=b, Key=key + ".other", Body=b"keep")  # same prefix, other key
    assert store.delete(key) == 4
    resp = c.list_object_versions(Bucket=b, Prefix=key)
    left = [v["Key"] for v in resp.get("Versions", []) + resp.get("DeleteMarkers", [])]
    assert left == [key + ".other"]
    assert store.delete(key) == 0


def test_s3_delete_unversioned(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.put_stream("rec/u.esdk", [b"x"])
    assert store.delete("rec/u.esdk") == 1
    assert not store.exists("rec/u.esdk")


def test_s3_abort_incomplete_uploads(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    c, b = s3_bucket.client, s3_bucket.name
    orphan = c.create_multipart_upload(Bucket=b, Key="rec/orphan.esdk")["UploadId"]
    c.upload_part(Bucket=b, Key="rec/orphan.esdk", UploadId=orphan, PartNumber=1, Body=b"x")
    other = c.create_multipart_upload(Bucket=b, Key="elsewhere/x")["UploadId"]
    store = s3store(s3_bucket)
    # moto reports a fixed 2010 "Initiated" date, so only a cutoff older than
    # that can show the age filter keeping an upload.
    assert store.abort_incomplete_uploads(older_than_seconds=30 * 365 * 86400) == 0
    assert store.abort_incomplete_uploads() == 1
    uploads = c.list_multipart_uploads(Bucket=b).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [other]  # outside our prefix: untouched


def test_s3_check(s3_bucket, moto_server) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.check()
    assert list(store.list_keys()) == []
    missing = S3Store(
        "fsrecrypt-no-such-bucket",
        region=moto_server.region,
        endpoint_url=moto_server.endpoint_url,
    )
    with pytest.raises(StorageError) as ei:
        missing.check()
    assert not ei.value.transient


def test_s3_unreachable_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store("bucket-x", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(StorageError) as ei:
        store.put_stream("rec/x", [b"x"])
    assert ei.value.transient
    with pytest.raises(StorageError) as ei:
        store.head("rec/x")
    assert ei.value.transient and not isinstance(ei.value, ObjectNotFound)


def test_s3_put_stream_memory_is_bounded(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.client  # noqa: B018 - build the client outside the measurement
    size = 64 * MiB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        info = store.put_stream("rec/huge.esdk", pattern(size, chunk=256 * 1024))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == size
    assert info.etag is not None and info.etag.endswith("-13")
    assert peak < 3 * MIN_PART_SIZE, f"peak {peak / MiB:.1f} MiB"
    assert store.head("rec/huge.esdk").size == size


def test_build_store(tmp_path: Path, moto_server) -> None:  # type: ignore[no-untyped-def]
    local = build_store(StorageConfig(path=str(tmp_path)))
    assert isinstance(local, LocalStore) and local.name == "local"
    s3 = build_store(
        StorageConfig(
            backend="s3",
            bucket="b-x",
            endpoint_url=moto_server.endpoint_url,
            sse="AES256",
            part_size=6 * MiB,
        )
    )
    assert isinstance(s3, S3Store) and s3.name == "s3"
    assert s3.part_size == 6 * MiB and s3.sse == "AES256" and s3.prefix == "recordings/"
    with pytest.raises(ValueError):
        S3Store("b", part_size=MiB)


def test_object_key_dates_are_utc() -> None:
    created = datetime(2026, 12, 31, 23, 59, tzinfo=UTC) + timedelta(minutes=2)
    assert object_key("r/", "t", "id", created) == "r/t/2027/01/01/id.esdk"
