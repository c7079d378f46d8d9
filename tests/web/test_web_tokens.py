"""Bearer tokens (JWT) from the platform: real tokens, real keys, a JWKS over local HTTP.

The test's issuer (``tests/support/jwks.py``) generates RSA, EC and Ed25519
keys, signs tokens with PyJWT and serves the public keys from a small HTTP
server; the playback app fetches them as it would from the identity provider.
Every way a token can be wrong is tried, as an attacker would: expired, for
another audience or issuer, signed by an unknown key, ``alg: none``, HS256
keyed with the public key, a tampered signature or payload, another tenant's
claim, a missing role; and the key set's server is made slow, huge or garbled.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from fsrecrypt import pipeline
from fsrecrypt.config import AuthConfig, with_overrides
from fsrecrypt.errors import ConfigError
from fsrecrypt.web import create_app
from fsrecrypt.web.tokens import KeySet, KeySetUnavailable, fetch_bounded
from tests.support.jwks import AUDIENCE, ISSUER, Issuer, JwksServer
from tests.web.test_web_app import World, assert_json_error, build_world

MIN_REFRESH = 1.0


def auth_section(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "jwks_url": url,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "leeway": 5.0,
        "jwks_timeout": 1.0,
        "jwks_min_refresh": MIN_REFRESH,
        **extra,
    }


@pytest.fixture(scope="module")
def world(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(Path(tmp_path_factory.mktemp("web-tokens")), pg_dsn, "local")
    yield w
    w.services.close()


@pytest.fixture(scope="module")
def token_services(world: World, jwks_server: JwksServer) -> Iterator[pipeline.Services]:
    config = with_overrides(world.services.config, auth=auth_section(jwks_server.url))
    services = pipeline.Services(config)
    yield services
    services.close()


@pytest.fixture
def client(token_services: pipeline.Services, jwks_server: JwksServer):
    jwks_server.mode = "ok"
    jwks_server.kids = ["rsa-1", "ec-1", "ed-1"]
    app = create_app(token_services)
    app.testing = False
    return app.test_client()


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": "pytest-tokens", **extra}


def own_address() -> dict[str, str]:
    """A client address of its own, so anonymous refusals are counted in a fresh bucket."""
    n = uuid.uuid4().int
    return {"REMOTE_ADDR": f"10.{n % 250 + 1}.{(n >> 8) % 250 + 1}.{(n >> 16) % 250 + 1}"}


def refusal_reasons(world: World, client_ip: str) -> list[str]:
    with world.services.db.transaction() as cur:
        cur.execute(
            "SELECT reason FROM audit_refusal_buckets WHERE client = %s ORDER BY first_seen_at",
            (client_ip,),
        )
        return [r[0] for r in cur.fetchall()]


# --- good tokens ---


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
def test_a_good_token_of_each_algorithm_signs_in(world: World, issuer: Issuer, client, kid) -> None:
    token = issuer.token(world.tenants["a"], kid, roles=["listen", "download", "ignored"])
    me = client.get("/v1/me", headers=bearer(token))
    assert me.status_code == 200, me.data
    body = me.get_json()
    assert body["user"] == "olivia@platform.example" and body["via"] == "jwt"
    assert body["issuer"] == ISSUER and body["roles"] == ["listen", "download"]
    assert body["tenant"] == world.tenants["a"] and "key_id" not in body


def test_the_access_log_records_the_tokens_subject_and_issuer(
    world: World, issuer: Issuer, client
) -> None:
    rec = world.recordings["a1"]
    token = issuer.token(world.tenants["a"], sub="pat@platform.example")
    r = client.get(f"/v1/recordings/{rec.id}/stream", headers=bearer(token, Range="bytes=10-99"))
    assert r.status_code == 206 and r.data == world.originals["a1"][10:100]
    r.close()
    row = world.services.db.audit_rows(recording_id=rec.id, action="stream")[-1]
    assert row["user_id"] == "pat@platform.example" and row["success"] is True
    assert row["details"]["via"] == "jwt" and row["details"]["issuer"] == ISSUER
    assert row["details"]["subject"] == "pat@platform.example"
    assert "key_id" not in row["details"]


def test_the_signed_url_binds_the_tokens_principal(world: World, issuer: Issuer, client) -> None:
    rec = world.recordings["a2"]
    token = issuer.token(world.tenants["a"], sub="quinn@platform.example")
    issued = client.get(f"/v1/recordings/{rec.id}/playback", headers=bearer(token)).get_json()
    assert token not in issued["url"]
    played = client.get(issued["url"], headers={"Range": "bytes=0-99"})
    assert played.status_code == 206 and played.data == world.originals["a2"][:100]
    played.close()
    row = world.services.db.audit_rows(recording_id=rec.id, action="stream")[-1]
    assert row["user_id"] == "quinn@platform.example" and row["details"]["via"] == "signed_url"
    assert row["details"]["issuer"] == ISSUER
    # Another user (or tenant) written into the URL breaks its signature.
    query = dict(parse_qsl(urlsplit(issued["url"]).query))
    for field, value in (("u", "mallory"), ("t", world.recordings["b1"].tenant_id)):
        who = json.loads(base64.urlsafe_b64decode(query["who"] + "=="))
        who[field] = value
        forged = {**query, "who": base64.urlsafe_b64encode(json.dumps(who).encode()).decode()}
        r = client.get(f"{urlsplit(issued['url']).path}?{urlencode(forged)}")
        assert_json_error(r, 403, "invalid_signature")
    # A signed URL made for a token is not one for an API key of the same tenant.
    assert_json_error(
        client.get(f"{urlsplit(issued['url']).path}?{urlencode({**query, 'kid': '0' * 16})}"),
        403,
        "invalid_signature",
    )


# --- refused tokens ---


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": lambda: int(time.time()) - 120}, "token_expired"),
        ({"aud": "another-service"}, "token_wrong_audience"),
        ({"iss": "https://evil.example/"}, "token_wrong_issuer"),
        # Times are taken when the test runs, not at collection (a long suite
        # would otherwise reach a "not yet valid" time before the test does).
        ({"nbf": lambda: int(time.time()) + 600}, "token_not_yet_valid"),
        ({"exp": None}, "token_missing_claim"),
        ({"sub": None}, "token_missing_claim"),
        ({"tenant": None}, "token_missing_claim"),
        ({"tenant": "no-such-tenant"}, "unknown_tenant"),
        ({"tenant": str(uuid.uuid4())}, "unknown_tenant"),
        ({"tenant": ["a", "b"]}, "token_missing_claim"),
        ({"sub": "eve\nforged log line"}, "token_missing_claim"),
        ({"sub": "x" * 201}, "token_missing_claim"),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v),
)
def test_a_wrong_token_is_refused_with_its_reason_and_counted(
    world: World, issuer: Issuer, client, claims: dict[str, Any], code: str
) -> None:
    claims = {k: v() if callable(v) else v for k, v in claims.items()}
    tenant = claims["tenant"] if "tenant" in claims else world.tenants["a"]
    token = issuer.token(tenant, **{k: v for k, v in claims.items() if k != "tenant"})
    where = own_address()
    r = client.get("/v1/recordings", headers=bearer(token), environ_base=where)
    assert_json_error(r, 401, code)
    assert "Bearer" in r.headers["WWW-Authenticate"]
    assert refusal_reasons(world, where["REMOTE_ADDR"]) == [code]


def test_the_tenant_claim_may_hold_the_tenants_id(world: World, issuer: Issuer, client) -> None:
    tenant_id = world.recordings["a1"].tenant_id
    me = client.get("/v1/me", headers=bearer(issuer.token(tenant_id.upper()))).get_json()
    assert me["tenant"] == world.tenants["a"] and me["tenant_id"] == tenant_id


def test_an_expired_token_within_the_leeway_is_still_accepted(
    world: World, issuer: Issuer, client
) -> None:
    token = issuer.token(world.tenants["a"], exp=int(time.time()) - 2)
    assert client.get("/v1/me", headers=bearer(token)).status_code == 200


def test_alg_none_and_hs256_keyed_with_the_public_key_are_refused(
    world: World, issuer: Issuer, client
) -> None:
    claims = issuer.claims(world.tenants["a"])
    none = Issuer.unsigned({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims)
    for alg in ("none", "None", "NONE"):
        forged = Issuer.unsigned({"alg": alg, "kid": "rsa-1"}, claims)
        assert_json_error(
            client.get("/v1/me", headers=bearer(forged)), 401, "token_algorithm_refused"
        )
    assert_json_error(client.get("/v1/me", headers=bearer(none)), 401, "token_algorithm_refused")
    for secret in (issuer.public_pem("rsa-1"), json.dumps(issuer.jwk("rsa-1")).encode()):
        hs = Issuer.unsigned({"alg": "HS256", "kid": "rsa-1"}, claims, secret)
        assert_json_error(client.get("/v1/me", headers=bearer(hs)), 401, "token_algorithm_refused")


def test_the_allow_list_cannot_name_none_or_hmac() -> None:
    for algs in (("none",), ("HS256",), ("RS256", "HS512"), ()):
        with pytest.raises(ConfigError, match="algorithms may only name"):
            with_overrides(
                pipeline_config(), auth=auth_section("https://idp.example/jwks", algorithms=algs)
            )


def pipeline_config():
    from fsrecrypt.config import Config

    return Config()


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"jwks_url": "http://idp.example/jwks"}, "https"),
        ({"issuer": ""}, "issuer and audience"),
        ({"audience": ""}, "issuer and audience"),
        ({"jwks_file": "/etc/jwks.json"}, "not both"),
        ({"jwks_url": "", "jwks_file": "relative.json"}, "absolute path"),
        ({"jwks_max_bytes": 10}, "jwks_max_bytes"),
    ],
)
def test_token_settings_are_validated(settings: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        with_overrides(pipeline_config(), auth=auth_section("https://idp.example/jwks", **settings))


def test_an_algorithm_not_allowed_by_configuration_is_refused(
    world: World, issuer: Issuer, token_services: pipeline.Services, jwks_server: JwksServer
) -> None:
    config = with_overrides(
        token_services.config, auth=auth_section(jwks_server.url, algorithms=("RS256",))
    )
    services = pipeline.Services(config)
    try:
        client = create_app(services).test_client()
        ok = client.get("/v1/me", headers=bearer(issuer.token(world.tenants["a"], "rsa-1")))
        assert ok.status_code == 200
        es = client.get("/v1/me", headers=bearer(issuer.token(world.tenants["a"], "ec-1")))
        assert_json_error(es, 401, "token_algorithm_refused")
    finally:
        services.close()


def test_a_tampered_signature_or_payload_is_refused(world: World, issuer: Issuer, client) -> None:
    for kid in ("rsa-1", "ec-1", "ed-1"):
        token = issuer.token(world.tenants["a"], kid)
        head, body, sig = token.split(".")
        flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
        r = client.get("/v1/me", headers=bearer(f"{head}.{body}.{flipped}"))
        assert_json_error(r, 401, "token_bad_signature")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["roles"] = ["listen", "admin"]
        raised = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        r = client.get("/v1/me", headers=bearer(f"{head}.{raised}.{sig}"))
        assert_json_error(r, 401, "token_bad_signature")


def test_a_token_naming_a_key_of_another_type_is_refused(
    world: World, issuer: Issuer, client
) -> None:
    """An ES256 header pointing at the RSA key: the key decides, not the header."""
    token = issuer.token(world.tenants["a"], "ec-1", header_kid="rsa-1")
    assert_json_error(client.get("/v1/me", headers=bearer(token)), 401, "token_algorithm_refused")


@pytest.mark.parametrize("value", ["not-a-jwt", "a.b.c", "x" * 20000, "", "e30.e30.e30"])
def test_garbage_bearer_values_are_refused(client, value: str) -> None:
    r = client.get("/v1/me", headers={"Authorization": f"Bearer {value}"})
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] in ("invalid_token", "token_algorithm_refused")


def test_a_token_cannot_act_for_another_user(world: World, issuer: Issuer, client) -> None:
    token = issuer.token(world.tenants["a"])
    r = client.get("/v1/me", headers=bearer(token, **{"X-On-Behalf-Of": "ceo@example.com"}))
    assert_json_error(r, 403, "on_behalf_refused")


def test_a_key_embedded_in_the_token_header_is_never_used(
    world: World, issuer: Issuer, client
) -> None:
    """An attacker's own key in ``jwk``/``jku`` headers: the configured key set decides."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.algorithms.RSAAlgorithm.to_jwk(mine.public_key(), as_dict=True)
    headers = {"kid": "rsa-1", "jwk": public, "jku": "http://127.0.0.1:1/evil.json"}
    forged = jwt.encode(issuer.claims(world.tenants["a"]), mine, "RS256", headers=headers)
    assert_json_error(client.get("/v1/me", headers=bearer(forged)), 401, "token_bad_signature")


