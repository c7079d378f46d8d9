"""Download, holds, erasure and custody through the API: the CLI's rules, rows and receipts.

Each admin route runs the CLI's own domain function (``lifecycle.holds``,
``erase``, ``custody``), so the proofs here are that the API obeys the same
refusals (a hold blocks erasure, retention needs the override), answers the
same receipt, writes the same rows plus who asked (key, token issuer, the
service acting for a user, the client's address), scopes every id to the
caller's tenant, and refuses callers without the role and hostile bodies.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsrecrypt import pipeline
from fsrecrypt.config import with_overrides
from fsrecrypt.lifecycle.erase import receipt_hash
from fsrecrypt.web import create_api_key, create_app
from tests.support.jwks import AUDIENCE, ISSUER, Issuer
from tests.web.test_web_app import World, assert_json_error, build_world

ADDRESS = {"REMOTE_ADDR": "192.0.2.77"}


@pytest.fixture(scope="module")
def world(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(Path(tmp_path_factory.mktemp("web-admin")), pg_dsn, "local")
    for label, roles, on_behalf in (
        ("admin", ("admin",), False),
        ("download", ("download",), False),
        ("service", ("admin",), True),
    ):
        _row, w.keys[label] = create_api_key(
            w.services, w.tenants["a"], f"{label}@example.com", roles=roles, on_behalf_of=on_behalf
        )
    _row, w.keys["b-admin"] = create_api_key(
        w.services, w.tenants["b"], "b-admin@example.com", roles=("admin",)
    )
    yield w
    w.services.close()


@pytest.fixture
def client(world: World):
    app = create_app(world.services, now=world.now)
    app.testing = False
    return app.test_client()


def key(world: World, label: str, **extra: str) -> dict[str, str]:
    return {"X-API-Key": world.keys[label], "User-Agent": "pytest-admin", **extra}


def post(client, path: str, headers: dict[str, str], body: Any) -> Any:
    return client.post(path, headers=headers, json=body, environ_base=ADDRESS)


def rows(world: World, label: str, action: str) -> list[dict[str, Any]]:
    return world.services.db.audit_rows(recording_id=world.recordings[label].id, action=action)


# --- download ---


def test_download_sends_the_whole_file_as_an_attachment_audited_as_download(
    world: World, client
) -> None:
    rec = world.recordings["a1"]
    streams_before = len(rows(world, "a1", "stream"))
    r = client.get(
        f"/v1/recordings/{rec.id}/download",
        headers=key(world, "download", Range="bytes=0-9"),
        environ_base=ADDRESS,
    )
    assert r.status_code == 200 and r.data == world.originals["a1"]
    assert r.headers["Content-Disposition"] == f'attachment; filename="{rec.id}.wav"'
    assert r.headers["Content-Length"] == str(len(world.originals["a1"]))
    assert "Accept-Ranges" not in r.headers and r.mimetype == "audio/wav"
    r.close()
    row = rows(world, "a1", "download")[-1]
    assert row["success"] is True and row["user_id"] == "download@example.com"
    assert row["details"]["completed"] is True
    assert row["details"]["bytes_sent"] == len(world.originals["a1"])
    assert str(row["ip_address"]) == ADDRESS["REMOTE_ADDR"]
    assert len(rows(world, "a1", "stream")) == streams_before
    head = client.head(f"/v1/recordings/{rec.id}/download", headers=key(world, "download"))
    assert head.status_code == 200 and head.data == b""


def test_download_needs_its_role_and_the_callers_tenant(world: World, client) -> None:
    rec = world.recordings["a1"]
    listen = client.get(f"/v1/recordings/{rec.id}/download", headers=key(world, "a"))
    assert_json_error(listen, 403, "forbidden_role")
    refused = client.get(f"/v1/recordings/{rec.id}/stream", headers=key(world, "download"))
    assert_json_error(refused, 403, "forbidden_role")
    other = client.get(
        f"/v1/recordings/{world.recordings['b1'].id}/download", headers=key(world, "download")
    )
    assert_json_error(other, 404, "not_found")


# --- custody ---


def test_custody_answers_the_clis_document_for_admins_only(world: World, client) -> None:
    rec = world.recordings["a1"]
    r = client.get(f"/v1/recordings/{rec.id}/custody", headers=key(world, "admin"))
    assert r.status_code == 200, r.data
    doc = r.get_json()
    assert doc["recording_id"] == rec.id and doc["status"] == "stored"
    assert doc["fingerprint"]["value"] and doc["stored"]["object_key"] == rec.s3_path
    assert any(e["action"] == "encrypt" for e in doc["events"])
    row = rows(world, "a1", "custody")[-1]
    assert row["user_id"] == "admin@example.com" and row["details"]["via"] == "api_key"
    assert row["details"]["events"] == len(doc["events"])  # the CLI's own detail, kept
    assert "key_id" in row["details"]
    assert_json_error(
        client.get(f"/v1/recordings/{rec.id}/custody", headers=key(world, "a")),
        403,
        "forbidden_role",
    )
    assert_json_error(
        client.get(f"/v1/recordings/{rec.id}/custody", headers=key(world, "b-admin")),
        404,
        "not_found",
    )


# --- holds and erasure ---


def test_a_hold_blocks_erasure_through_the_api_until_released(world: World, client) -> None:
    rec = world.recordings["a2"]
    base = f"/v1/recordings/{rec.id}"
    held = post(client, f"{base}/holds", key(world, "admin"), {"reason": "case 7"})
    assert held.status_code == 200, held.data
    (result,) = held.get_json()["results"]
    assert result["status"] == "held" and result["recording_id"] == rec.id
    row = rows(world, "a2", "hold_add")[-1]
    assert row["details"]["reason"] == "case 7" and row["details"]["hold_id"] == result["hold_id"]
    assert row["details"]["via"] == "api_key" and row["user_id"] == "admin@example.com"
    assert str(row["ip_address"]) == ADDRESS["REMOTE_ADDR"]
    again = post(client, f"{base}/holds", key(world, "admin"), {"reason": "case 7"})
    assert again.get_json()["results"][0]["status"] == "already held"

    erase = {"reason": "GDPR request 9", "override_retention": True}
    refused = post(client, f"{base}/erase", key(world, "admin"), erase)
    body = assert_json_error(refused, 409, "legal_hold_active")
    assert "case 7" in body["error"]["message"]
    assert world.services.db.recording(rec.id).status == "stored"
    assert rows(world, "a2", "erase")[-1]["error_message"] == "legal_hold_active"

    released = post(client, f"{base}/holds/release", key(world, "admin"), {"reason": "closed"})
    assert released.get_json()["results"][0]["status"] == "released"
    assert rows(world, "a2", "hold_remove")[-1]["details"]["reason"] == "closed"
    twice = post(client, f"{base}/holds/release", key(world, "admin"), {"reason": "closed"})
    assert_json_error(twice, 409, "no_active_hold")

    # [retention] days = 0 keeps recordings forever: erasing needs the override, as on the CLI.
    kept = post(client, f"{base}/erase", key(world, "admin"), {"reason": "GDPR request 9"})
    assert_json_error(kept, 409, "retention_active")
    assert world.services.db.recording(rec.id).status == "stored"


def test_erasure_through_the_api_answers_the_clis_receipt(world: World, client) -> None:
    rec = world.ingest("victim", "a", 0.4, seed=9)
    headers = key(world, "service", **{"X-On-Behalf-Of": "dpo@example.com"})
    erase = {"reason": "GDPR request 11", "override_retention": True}
    r = post(client, f"/v1/recordings/{rec.id}/erase", headers, erase)
    assert r.status_code == 200, r.data
    receipt = r.get_json()
    assert receipt["recording_ids"] == [rec.id] and receipt["operator"] == "dpo@example.com"
    assert receipt["override_retention"] is True and receipt["versions_deleted"] >= 1
    assert receipt["receipt_hash"] == receipt_hash(receipt)
    with world.services.db.transaction() as cur:
        cur.execute(
            "SELECT receipt_hash FROM erasure_receipts WHERE id = %s", (receipt["receipt_id"],)
        )
        assert cur.fetchone()[0] == receipt["receipt_hash"]
    assert world.services.db.recording(rec.id).status == "erased"
    row = rows(world, "victim", "erase")[-1]
    assert row["success"] is True and row["user_id"] == "dpo@example.com"
    assert row["details"]["service_user"] == "service@example.com"
    assert row["details"]["data_key_destroyed"] is True
    gone = client.get(f"/v1/recordings/{rec.id}/stream", headers=key(world, "a"))
    assert_json_error(gone, 410, "recording_erased")
    # Erasing again retries nothing and still answers; holding an erased recording is refused.
    held = post(client, f"/v1/recordings/{rec.id}/holds", key(world, "admin"), {"reason": "x"})
    assert_json_error(held, 409, "invalid_state")


def test_admin_routes_refuse_other_tenants_and_other_roles(world: World, client) -> None:
    rec = world.recordings["a1"]
    for path, body in (
        ("holds", {"reason": "x"}),
        ("holds/release", {"reason": "x"}),
        ("erase", {"reason": "x", "override_retention": True}),
    ):
        url = f"/v1/recordings/{rec.id}/{path}"
        assert_json_error(post(client, url, key(world, "b-admin"), body), 404, "not_found")
        assert_json_error(post(client, url, key(world, "a"), body), 403, "forbidden_role")
        assert_json_error(post(client, url, key(world, "download"), body), 403, "forbidden_role")
    assert world.services.db.recording(rec.id).status == "stored"
    with world.services.db.transaction() as cur:
        cur.execute("SELECT count(*) FROM legal_holds WHERE recording_id = %s", (rec.id,))
        assert cur.fetchone()[0] == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ({}, "application/json"),
        ({"reason": "   "}, "application/json"),
        ({"reason": 7}, "application/json"),
        ({"reason": "x", "override_retention": "yes"}, "application/json"),
        ({"reason": "x", "admin": True}, "application/json"),
        ({"reason": "x" * 1001}, "application/json"),
        (["reason"], "application/json"),
        ("not json {", "application/json"),
        ("[" * 50000, "application/json"),
        ('{"reason": "x"}', "text/plain"),
        ('{"reason": "' + "x" * 70000 + '"}', "application/json"),
        (b'{"reason": "\xff\xfe"}', "application/json"),
    ],
    ids=range(12),
)
def test_hostile_bodies_are_refused_before_anything_changes(
    world: World, client, body: Any, content_type: str
) -> None:
    rec = world.recordings["a1"]
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    r = client.post(
        f"/v1/recordings/{rec.id}/erase",
        data=data,
        headers={**key(world, "admin"), "Content-Type": content_type},
    )
    assert_json_error(r, 400, "invalid_body")
    assert world.services.db.recording(rec.id).status == "stored"


def test_a_tokens_admin_action_names_its_issuer(world: World, tmp_path: Path) -> None:
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    config = with_overrides(
        world.services.config,
        auth={"jwks_file": str(jwks), "issuer": ISSUER, "audience": AUDIENCE},
    )
    services = pipeline.Services(config)
    try:
        client = create_app(services).test_client()
        rec = world.recordings["b1"]
        token = issuer.token(world.tenants["b"], "ec-1", roles=["admin"], sub="legal@b.example")
        headers = {"Authorization": f"Bearer {token}"}
        reason = f"matter {uuid.uuid4().hex[:6]}"
        r = post(client, f"/v1/recordings/{rec.id}/holds", headers, {"reason": reason})
        assert r.status_code == 200, r.data
        row = rows(world, "b1", "hold_add")[-1]
        assert row["user_id"] == "legal@b.example" and row["details"]["issuer"] == ISSUER
        assert row["details"]["reason"] == reason and row["details"]["via"] == "jwt"
        with services.db.transaction() as cur:
            cur.execute(
                "SELECT placed_by FROM legal_holds WHERE recording_id = %s AND reason = %s",
                (rec.id, reason),
            )
            assert cur.fetchone()[0] == "legal@b.example"
    finally:
        services.close()
