"""Conditional reads: ``get_range(..., expect=info)`` reads only the object ``info`` described.

Why it matters: a player's seeks use a cached, verified header and skip the
HEAD before each read; the read itself must then notice a replaced object
(restored, tampered, another version) so the header is read again instead
of stale facts being used. Local store: the opened file's ``fstat``; S3 (a
real moto server): ``If-Match``, ``VersionId`` and the size in
``Content-Range`` on the GET.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fsrecrypt.errors import ObjectNotFound, TruncatedMessage
from fsrecrypt.store import LocalStore, ObjectChanged, ObjectInfo
from tests.store.test_store import count_calls, s3store


def test_local_read_as_described(local: LocalStore) -> None:
    local.put_stream("rec/a.esdk", [b"0123456789" * 100])
    info = local.head("rec/a.esdk")
    assert b"".join(local.get_range("rec/a.esdk", 10, 20, expect=info)) == b"0123456789"


def test_local_replaced_file_is_noticed_by_the_read(local: LocalStore, tmp_path: Path) -> None:
    local.put_stream("rec/a.esdk", [b"A" * 1000])
    info = local.head("rec/a.esdk")
    path = tmp_path / "objects" / "rec" / "a.esdk"
    # Same size, same name, other bytes: a restore or an attacker writing in place.
    os.chmod(path, 0o600)
    time.sleep(0.01)
    path.write_bytes(b"B" * 1000)
    with pytest.raises(ObjectChanged) as caught:
        local.get_range("rec/a.esdk", 0, 10, expect=info)
    assert "changed since it was last read" in str(caught.value)
    # Another file renamed over the name (another inode): noticed as well.
    fresh = local.head("rec/a.esdk")
    other = tmp_path / "objects" / "other"
    other.write_bytes(b"B" * 1000)
    os.replace(other, path)
    with pytest.raises(ObjectChanged):
        local.get_range("rec/a.esdk", 0, 10, expect=fresh)
    # Without expect, or with the current identity, it reads.
    assert local.read_bytes("rec/a.esdk", 0, 3) == b"BBB"
    now = local.head("rec/a.esdk")
    assert b"".join(local.get_range("rec/a.esdk", 0, 3, expect=now)) == b"BBB"


def test_local_forged_identity_is_refused(local: LocalStore) -> None:
    local.put_stream("rec/a.esdk", [b"A" * 1000])
    info = local.head("rec/a.esdk")
    for forged in (
        ObjectInfo(key=info.key, size=info.size + 1, stamp=info.stamp),
        ObjectInfo(key=info.key, size=info.size, stamp=None),
        ObjectInfo(key=info.key, size=info.size, stamp=info.stamp + "\x00"),
    ):
        with pytest.raises(ObjectChanged):
            local.get_range("rec/a.esdk", 0, 10, expect=forged)
    local.delete("rec/a.esdk")
    with pytest.raises(ObjectNotFound):
        local.get_range("rec/a.esdk", 0, 10, expect=info)


def test_s3_read_as_described_is_one_request(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.put_stream("rec/a.esdk", [b"0123456789" * 100])
    info = store.head("rec/a.esdk")
    calls = count_calls(store)
    assert b"".join(store.get_range("rec/a.esdk", 10, 20, expect=info)) == b"0123456789"
    assert b"".join(store.get_range("rec/a.esdk", 990, None, expect=info)) == b"0123456789"
    assert calls == {"GetObject": 2}


def test_s3_replaced_object_is_noticed_by_the_read(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.put_stream("rec/a.esdk", [b"A" * 1000])
    info = store.head("rec/a.esdk")
    store.delete("rec/a.esdk")
    store.put_stream("rec/a.esdk", [b"B" * 1000])  # same size, other etag
    with pytest.raises(ObjectChanged):
        store.get_range("rec/a.esdk", 0, 10, expect=info)
    # Same etag, other size (a forged or stale identity): the GET's Content-Range tells.
    now = store.head("rec/a.esdk")
    with pytest.raises(ObjectChanged):
        store.get_range("rec/a.esdk", 0, 10, expect=ObjectInfo(now.key, now.size + 7, now.etag))
    # A range past the end of what the object now is, but inside the described size.
    with pytest.raises(ObjectChanged):
        store.get_range("rec/a.esdk", 1500, 1600, expect=ObjectInfo(now.key, 2000, now.etag))
    assert b"".join(store.get_range("rec/a.esdk", 0, 3, expect=now)) == b"BBB"
    store.delete("rec/a.esdk")
    with pytest.raises(ObjectNotFound):
        store.get_range("rec/a.esdk", 0, 10, expect=now)


def test_s3_versioned_bucket_newer_version(versioned_s3_bucket) -> None:  # type: ignore[no-untyped-def]
    """A newer version with other bytes is noticed; one with the same bytes is the same
    object to a reader. No VersionId is named: that would need s3:GetObjectVersion."""
    store = s3store(versioned_s3_bucket)
    calls = count_calls(store)
    store.put_stream("rec/v.esdk", [b"first-version"])
    first = store.head("rec/v.esdk")
    assert first.version_id
    bucket = versioned_s3_bucket
    bucket.client.put_object(Bucket=bucket.name, Key="rec/v.esdk", Body=b"first-version")
    assert b"".join(store.get_range("rec/v.esdk", 0, 5, expect=first)) == b"first"
    bucket.client.put_object(Bucket=bucket.name, Key="rec/v.esdk", Body=b"other-version")
    with pytest.raises(ObjectChanged):
        store.get_range("rec/v.esdk", 0, 5, expect=first)
    assert calls.get("GetObject") == 2 and "GetObjectVersion" not in calls


def test_local_read_described_is_the_file_read(local: LocalStore) -> None:
    local.put_stream("rec/a.esdk", [b"x" * 100])
    data, info = local.read_described("rec/a.esdk", 0, 4096)
    assert data == b"x" * 100 and info == local.head("rec/a.esdk")
    assert local.read_described("rec/a.esdk", 90, 95)[0] == b"xxxxx"
    with pytest.raises(ObjectNotFound):
        local.read_described("rec/none.esdk", 0, 10)
    with pytest.raises(ValueError):
        local.read_described("rec/a.esdk", 10, 5)


def test_s3_read_described_is_one_get(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = s3store(s3_bucket)
    store.put_stream("rec/a.esdk", [b"y" * 10_000])
    store.put_stream("rec/empty.esdk", [b""])
    calls = count_calls(store)
    data, info = store.read_described("rec/a.esdk", 0, 4096)
    assert calls == {"GetObject": 1}
    assert data == b"y" * 4096 and info == store.head("rec/a.esdk")
    # Smaller than asked for: the whole object, and its true size.
    data, info = store.read_described("rec/a.esdk", 9_000, 20_000)
    assert data == b"y" * 1000 and info.size == 10_000
    # An empty object (the GET answers 416): still its identity, nothing read.
    data, info = store.read_described("rec/empty.esdk", 0, 4096)
    assert data == b"" and info.size == 0
    with pytest.raises(ObjectNotFound):
        store.read_described("rec/none.esdk", 0, 10)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_header_larger_than_the_probe_is_read_whole(backend, local, request) -> None:  # type: ignore[no-untyped-def]
    """Many escrow copies make a header outgrow the first read: it grows, under one identity."""
    from fsrecrypt import format as esdk
    from fsrecrypt.pipeline.headers import HEADER_PROBE, read_described_header

    store = local if backend == "local" else s3store(request.getfixturevalue("s3_bucket"))
    edks = [
        esdk.EncryptedDataKey("aws-kms", f"arn:aws:kms:eu-west-1:1:key/{i}".encode(), b"k" * 900)
        for i in range(12)
    ]
    header = esdk.build_header(b"\x01" * 32, edks, {"tenant_id": "acme", "recording_id": "r"})
    assert header.size > 2 * HEADER_PROBE
    store.put_stream("rec/big-header.esdk", [header.raw, b"\x00" * 100])
    got, info = read_described_header(store, "rec/big-header.esdk")
    assert got.raw == header.raw and info.size == header.size + 100
    # Truncated inside the header: the typed error, not a loop.
    store.put_stream("rec/cut.esdk", [header.raw[: HEADER_PROBE * 2]])
    with pytest.raises(TruncatedMessage):
        read_described_header(store, "rec/cut.esdk")