def test_other_authorization_schemes_are_refused(client) -> None:
    r = client.get("/v1/me", headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
    assert_json_error(r, 401, "unsupported_authorization")


def test_bearer_tokens_are_refused_when_not_configured(world: World, issuer: Issuer) -> None:
    client = create_app(world.services).test_client()
    token = issuer.token(world.tenants["a"])
    r = client.get("/v1/me", headers=bearer(token))
    assert_json_error(r, 401, "bearer_not_configured")
    assert "Bearer" not in r.headers["WWW-Authenticate"]


# --- tenants and roles ---


def test_a_token_for_another_tenant_gets_404_as_today(world: World, issuer: Issuer, client) -> None:
    rec = world.recordings["a1"]
    token = issuer.token(world.tenants["b"], sub="spy@platform.example")
    r = client.get(f"/v1/recordings/{rec.id}", headers=bearer(token))
    body = assert_json_error(r, 404, "not_found")
    unknown = client.get(f"/v1/recordings/{uuid.uuid4()}", headers=bearer(token))
    assert unknown.get_json()["error"]["code"] == body["error"]["code"]
    owner_rows = world.services.db.audit_rows(recording_id=rec.id, action="metadata")
    refused = [r for r in owner_rows if r["error_message"] == "cross_tenant_refused"][-1]
    assert refused["user_id"] == "spy@platform.example"
    assert refused["details"]["issuer"] == ISSUER
    listing = client.get("/v1/recordings", headers=bearer(token)).get_json()["recordings"]
    assert {x["id"] for x in listing} == {world.recordings["b1"].id}


@pytest.mark.parametrize("roles", [["ingest"], [], None, "download admin"])
def test_a_token_without_the_role_gets_403(world: World, issuer: Issuer, client, roles) -> None:
    rec = world.recordings["a1"]
    token = issuer.token(world.tenants["a"], roles=roles, sub="nolisten@platform.example")
    r = client.get(f"/v1/recordings/{rec.id}/stream", headers=bearer(token))
    assert_json_error(r, 403, "forbidden_role")
    row = [
        r
        for r in world.services.db.audit_rows(action="auth")
        if r["user_id"] == "nolisten@platform.example"
    ][-1]
    assert row["error_message"] == "forbidden_role" and row["details"]["issuer"] == ISSUER


def test_roles_may_come_from_a_nested_claim(
    world: World, issuer: Issuer, token_services: pipeline.Services, jwks_server: JwksServer
) -> None:
    config = with_overrides(
        token_services.config,
        auth=auth_section(jwks_server.url, roles_claim="realm_access.roles", tenant_claim="org"),
    )
    services = pipeline.Services(config)
    try:
        client = create_app(services).test_client()
        token = issuer.token(
            "ignored", org=world.tenants["a"], realm_access={"roles": ["download"]}, roles=None
        )
        me = client.get("/v1/me", headers=bearer(token)).get_json()
        assert me["roles"] == ["download"] and me["tenant"] == world.tenants["a"]
    finally:
        services.close()


# --- the key set: rotation, refetch rate, hostile servers ---


def test_an_unknown_kid_refetches_once_then_refuses_and_a_rotated_key_is_found(
    world: World, issuer: Issuer, token_services: pipeline.Services, jwks_server: JwksServer
) -> None:
    jwks_server.mode, jwks_server.kids = "ok", ["rsa-1"]
    client = create_app(token_services).test_client()
    assert client.get("/v1/me", headers=bearer(issuer.token(world.tenants["a"]))).status_code == 200
    time.sleep(MIN_REFRESH + 0.1)
    issuer.add("rsa-2", "RS256")
    before = jwks_server.requests
    stranger = issuer.token(world.tenants["a"], "rsa-2", header_kid="rsa-unknown")
    assert_json_error(client.get("/v1/me", headers=bearer(stranger)), 401, "unknown_key")
    assert jwks_server.requests == before + 1
    # Within jwks_min_refresh, more unknown kids cost no fetch at all.
    for _ in range(20):
        assert client.get("/v1/me", headers=bearer(stranger)).status_code == 401
    assert jwks_server.requests == before + 1
    # The provider rotates: the new key is published and found on the next refetch.
    jwks_server.kids = ["rsa-1", "rsa-2"]
    rotated = issuer.token(world.tenants["a"], "rsa-2")
    time.sleep(MIN_REFRESH + 0.1)
    assert client.get("/v1/me", headers=bearer(rotated)).status_code == 200
    assert jwks_server.requests == before + 2


def _keyset(url: str, timeout: float = 1.0, max_bytes: int = 262144) -> KeySet:
    config = with_overrides(
        pipeline_config(),
        auth=auth_section(url, jwks_timeout=timeout, jwks_max_bytes=max_bytes),
    ).auth
    return KeySet(config)


@pytest.mark.parametrize("mode", ["slow", "drip_headers", "hang"])
def test_a_slow_key_server_is_cut_off_at_the_timeout(jwks_server: JwksServer, mode: str) -> None:
    jwks_server.mode = mode
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match="within"):
            fetch_bounded(jwks_server.url, timeout=1.0, max_bytes=262144)
        assert time.monotonic() - started < 6.0
        keys = _keyset(jwks_server.url)
        started = time.monotonic()
        with pytest.raises(KeySetUnavailable):
            keys.key("rsa-1")
        assert time.monotonic() - started < 6.0
    finally:
        jwks_server.mode = "ok"


