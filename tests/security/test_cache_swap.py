"""Issue 7, defects 9 and 10: the object-header cache and swapped objects, via the API.

9: a header is cached only once it verified with the recording's data key,
   only for the object identity it was read under, and dropped on any failed
   read: a tampered header never reaches range reads from memory, and a
   restored object plays again at once (not after the cache's 300 s TTL).
10: an object swapped for another recording's (or a wrapped key that does not
   fit the recording's own context) is an integrity failure, audited as one,
   with no "retry later": not a 503 key outage. A real KMS outage stays 503.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsrecrypt import format as esdk
from fsrecrypt.errors import KeyProviderUnavailable
from fsrecrypt.web import StreamAborted, create_app
from tests.web.test_web_app import World, assert_json_error, build_world, hdr

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["local", "s3"])
def world(request, pg_dsn, tmp_path_factory) -> Iterator[World]:
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    w = build_world(tmp_path_factory.mktemp(f"cache-{request.param}"), pg_dsn, request.param, moto)
    yield w
    w.services.close()


@pytest.fixture
def client(world: World):
    app = create_app(world.services, now=world.now)
    app.testing = False
    return app.test_client()


def object_bytes(world: World, key: str) -> bytes:
    store = world.services.store
    return store.read_bytes(key, 0, store.head(key).size)


def replace_object(world: World, key: str, data: bytes) -> None:
    """Overwrite an object behind fsrecrypt's back, as an attacker or a restore would."""
    if world.backend == "local":
        path = Path(world.services.config.storage.path) / key
        os.chmod(path, 0o600)
        path.write_bytes(data)  # in place: same name, same inode
    else:
        world.services.store.delete(key)
        world.services.store.put_stream(key, [data])


def tampered_header(data: bytes) -> bytes:
    """The object with one bit of its header authentication tag flipped."""
    header = esdk.parse_header(data)
    blob = bytearray(data)
    blob[header.size - 1] ^= 0x01
    return bytes(blob)


def ranged(client, world: World, rec, first: int = 100, last: int = 4999):
    return client.get(
        f"/v1/recordings/{rec.id}/stream", headers=hdr(world, Range=f"bytes={first}-{last}")
    )


def failed_stream_rows(world: World, rec) -> list[dict]:
    return [
        r
        for r in world.services.db.audit_rows(recording_id=rec.id, action="stream")
        if not r["success"]
    ]


def test_tampered_header_then_restored_is_served_again_at_once(world: World, client) -> None:
    rec = world.ingest("restore", "a", 1.2, seed=41)
    original = world.originals["restore"]
    good = object_bytes(world, rec.s3_path)
    replace_object(world, rec.s3_path, tampered_header(good))
    bad = ranged(client, world, rec)
    assert_json_error(bad, 500, "integrity_error")
    replace_object(world, rec.s3_path, good)
    for first, last in ((100, 4999), (9000, 9999), (0, 43)):
        r = ranged(client, world, rec, first, last)
        assert r.status_code == 206, r.data[:200]
        assert r.data == original[first : last + 1]
        r.close()
    assert rec.s3_path in world.services.headers  # the verified header is cached


def test_tampered_header_is_never_served_from_cache_to_range_reads(world: World, client) -> None:
    rec = world.ingest("cached", "a", 1.2, seed=42)
    original = world.originals["cached"]
    ok = ranged(client, world, rec)
    assert ok.status_code == 206 and ok.data == original[100:5000]
    ok.close()
    replace_object(world, rec.s3_path, tampered_header(object_bytes(world, rec.s3_path)))
    for first, last in ((100, 4999), (6000, 6999)):
        assert_json_error(ranged(client, world, rec, first, last), 500, "integrity_error")
        assert rec.s3_path not in world.services.headers
    rows = failed_stream_rows(world, rec)
    assert len(rows) == 2
    assert all("AuthenticationFailed" in r["error_message"] for r in rows)
    assert all(r["details"]["error_code"] == "integrity_error" for r in rows)


def test_frame_failure_drops_the_cached_header(world: World, client) -> None:
    rec = world.ingest("framefail", "a", 1.2, seed=43)
    ok = ranged(client, world, rec, 0, 99)
    assert ok.status_code == 206
    ok.close()
    assert rec.s3_path in world.services.headers
    # Corrupt the second frame's body; the header (and so the object's first
    # frame) stays good, the object's identity changes.
    data = bytearray(object_bytes(world, rec.s3_path))
    header = esdk.parse_header(bytes(data))
    data[header.size + (4096 + 32) + 4 + 12 + 50] ^= 0x01
    replace_object(world, rec.s3_path, bytes(data))
    # As if the change went unseen by the store's HEAD (same identity):
    world.services.headers.put(rec.s3_path, world.services.store.head(rec.s3_path), header)
    r = ranged(client, world, rec, 0, 8999)
    assert r.status_code == 206  # the first frame verified; the second one cuts the stream
    with pytest.raises(StreamAborted):
        for _chunk in r.response:
            pass
    r.close()
    assert rec.s3_path not in world.services.headers


