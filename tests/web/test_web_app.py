"""The playback API against real PostgreSQL, the real pipeline and both stores.

Recordings are made by ``pipeline.ingest_file`` from generated WAVs, stored in
the local store (local keyring) and in S3 + KMS on the moto server, then read
back through the Flask app: tenant isolation, Range edge cases, signed URLs,
erased recordings, tampered objects and the access log.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsrecrypt import pipeline
from fsrecrypt.config import Config, with_overrides
from fsrecrypt.web import (
    BadRange,
    StreamAborted,
    create_api_key,
    create_app,
    load_signing_key,
    parse_range,
    revoke_api_key,
)
from tests.support.factories import write_config

FRAME = 4096


def wav_bytes(seconds: float, *, rate: int = 8000, seed: int = 0) -> bytes:
    """A 16-bit mono PCM WAV whose samples never repeat (a misplaced frame shows)."""
    n = int(seconds * rate)
    samples = bytes((i * 7 + seed * 13 + (i >> 8)) & 0xFF for i in range(2 * n))
    header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", len(samples))
    return header + samples


@dataclass
class World:
    """Two tenants with recordings and API keys, over one store backend."""

    backend: str
    services: pipeline.Services
    root: Path
    tenants: dict[str, str] = field(default_factory=dict)  # label -> tenant name
    keys: dict[str, str] = field(default_factory=dict)  # label -> API key
    recordings: dict[str, Any] = field(default_factory=dict)  # label -> Recording
    originals: dict[str, bytes] = field(default_factory=dict)  # label -> WAV bytes
    clock: list[float] = field(default_factory=lambda: [0.0])

    def ingest(self, label: str, tenant: str, seconds: float, seed: int, call: str | None = None):
        data = wav_bytes(seconds, seed=seed)
        path = self.root / "recordings" / f"{label}-{uuid.uuid4().hex[:8]}.wav"
        path.write_bytes(data)
        outcome = pipeline.ingest_file(
            self.services,
            str(path),
            self.tenants[tenant],
            call_uuid=call or str(uuid.uuid4()),
            user_id="test",
            delete=True,
        )
        assert not path.exists()
        self.recordings[label] = outcome.recording
        self.originals[label] = data
        return outcome.recording

    def now(self) -> float:
        return time.time() + self.clock[0]


def _base_config(root: Path, dsn: str) -> dict[str, dict[str, Any]]:
    (root / "recordings").mkdir(parents=True, exist_ok=True)
    return {
        "database": {"dsn": dsn},
        "keys": {"provider": "local", "keyring": str(root / "keyring.json")},
        "storage": {"backend": "local", "path": str(root / "objects")},
        "pipeline": {"frame_size": FRAME},
        "playback": {"signing_key_file": str(root / "secrets" / "url-signing.key"), "url_ttl": 900},
        "freeswitch": {"recordings_dirs": (str(root / "recordings"),)},
    }


def build_world(root: Path, dsn: str, backend: str, moto: Any = None) -> World:
    sections = _base_config(root, dsn)
    if backend == "s3":
        s3 = moto.client("s3")
        bucket = f"fsrecrypt-web-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        sections["storage"] = {
            "backend": "s3",
            "bucket": bucket,
            "endpoint_url": moto.endpoint_url,
            "region": moto.region,
        }
        sections["keys"] = {
            "provider": "aws-kms",
            "endpoint_url": moto.endpoint_url,
            "region": moto.region,
            # The custody fingerprint key lives beside it: keep it in the test's root.
            "keyring": str(root / "keyring.json"),
        }
    config = with_overrides(Config(), **sections)
    services = pipeline.Services(config)
    world = World(backend=backend, services=services, root=root)
    suffix = uuid.uuid4().hex[:8]
    for label in ("a", "b"):
        if backend == "s3":
            key_id = moto.client("kms").create_key()["KeyMetadata"]["Arn"]
        else:
            key_id = services.keys.create_key(f"web-{label}-{suffix}")
        name = f"web-{backend}-{label}-{suffix}"
        services.db.add_tenant(name, key_id)
        world.tenants[label] = name
        _row, world.keys[label] = create_api_key(services, name, f"{label}-supervisor@example.com")
    world.ingest("a1", "a", 1.3, seed=1, call="call-a1")
    world.ingest("a2", "a", 0.6, seed=2, call="call-a2")
    world.ingest("b1", "b", 0.7, seed=3, call="call-b1")
    return world


@pytest.fixture(scope="module", params=["local", "s3"])
def world(request, pg_dsn, tmp_path_factory) -> Iterator[World]:
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    w = build_world(tmp_path_factory.mktemp(f"web-{request.param}"), pg_dsn, request.param, moto)
    yield w
    w.services.close()


@pytest.fixture
def client(world: World):
    app = create_app(world.services, now=world.now)
    app.testing = False
    world.clock[0] = 0.0
    return app.test_client()


def hdr(world: World, label: str = "a", **extra: str) -> dict[str, str]:
    return {"X-API-Key": world.keys[label], "User-Agent": "pytest-web", **extra}


def stream_path(world: World, label: str) -> str:
    return f"/v1/recordings/{world.recordings[label].id}/stream"


def last_audit(world: World, recording_label: str | None = None, action: str | None = None):
    rec = world.recordings[recording_label].id if recording_label else None
    rows = world.services.db.audit_rows(recording_id=rec, action=action)
    assert rows, "expected an access-log row"
    return rows[-1]


def assert_json_error(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.data[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "psycopg2" not in text and ".esdk" not in text
    return body


# --- auth and isolation ---


def test_missing_and_invalid_keys_are_refused_and_audited(world: World, client) -> None:
    # Anonymous refusals are counted per client address, reason and minute: a
    # client address of its own keeps an earlier parametrisation's bucket (same
    # minute, same reason) from absorbing this test's first row.
    n = uuid.uuid4().int
    own = {"REMOTE_ADDR": f"10.{n % 250 + 1}.{(n >> 8) % 250 + 1}.{(n >> 16) % 250 + 1}"}
    r = client.get("/v1/recordings", environ_base=own)
    assert_json_error(r, 401, "auth_required")
    assert r.headers["WWW-Authenticate"].startswith("ApiKey")
    bad = world.keys["a"][:-4] + "AAAA"
    assert_json_error(
        client.get("/v1/recordings", headers={"X-API-Key": bad}, environ_base=own),
        401,
        "invalid_api_key",
    )
    assert_json_error(
        client.get("/v1/recordings", headers={"X-API-Key": "nonsense"}, environ_base=own),
        401,
        "invalid_api_key",
    )
    row = world.services.db.audit_rows(action="auth")[-1]
    assert row["success"] is False and row["error_message"] == "invalid_api_key"
    assert row["user_id"] == "anonymous"


def test_me_and_listing_are_tenant_scoped(world: World, client) -> None:
    me = client.get("/v1/me", headers=hdr(world)).get_json()
    assert me["tenant"] == world.tenants["a"] and me["user"] == "a-supervisor@example.com"
    listed = client.get("/v1/recordings", headers=hdr(world)).get_json()["recordings"]
    ids = {r["id"] for r in listed}
    assert {world.recordings["a1"].id, world.recordings["a2"].id} <= ids
    assert world.recordings["b1"].id not in ids
    one = client.get("/v1/recordings?call_uuid=call-a2", headers=hdr(world)).get_json()
    assert [r["id"] for r in one["recordings"]] == [world.recordings["a2"].id]
    assert one["recordings"][0]["duration_s"] == pytest.approx(0.6)
    assert "s3_path" not in one["recordings"][0] and "encrypted_dek" not in one["recordings"][0]
    # call_uuid of another tenant finds nothing
    other = client.get("/v1/recordings?call_uuid=call-b1", headers=hdr(world)).get_json()
    assert other["recordings"] == []
    future = client.get("/v1/recordings?from=2999-01-01T00:00:00Z", headers=hdr(world))
    assert future.get_json()["recordings"] == []
    past = client.get("/v1/recordings?to=2000-01-01T00:00:00", headers=hdr(world))
    assert past.get_json()["recordings"] == []
    assert_json_error(
        client.get("/v1/recordings?from=yesterday", headers=hdr(world)), 400, "invalid_parameter"
    )
    assert_json_error(
        client.get("/v1/recordings?limit=0", headers=hdr(world)), 400, "invalid_parameter"
    )


@pytest.mark.parametrize("suffix", ["", "/stream", "/playback"])
def test_other_tenants_recording_is_404_not_403(world: World, client, suffix: str) -> None:
    b1 = world.recordings["b1"].id
    r = client.get(f"/v1/recordings/{b1}{suffix}", headers=hdr(world, "a"))
    assert_json_error(r, 404, "not_found")
    unknown = client.get(f"/v1/recordings/{uuid.uuid4()}{suffix}", headers=hdr(world, "a"))
    assert unknown.status_code == 404 and unknown.get_json() == {
        "error": {**unknown.get_json()["error"], "code": "not_found"}
    }
    # the two 404s are indistinguishable apart from the id
    assert set(r.get_json()["error"]) == set(unknown.get_json()["error"])
    assert_json_error(
        client.get(f"/v1/recordings/not-a-uuid{suffix}", headers=hdr(world)), 404, "not_found"
    )
    # tenant b can read it
    assert client.get(f"/v1/recordings/{b1}{suffix}", headers=hdr(world, "b")).status_code == 200
    refused = [
        r
        for r in world.services.db.audit_rows(tenant_id=world.recordings["a1"].tenant_id)
        if r["details"].get("requested_id") == b1
    ]
    assert refused and all(not r["success"] and r["recording_id"] is None for r in refused)


# --- streaming and ranges ---


def test_full_stream_returns_the_original_and_is_audited(world: World, client) -> None:
    r = client.get(stream_path(world, "a1"), headers=hdr(world))
    assert r.status_code == 200
    assert r.mimetype == "audio/wav"
    assert r.headers["Accept-Ranges"] == "bytes"
    original = world.originals["a1"]
    assert int(r.headers["Content-Length"]) == len(original)
    assert r.data == original
    r.close()
    row = last_audit(world, "a1", "stream")
    assert row["success"] is True and row["user_id"] == "a-supervisor@example.com"
    assert row["details"]["range"] == {"start": 0, "end": len(original) - 1, "size": len(original)}
    assert row["details"]["bytes_sent"] == len(original) and row["details"]["completed"] is True
    assert row["user_agent"] == "pytest-web" and str(row["ip_address"]) == "127.0.0.1"


def _expected_range(size: int, header: str) -> tuple[int, int]:
    spec = header.split("=", 1)[1]
    first, last = spec.split("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(size - 1, int(last)) if last else size - 1


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-0",
        "bytes=0-43",
        "bytes=LAST-LAST",
        "bytes=-1",
        "bytes=-5000",
        "bytes=-999999999",
        "bytes=100-",
        "bytes=4095-4096",
        "bytes=4096-8191",
        "bytes=5000-999999999",
        "bytes=0-",
    ],
)
def test_range_edge_cases(world: World, client, header: str) -> None:
    original = world.originals["a1"]
    size = len(original)
    header = header.replace("LAST", str(size - 1))
    r = client.get(stream_path(world, "a1"), headers=hdr(world, Range=header))
    start, last = _expected_range(size, header)
    assert r.status_code == 206, r.data[:200]
    assert r.headers["Content-Range"] == f"bytes {start}-{last}/{size}"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert int(r.headers["Content-Length"]) == last - start + 1
    assert r.data == original[start : last + 1]
    r.close()
    row = last_audit(world, "a1", "stream")
    assert row["details"]["range"] == {"start": start, "end": last, "size": size}


@pytest.mark.parametrize(
    "header",
    [
        "bytes=SIZE-",
        "bytes=SIZE-SIZE",
        "bytes=99999999-",
        "bytes=0-1,5-9",
        "bytes=0-1, 10-",
        "bytes=abc",
        "bytes=5-2",
        "bytes=-0",
        "bytes=-",
        "items=0-10",
        "bytes 0-10",
        "bytes=0x10-20",
    ],
)
def test_unsatisfiable_multi_and_malformed_ranges_are_416(
    world: World, client, header: str
) -> None:
    size = len(world.originals["a1"])
    header = header.replace("SIZE", str(size))
    r = client.get(stream_path(world, "a1"), headers=hdr(world, Range=header))
    assert_json_error(r, 416, "range_not_satisfiable")
    assert r.headers["Content-Range"] == f"bytes */{size}"
    row = last_audit(world, "a1", "stream")
    assert row["success"] is False and row["error_message"] == "range_not_satisfiable"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=9-", 10, (9, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=-30", 10, (0, 10)),
        ("bytes=2-100", 10, (2, 10)),
        (" bytes = 1 - 2 ", 10, (1, 3)),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=0-1,2-3", "bytes=-0", "bytes=3-1", "x=1-2"])
def test_parse_range_refuses(header: str) -> None:
    with pytest.raises(BadRange):
        parse_range(header, 10)
    with pytest.raises(BadRange):
        parse_range("bytes=-1", 0)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_range_returns_exactly_the_original_bytes(world: World, client, data) -> None:
    original = world.originals["a1"]
    size = len(original)
    kind = data.draw(st.sampled_from(["closed", "open", "suffix"]))
    start = data.draw(st.integers(0, size - 1))
    if kind == "closed":
        last = data.draw(st.integers(start, size + 5000))
        header, expected = f"bytes={start}-{last}", original[start : last + 1]
    elif kind == "open":
        header, expected = f"bytes={start}-", original[start:]
    else:
        n = data.draw(st.integers(1, size + 100))
        header, expected = f"bytes=-{n}", original[-n:]
    r = client.get(stream_path(world, "a1"), headers=hdr(world, Range=header))
    assert r.status_code == 206
    assert r.data == expected
    r.close()


def test_head_gives_size_without_decrypting(world: World, client) -> None:
    r = client.head(stream_path(world, "a2"), headers=hdr(world))
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(world.originals["a2"])
    assert r.headers["Accept-Ranges"] == "bytes"


# --- signed playback URLs ---


def _signed(world: World, client, label: str, owner: str = "a", **query: str) -> dict[str, Any]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    r = client.get(
        f"/v1/recordings/{world.recordings[label].id}/playback{'?' + qs if qs else ''}",
        headers=hdr(world, owner),
    )
    assert r.status_code == 200, r.data
    return r.get_json()


def test_signed_url_plays_without_a_header_and_supports_range(world: World, client) -> None:
    issued = _signed(world, client, "a1")
    assert issued["expires_in"] == 900
    row = last_audit(world, "a1", "playback_url")
    assert row["success"] is True and row["details"]["expires_at"] == issued["expires_at"]
    assert world.keys["a"] not in issued["url"]
    r = client.get(issued["url"], headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206
    assert r.data == world.originals["a1"][1000:2000]
    r.close()
    row = last_audit(world, "a1", "stream")
    assert row["success"] is True and row["details"]["via"] == "signed_url"
    assert row["user_id"] == "a-supervisor@example.com"
    full = client.get(issued["url"])
    assert full.status_code == 200 and full.data == world.originals["a1"]
    full.close()


def test_expired_altered_and_replayed_urls_are_refused(world: World, client) -> None:
    issued = _signed(world, client, "a1", ttl="60")
    url = issued["url"]
    # altered signature, expiry and key id
    sig = url.rsplit("sig=", 1)[1]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert_json_error(client.get(url.replace(sig, flipped)), 403, "invalid_signature")
    exp = url.split("exp=", 1)[1].split("&", 1)[0]
    assert_json_error(client.get(url.replace(exp, str(int(exp) + 3600))), 403, "invalid_signature")
    assert_json_error(client.get(url.replace("sig=", "sig=x")), 403, "invalid_signature")
    # replayed for another recording of the same tenant, and of another tenant
    for other in ("a2", "b1"):
        replay = url.replace(world.recordings["a1"].id, world.recordings[other].id)
        assert_json_error(client.get(replay), 403, "invalid_signature")
    # expired
    world.clock[0] = 61
    assert_json_error(client.get(url), 403, "url_expired")
    world.clock[0] = 0
    assert client.get(url).status_code == 200
    refused = [
        r
        for r in world.services.db.audit_rows(action="stream")
        if r["error_message"] in ("url_expired", "invalid_signature")
    ]
    # anonymous refusals are counted per client, reason and minute: the first of
    # each minute is a chain row, the count is kept beside it
    assert refused and all(not r["success"] for r in refused)
    assert {r["error_message"] for r in refused} == {"url_expired", "invalid_signature"}
    counted = sum(
        b["refusals"]
        for b in world.services.db.refusal_buckets("127.0.0.1")
        if b["action"] == "stream" and b["reason"] in ("url_expired", "invalid_signature")
    )
    assert counted >= 6
    # ttl beyond the configured maximum is refused
    r = client.get(
        f"/v1/recordings/{world.recordings['a1'].id}/playback?ttl=901", headers=hdr(world)
    )
    assert_json_error(r, 400, "invalid_parameter")


def test_revoked_key_stops_its_key_and_its_urls(world: World, client) -> None:
    name = world.tenants["a"]
    row, key = create_api_key(world.services, name, "temp@example.com")
    headers = {"X-API-Key": key}
    r = client.get(f"/v1/recordings/{world.recordings['a2'].id}/playback", headers=headers)
    url = r.get_json()["url"]
    assert client.get(url).status_code == 200
    revoke_api_key(world.services, row.key_id)
    assert_json_error(client.get("/v1/me", headers=headers), 401, "invalid_api_key")
    assert_json_error(client.get(url), 403, "invalid_signature")


# --- erased, tampered, missing ---


def test_erased_recording_answers_410(world: World, client) -> None:
    rec = world.ingest("gone", "a", 0.2, seed=9)
    with world.services.db.transaction() as cur:
        cur.execute(
            "UPDATE call_recordings SET status = 'erased', erased_at = now(),"
            " encrypted_dek = NULL WHERE id = %s",
            (rec.id,),
        )
    for suffix in ("/stream", "/playback"):
        r = client.get(f"/v1/recordings/{rec.id}{suffix}", headers=hdr(world))
        assert_json_error(r, 410, "recording_erased")
    row = last_audit(world, "gone", "playback_url")
    assert row["success"] is False and row["error_message"] == "recording_erased"


def _tamper(world: World, label: str, plaintext_offset: int) -> int:
    """Flip a ciphertext byte in the frame holding ``plaintext_offset``; return its start."""
    rec = world.services.db.recording(world.recordings[label].id)
    store = world.services.store
    data = bytearray(store.read_bytes(rec.s3_path))
    header_size = rec.encryption_metadata["header_size"]
    seq = plaintext_offset // FRAME + 1
    frame_offset = header_size + (seq - 1) * (FRAME + 32)
    data[frame_offset + 4 + 12 + 100] ^= 0x01  # inside the frame's ciphertext
    store.delete(rec.s3_path)
    store.put_stream(rec.s3_path, [bytes(data)])
    return (seq - 1) * FRAME


def test_tampered_frame_mid_stream_stops_before_its_bytes(world: World, client) -> None:
    rec = world.ingest("tamper", "a", 1.5, seed=11)  # 24044 bytes: 6 frames
    original = world.originals["tamper"]
    bad_start = _tamper(world, "tamper", 3 * FRAME + 10)
    for headers, offset in ((hdr(world), 0), (hdr(world, Range="bytes=5000-"), 5000)):
        r = client.get(f"/v1/recordings/{rec.id}/stream", headers=headers)
        assert r.status_code in (200, 206)
        received = bytearray()
        with pytest.raises(StreamAborted):
            for chunk in r.response:
                received += chunk
        r.close()
        assert bytes(received) == original[offset:bad_start]
        row = last_audit(world, "tamper", "stream")
        assert row["success"] is False and "AuthenticationFailed" in row["error_message"]
        assert row["details"]["bytes_sent"] == bad_start - offset
    # a range wholly before the bad frame still plays
    ok = client.get(f"/v1/recordings/{rec.id}/stream", headers=hdr(world, Range="bytes=0-999"))
    assert ok.status_code == 206 and ok.data == original[:1000]
    ok.close()


def test_tampered_first_frame_is_a_clean_json_error(world: World, client) -> None:
    rec = world.ingest("tamper0", "a", 0.5, seed=12)
    _tamper(world, "tamper0", 0)
    r = client.get(f"/v1/recordings/{rec.id}/stream", headers=hdr(world))
    body = assert_json_error(r, 500, "integrity_error")
    assert rec.s3_path not in json.dumps(body)
    row = last_audit(world, "tamper0", "stream")
    assert row["success"] is False and "AuthenticationFailed" in row["error_message"]


def test_missing_object_leaks_no_internals(world: World, client) -> None:
    rec = world.ingest("missing", "a", 0.2, seed=13)
    world.services.store.delete(rec.s3_path)
    r = client.get(f"/v1/recordings/{rec.id}/stream", headers=hdr(world))
    body = assert_json_error(r, 500, "object_missing")
    assert rec.s3_path not in json.dumps(body) and world.tenants["a"] not in json.dumps(body)


# --- documents, keys, CLI ---


def test_openapi_document_is_valid_and_complete(world: World, client) -> None:
    from openapi_spec_validator import validate

    r = client.get("/v1/openapi.json")
    assert r.status_code == 200
    doc = json.loads(r.data)
    validate(doc)
    for path in (
        "/v1/recordings",
        "/v1/recordings/{id}",
        "/v1/recordings/{id}/stream",
        "/v1/recordings/{id}/playback",
        "/v1/me",
    ):
        assert path in doc["paths"]
    assert doc["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    assert "416" in doc["paths"]["/v1/recordings/{id}/stream"]["get"]["responses"]


def test_page_and_assets(world: World, client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and b'<audio id="player"' in page.data
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/app.js").status_code == 200
    assert client.get("/app.css").status_code == 200
    assert_json_error(client.get("/nope"), 404, "not_found")


def test_api_keys_are_stored_only_as_hashes(world: World) -> None:
    with world.services.db.transaction() as cur:
        cur.execute("SELECT key_id, key_hash, user_id FROM api_keys")
        rows = cur.fetchall()
        cur.execute("SELECT details::text FROM recording_access_logs")
        logged = " ".join(r[0] for r in cur.fetchall())
    # fsr_<16 hex>_<secret>: the secret itself may contain '_' (so never rsplit).
    secret = world.keys["a"][len("fsr_") + 17 :]
    assert len(secret) == 43
    assert rows and all(secret not in json.dumps(r) for r in rows)
    assert secret not in logged


def test_signing_key_is_created_0600_and_unsafe_files_are_refused(tmp_path: Path) -> None:
    from fsrecrypt.errors import ConfigError

    path = tmp_path / "sub" / "sign.key"
    key = load_signing_key(str(path))
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_signing_key(str(path)) == key
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="group/others"):
        load_signing_key(str(path))
    link = tmp_path / "link.key"
    path.chmod(0o600)
    link.symlink_to(path)
    with pytest.raises(ConfigError):
        load_signing_key(str(link))


def test_apikeys_cli_create_list_revoke(pg_dsn: str, tmp_path: Path) -> None:
    config = with_overrides(Config(), **_base_config(tmp_path, pg_dsn))
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    services.db.add_tenant(name, services.keys.create_key(f"cli-{uuid.uuid4().hex[:6]}"))
    env = {**os.environ, "FSRECRYPT_CONFIG": str(cfg)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from fsrecrypt.cli import main; main()", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    created = cli("apikeys", "create", "--tenant", name, "--user", "carol")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("fsr_") and "cannot be shown again" in created.stderr
    client = create_app(services).test_client()
    assert client.get("/v1/me", headers={"X-API-Key": key}).get_json()["user"] == "carol"
    key_id = key.split("_")[1]
    listed = cli("apikeys", "list", "--tenant", name)
    assert key_id in listed.stdout and key.rsplit("_", 1)[1] not in listed.stdout
    assert cli("apikeys", "revoke", key_id).returncode == 0
    assert client.get("/v1/me", headers={"X-API-Key": key}).status_code == 401
    missing = cli("apikeys", "create", "--tenant", "no-such-tenant", "--user", "x")
    assert missing.returncode != 0 and "unknown tenant" in missing.stderr
    assert "Traceback" not in missing.stderr
    services.close()
