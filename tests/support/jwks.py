"""A platform identity provider for tests: signing keys, tokens, and a JWKS over local HTTP.

``Issuer`` generates an RSA (RS256), an EC P-256 (ES256) and an Ed25519
(EdDSA) key and signs real tokens with PyJWT. ``JwksServer`` serves its
public keys from a thread on a free loopback port and can misbehave on
request (``mode``): ``slow`` drips the body one byte per 0.2 s, ``drip_headers``
drips the status line and headers, ``huge`` sends an endless body without a
length, ``garbage`` sends bytes that are not JSON, ``hang`` accepts and says
nothing. ``requests`` counts the GETs it answered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://idp.example.test/"
AUDIENCE = "fsrecrypt-playback"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Issuer:
    """Signing keys (by kid) and a token factory with sensible defaults."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {}
        self.algs: dict[str, str] = {}
        self.add("rsa-1", "RS256")
        self.add("ec-1", "ES256")
        self.add("ed-1", "EdDSA")

    def add(self, kid: str, alg: str) -> None:
        if alg == "RS256":
            key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = ed25519.Ed25519PrivateKey.generate()
        self.private[kid] = key
        self.algs[kid] = alg

    def jwk(self, kid: str) -> dict[str, Any]:
        public = self.private[kid].public_key()
        alg = self.algs[kid]
        cls = {"RS256": jwt.algorithms.RSAAlgorithm, "ES256": jwt.algorithms.ECAlgorithm}.get(
            alg, jwt.algorithms.OKPAlgorithm
        )
        out = cls.to_jwk(public, as_dict=True)
        out.update({"kid": kid, "use": "sig", "alg": alg})
        return out

    def jwks(self, kids: list[str] | None = None) -> dict[str, Any]:
        return {"keys": [self.jwk(k) for k in (kids or list(self.private))]}

    def public_pem(self, kid: str) -> bytes:
        return (
            self.private[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def claims(self, tenant: str, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "olivia@platform.example",
            "tenant": tenant,
            "roles": ["listen"],
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, tenant: str, kid: str = "rsa-1", *, header_kid: Any = "same", **claims: Any):
        headers = {"kid": kid if header_kid == "same" else header_kid}
        if headers["kid"] is None:
            headers = {}
        return jwt.encode(
            self.claims(tenant, **claims), self.private[kid], self.algs[kid], headers=headers
        )

    @staticmethod
    def unsigned(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None = None):
        """A token built by hand: ``alg: none`` (no signature) or HS256 under ``secret``."""
        head = b64(json.dumps(header).encode())
        body = b64(json.dumps(claims).encode())
        signing_input = f"{head}.{body}".encode()
        if secret is None:
            return f"{head}.{body}."
        return f"{head}.{body}." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())


class JwksServer:
    """The issuer's key set over HTTP on 127.0.0.1, with misbehaviours on demand."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        self.kids: list[str] = list(issuer.private)
        self.mode = "ok"
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests += 1
                server.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def body(self) -> bytes:
        return json.dumps(self.issuer.jwks(self.kids)).encode()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        try:
            if mode == "hang":
                time.sleep(30)
                return
            if mode == "drip_headers":
                for ch in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                    h.wfile.write(bytes([ch]))
                    h.wfile.flush()
                    time.sleep(0.2)
                return
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            if mode == "huge":
                h.end_headers()
                chunk = b'{"keys": [' + b" " * 65536
                for _ in range(2000):
                    h.wfile.write(chunk)
                return
            data = b"\x00\xffnot json at all" * 10 if mode == "garbage" else self.body()
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if mode == "slow":
                for ch in data:
                    h.wfile.write(bytes([ch]))
                    h.wfile.flush()
                    time.sleep(0.2)
                return
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def jwks_server(issuer: Issuer) -> Iterator[JwksServer]:
    server = JwksServer(issuer)
    yield server
    server.close()