def test_a_huge_or_garbage_key_set_is_refused_and_the_last_good_keys_kept(
    world: World, issuer: Issuer, jwks_server: JwksServer, token_services: pipeline.Services
) -> None:
    jwks_server.mode = "huge"
    started = time.monotonic()
    with pytest.raises(OSError, match="exceeds"):
        fetch_bounded(jwks_server.url, timeout=5.0, max_bytes=65536)
    assert time.monotonic() - started < 3.0
    jwks_server.mode = "garbage"
    with pytest.raises(KeySetUnavailable):
        _keyset(jwks_server.url).key("rsa-1")
    # With no keys at all a token request answers 503, never 200 or a crash.
    client = create_app(token_services).test_client()
    r = client.get("/v1/me", headers=bearer(issuer.token(world.tenants["a"])))
    assert_json_error(r, 503, "identity_provider_unavailable")
    # Good keys first; then the server breaks: the cached keys still verify.
    jwks_server.mode, jwks_server.kids = "ok", ["rsa-1", "ec-1", "ed-1"]
    keys = _keyset(jwks_server.url)
    assert keys.key("rsa-1").kty == "RSA"
    jwks_server.mode = "garbage"
    keys._tried_at = -1e9  # let the next unknown kid refetch at once
    with pytest.raises(Exception, match="signing key"):
        keys.key("nope")
    assert keys.key("ec-1").kty == "EC"
    jwks_server.mode = "ok"