def test_swapped_object_is_an_audited_integrity_error_not_503(world: World, client) -> None:
    victim = world.ingest("victim", "a", 0.8, seed=44)
    same_tenant = world.ingest("donor-a", "a", 0.8, seed=45)
    other_tenant = world.ingest("donor-b", "b", 0.8, seed=46)
    own = object_bytes(world, victim.s3_path)
    for donor in (same_tenant, other_tenant):
        replace_object(world, victim.s3_path, object_bytes(world, donor.s3_path))
        for headers in (hdr(world), hdr(world, Range="bytes=10-99")):
            r = client.get(f"/v1/recordings/{victim.id}/stream", headers=headers)
            body = assert_json_error(r, 500, "integrity_error")
            assert "retry" not in body["error"].get("hint", "").lower()
            assert r.headers.get("Retry-After") is None
            row = failed_stream_rows(world, victim)[-1]
            assert "ObjectMismatch" in row["error_message"]
            assert row["details"]["error_code"] == "integrity_error"
            assert row["tenant_id"] == victim.tenant_id
    replace_object(world, victim.s3_path, own)
    # The database's wrapped key swapped for another recording's: it does not
    # unwrap under this recording's context -> integrity failure too.
    with world.services.db.transaction("test: swap the wrapped key") as cur:
        cur.execute(
            "UPDATE call_recordings SET encrypted_dek = %s WHERE id = %s",
            (same_tenant.encrypted_dek, victim.id),
        )
    try:
        r = client.get(f"/v1/recordings/{victim.id}/stream", headers=hdr(world, Range="bytes=0-9"))
        assert_json_error(r, 500, "integrity_error")
        assert "ObjectMismatch" in failed_stream_rows(world, victim)[-1]["error_message"]
    finally:
        with world.services.db.transaction("test: restore the wrapped key") as cur:
            cur.execute(
                "UPDATE call_recordings SET encrypted_dek = %s WHERE id = %s",
                (victim.encrypted_dek, victim.id),
            )
    ok = client.get(f"/v1/recordings/{victim.id}/stream", headers=hdr(world))
    assert ok.status_code == 200 and ok.data == world.originals["victim"]
    ok.close()
    # A key provider that cannot be reached is still a transient 503.
    keys = world.services.keys

    def unreachable(*_args, **_kwargs):
        raise KeyProviderUnavailable("KMS Decrypt: connection refused")

    real = keys.decrypt_data_key
    keys.decrypt_data_key = unreachable  # type: ignore[method-assign]
    try:
        for headers in (hdr(world), hdr(world, Range="bytes=10-99")):
            r = client.get(f"/v1/recordings/{victim.id}/stream", headers=headers)
            assert_json_error(r, 503, "key_unavailable")
            row = failed_stream_rows(world, victim)[-1]
            assert row["details"]["error_code"] == "key_unavailable"
    finally:
        keys.decrypt_data_key = real  # type: ignore[method-assign]


def store_calls(world: World) -> list[str]:
    """What the store is asked, by operation (wraps the service's store in place)."""
    store = world.services.store
    calls: list[str] = []
    for name in ("head", "read_described", "get_range"):
        real = getattr(store, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        setattr(store, name, counted)
    return calls


def test_a_seek_on_a_cached_header_is_one_store_request(world: World, client) -> None:
    """Issue 10, many listeners: no HEAD before each seek; the read itself is conditional."""
    rec = world.ingest("oneread", "a", 2.0, seed=47)
    original = world.originals["oneread"]
    store = world.services.store
    calls = store_calls(world)
    try:
        first = ranged(client, world, rec, 0, 99)
        assert first.status_code == 206 and first.data == original[:100]
        first.close()
        assert calls == ["read_described", "get_range"]  # header with identity, frames
        for lo, hi in ((20_000, 20_999), (5, 9), (30_000, 31_999)):
            calls.clear()
            r = ranged(client, world, rec, lo, hi)
            assert r.status_code == 206 and r.data == original[lo : hi + 1]
            r.close()
            assert calls == ["get_range"], calls
        # The object replaced by a good copy of itself written anew (a restore):
        # where the store can tell (a new file), the conditional read notices,
        # the header is read afresh and the seek plays.
        good = object_bytes(world, rec.s3_path)
        if world.backend == "local":
            time.sleep(0.01)  # a new mtime even on coarse clocks
        replace_object(world, rec.s3_path, good)
        calls.clear()
        r = ranged(client, world, rec, 1000, 1999)
        assert r.status_code == 206 and r.data == original[1000:2000]
        r.close()
        if world.backend == "local":  # a new file: the fstat on the read tells
            assert calls == ["get_range", "read_described", "get_range"], calls
        else:  # the same bytes are the same etag to S3: nothing changed, one request
            assert calls == ["get_range"], calls
    finally:
        for name in ("head", "read_described", "get_range"):
            store.__dict__.pop(name, None)
