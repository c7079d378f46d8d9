"""Roles and acting for an end user: checked per route before any view runs, refusals logged.

A key holds the roles it was created with (default ``listen``); a route of
``fsrecrypt.web.routes.ROUTES`` names the roles it needs. A service key
created with ``on_behalf_of`` may name its end user (``X-On-Behalf-Of``); any
other credential that tries is refused, and the access log carries both users.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg2.errors
import pytest

from fsrecrypt import pipeline
from fsrecrypt.config import Config, with_overrides
from fsrecrypt.errors import ConfigError
from fsrecrypt.web import create_api_key, create_app, openapi_document
from fsrecrypt.web.auth import ROLES
from fsrecrypt.web.routes import ROUTES
from tests.support.factories import write_config
from tests.web.test_web_app import World, _base_config, assert_json_error, build_world


@pytest.fixture(scope="module")
def world(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(Path(tmp_path_factory.mktemp("web-roles")), pg_dsn, "local")
    tenant = w.tenants["a"]
    for label, roles, on_behalf in (
        ("ingest", ("ingest",), False),
        ("admin", ("admin",), False),
        ("service", ("listen",), True),
    ):
        _row, w.keys[label] = create_api_key(
            w.services, tenant, f"{label}@example.com", roles=roles, on_behalf_of=on_behalf
        )
    yield w
    w.services.close()


@pytest.fixture
def client(world: World):
    app = create_app(world.services, now=world.now)
    app.testing = False
    return app.test_client()


def key(world: World, label: str, **extra: str) -> dict[str, str]:
    return {"X-API-Key": world.keys[label], "User-Agent": "pytest-roles", **extra}


def auth_rows(world: World, user: str, error: str) -> list[dict]:
    rows = world.services.db.audit_rows(action="auth")
    return [r for r in rows if r["user_id"] == user and r["error_message"] == error]


def test_a_key_holds_listen_by_default_and_me_shows_roles(world: World, client) -> None:
    me = client.get("/v1/me", headers=key(world, "a")).get_json()
    assert me["roles"] == ["listen"] and me["via"] == "api_key" and "key_id" in me
    assert client.get("/v1/me", headers=key(world, "ingest")).get_json()["roles"] == ["ingest"]


def test_a_route_refuses_a_caller_without_its_role_before_the_view(world: World, client) -> None:
    rec = world.recordings["a1"].id
    before = len(auth_rows(world, "ingest@example.com", "forbidden_role"))
    for path in (
        f"/v1/recordings/{rec}/stream",
        f"/v1/recordings/{rec}/playback",
        "/v1/recordings",
    ):
        body = assert_json_error(
            client.get(path, headers=key(world, "ingest")), 403, "forbidden_role"
        )
        assert "listen" in body["error"]["message"]
    rows = auth_rows(world, "ingest@example.com", "forbidden_role")
    assert len(rows) == before + 3
    assert rows[-1]["details"]["required_any_of"] == ["listen", "download", "admin"]
    assert rows[-1]["details"]["roles"] == ["ingest"] and rows[-1]["details"]["via"] == "api_key"
    assert str(rows[-1]["tenant_id"]) == world.recordings["a1"].tenant_id
    # No stream row: the view never ran.
    assert not [
        r
        for r in world.services.db.audit_rows(recording_id=rec, action="stream")
        if r["user_id"] == "ingest@example.com"
    ]
    # The metadata of one recording is open to ingest (an uploader checks its upload).
    assert client.get(f"/v1/recordings/{rec}", headers=key(world, "ingest")).status_code == 200


def test_missing_role_is_403_even_for_another_tenants_id(world: World, client) -> None:
    """The role is checked before the recording is looked up: no id probing either way."""
    other = world.recordings["b1"].id
    r = client.get(f"/v1/recordings/{other}/stream", headers=key(world, "ingest"))
    assert_json_error(r, 403, "forbidden_role")
    unknown = client.get(f"/v1/recordings/{uuid.uuid4()}/stream", headers=key(world, "ingest"))
    assert unknown.get_json() == r.get_json()


def test_roles_are_checked_when_created_and_by_the_database(world: World) -> None:
    with pytest.raises(ConfigError, match="unknown role 'root'"):
        create_api_key(world.services, world.tenants["a"], "x@example.com", roles=["root"])
    with pytest.raises(ConfigError, match="at least one role"):
        create_api_key(world.services, world.tenants["a"], "x@example.com", roles=[])
    row, _key = create_api_key(
        world.services, world.tenants["a"], "x@example.com", roles=["admin", "listen", "admin"]
    )
    assert row.roles == ("listen", "admin")
    with pytest.raises(psycopg2.errors.CheckViolation), world.services.db.transaction() as cur:
        cur.execute("UPDATE api_keys SET roles = ARRAY['root'] WHERE key_id = %s", (row.key_id,))


def test_a_key_without_the_right_cannot_act_for_another_user(world: World, client) -> None:
    r = client.get("/v1/me", headers=key(world, "a", **{"X-On-Behalf-Of": "mallory"}))
    assert_json_error(r, 403, "on_behalf_refused")
    assert auth_rows(world, "a-supervisor@example.com", "on_behalf_refused")
    bad = key(world, "service", **{"X-On-Behalf-Of": "eve\x01"})
    assert client.get("/v1/me", headers=bad).status_code == 400


def test_a_service_key_acts_for_its_end_user_and_the_log_carries_both(world: World, client) -> None:
    headers = key(world, "service", **{"X-On-Behalf-Of": "dana@example.com"})
    me = client.get("/v1/me", headers=headers).get_json()
    assert me["user"] == "dana@example.com" and me["service_user"] == "service@example.com"
    rec = world.recordings["a2"]
    r = client.get(f"/v1/recordings/{rec.id}/stream", headers={**headers, "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.data == world.originals["a2"][:10]
    r.close()
    row = world.services.db.audit_rows(recording_id=rec.id, action="stream")[-1]
    assert row["user_id"] == "dana@example.com"
    assert row["details"]["service_user"] == "service@example.com"
    assert row["details"]["on_behalf_of"] == "dana@example.com"
    # The signed URL binds the same principal: its stream is logged for dana too.
    issued = client.get(f"/v1/recordings/{rec.id}/playback", headers=headers).get_json()
    played = client.get(issued["url"])
    assert played.status_code == 200 and played.data == world.originals["a2"]
    played.close()
    row = world.services.db.audit_rows(recording_id=rec.id, action="stream")[-1]
    assert row["user_id"] == "dana@example.com" and row["details"]["via"] == "signed_url"
    assert row["details"]["service_user"] == "service@example.com"
    # Changing the end user inside the URL breaks its signature.
    query = dict(parse_qsl(urlsplit(issued["url"]).query))
    who = json.loads(base64.urlsafe_b64decode(query["who"] + "=="))
    who["u"] = "mallory@example.com"
    query["who"] = base64.urlsafe_b64encode(json.dumps(who).encode()).rstrip(b"=").decode()
    forged = client.get(f"{urlsplit(issued['url']).path}?{urlencode(query)}")
    assert_json_error(forged, 403, "invalid_signature")


def test_the_document_names_each_routes_roles() -> None:
    doc = openapi_document()
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert op.get("x-roles", []) == list(route.roles)
        if route.security != "public":
            assert {"401", "403"} <= set(op["responses"]), route.operation_id
            names = [p["name"] for p in op["parameters"]]
            assert "X-On-Behalf-Of" in names
    assert doc["components"]["securitySchemes"]["Bearer"]["scheme"] == "bearer"


def test_cli_role_names_match_the_roles() -> None:
    from fsrecrypt.cli.web import ROLE_NAMES

    assert ROLE_NAMES == ROLES


def test_apikeys_cli_roles_and_on_behalf_of(pg_dsn: str, tmp_path: Path) -> None:
    config = with_overrides(Config(), **_base_config(tmp_path, pg_dsn))
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    name = f"roles-{uuid.uuid4().hex[:8]}"
    services.db.add_tenant(name, services.keys.create_key(f"roles-{uuid.uuid4().hex[:6]}"))
    env = {**os.environ, "FSRECRYPT_CONFIG": str(cfg)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from fsrecrypt.cli import main; main()", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    made = cli(
        "apikeys", "create", "--tenant", name, "--user", "svc",
        "--role", "download", "--role", "admin", "--on-behalf-of",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "roles download, admin; may act for end users" in made.stderr
    plain = cli("apikeys", "create", "--tenant", name, "--user", "carol")
    assert "roles listen;" in plain.stderr
    listed = [
        json.loads(line) for line in cli("apikeys", "list", "--tenant", name).stdout.splitlines()
    ]
    by_user = {row["user"]: row for row in listed}
    assert by_user["svc"]["roles"] == ["download", "admin"] and by_user["svc"]["on_behalf_of"]
    assert by_user["carol"]["roles"] == ["listen"] and not by_user["carol"]["on_behalf_of"]
    bad = cli("apikeys", "create", "--tenant", name, "--user", "x", "--role", "root")
    assert bad.returncode == 2 and "root" in bad.stderr
    services.close()


def test_the_server_log_keeps_no_principal_from_a_signed_url() -> None:
    """``who`` names the end user (an e-mail, often): the request log keeps its name only."""
    from fsrecrypt.web import redact

    who = base64.urlsafe_b64encode(b'{"u":"dana@example.com"}').decode().rstrip("=")
    line = redact(f"GET /v1/recordings/x/stream?kid=jwt&exp=9&sig=abc&who={who} HTTP/1.1")
    assert who not in line and "who=[redacted]" in line and "kid=jwt" in line