def test_the_key_set_skips_private_symmetric_and_broken_keys(issuer: Issuer) -> None:
    from fsrecrypt.web.tokens import parse_jwks

    good = issuer.jwk("ec-1")
    doc = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**issuer.jwk("rsa-1"), "d": "AQAB"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {**issuer.jwk("ed-1"), "use": "enc"},
            "not an object",
            good,
        ]
    }
    assert list(parse_jwks(json.dumps(doc).encode())) == ["ec-1"]
    for bad in (b"[]", b'{"keys": 1}', b'{"keys": []}', b"[" * 100000):
        with pytest.raises((ValueError, RecursionError)):
            parse_jwks(bad)


def test_a_jwks_file_serves_as_the_key_set(
    world: World, issuer: Issuer, token_services: pipeline.Services, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks(["ed-1"])))
    settings = {**auth_section(""), "jwks_file": str(path)}
    services = pipeline.Services(with_overrides(token_services.config, auth=settings))
    try:
        assert AuthConfig(**settings).enabled
        client = create_app(services).test_client()
        r = client.get("/v1/me", headers=bearer(issuer.token(world.tenants["a"], "ed-1")))
        assert r.status_code == 200
        # A token without kid is accepted only because the set holds exactly one key.
        r = client.get(
            "/v1/me", headers=bearer(issuer.token(world.tenants["a"], "ed-1", header_kid=None))
        )
        assert r.status_code == 200
    finally:
        services.close()
