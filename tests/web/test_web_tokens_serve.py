"""Bearer tokens against a real ``fsrecrypt serve`` (gevent): the key set's fetch stalls nobody.

The serve child fetches the token keys over HTTP from the test's JWKS server.
While that server hangs, a token request waits at most ``jwks_timeout`` and
answers 503, and API-key requests sent meanwhile are answered at once: the
fetch blocks one greenlet, never the server. Once the server answers again
(and ``jwks_min_refresh`` has passed), tokens work without a restart.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from tests.support.jwks import AUDIENCE, ISSUER, Issuer, JwksServer
from tests.web.test_web_server import make_setup, serve

TIMEOUT = 3.0


def get(base: str, path: str, headers: dict[str, str], timeout: float = 30) -> tuple[int, dict]:
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_a_hanging_key_server_delays_only_token_requests(
    pg_dsn: str, tmp_path: Path, issuer: Issuer, jwks_server: JwksServer
) -> None:
    jwks_server.mode, jwks_server.kids = "hang", list(issuer.private)
    auth = {
        "jwks_url": jwks_server.url,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_timeout": TIMEOUT,
        "jwks_min_refresh": 1.0,
    }
    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn, auth=auth)
    token = issuer.token(tenant, "rsa-1")
    try:
        with serve(cfg, tmp_path / "serve.log") as base:
            answered: dict[str, object] = {}

            def token_request() -> None:
                started = time.monotonic()
                answered["token"] = get(base, "/v1/me", {"Authorization": f"Bearer {token}"})
                answered["token_s"] = time.monotonic() - started

            waiting = threading.Thread(target=token_request)
            waiting.start()
            time.sleep(0.5)  # the token request is now waiting on the hanging key server
            started = time.monotonic()
            status, body = get(base, "/v1/me", {"X-API-Key": key})
            key_seconds = time.monotonic() - started
            assert status == 200 and body["user"] == "supervisor@example.com"
            assert key_seconds < TIMEOUT / 2, key_seconds
            waiting.join(30)
            status, body = answered["token"]  # type: ignore[misc]
            assert status == 503 and body["error"]["code"] == "identity_provider_unavailable"
            assert answered["token_s"] < TIMEOUT + 3, answered["token_s"]

            jwks_server.mode = "ok"
            time.sleep(1.2)  # jwks_min_refresh
            status, body = get(base, "/v1/me", {"Authorization": f"Bearer {token}"})
            assert status == 200 and body["via"] == "jwt" and body["issuer"] == ISSUER
    finally:
        jwks_server.mode = "ok"
        services.close()
