"""Native TLS: ``[playback] tls_cert_file``/``tls_key_file`` with a certificate made here.

A real ``fsrecrypt serve`` speaking HTTPS: the API and the stream work over
it, answers carry HSTS, signed URLs are https; old protocols and weak
ciphers are refused at the handshake; a plain-HTTP client or one that never
finishes its handshake is dropped without holding the server.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.serve import serve_process
from tests.web.test_web_app import wav_bytes
from tests.web.test_web_server import ingest, make_setup


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1/localhost, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fsrecrypt test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = Path(tmp_path_factory.mktemp("web-tls"))
    cert, key_file = make_certificate(root)
    services, cfg, tenant, key = make_setup(
        root,
        pg_dsn,
        playback={
            "tls_cert_file": str(cert),
            "tls_key_file": str(key_file),
            "header_timeout": 2.0,
            "metrics_listen": "",
        },
    )
    audio = wav_bytes(1.0, seed=51)
    rid = ingest(services, root, tenant, audio)
    with serve_process(cfg, root / "serve.log", tls=True) as (port, _pid):
        yield {"port": port, "key": key, "cert": cert, "rid": rid, "audio": audio}
    services.close()


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


def https(server: dict, context: ssl.SSLContext | None = None) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        "127.0.0.1", server["port"], timeout=10, context=context or client_context(server["cert"])
    )


def test_api_and_stream_over_tls_with_hsts_and_https_urls(tls_server: dict) -> None:
    conn = https(tls_server)
    conn.request(
        "GET",
        f"/v1/recordings/{tls_server['rid']}/playback",
        headers={"X-API-Key": tls_server["key"], "Host": f"127.0.0.1:{tls_server['port']}"},
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200
    assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
    url = body["url"]
    assert url.startswith(f"https://127.0.0.1:{tls_server['port']}/v1/recordings/")
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    conn.request("GET", url.split(str(tls_server["port"]), 1)[1], headers={"Range": "bytes=0-99"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.read() == tls_server["audio"][:100]
    conn.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
@pytest.mark.parametrize(
    "weaken",
    [
        lambda c: setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_1),
        lambda c: (
            setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_2),
            c.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-SHA:@SECLEVEL=0"),
        ),
    ],
    ids=["tls1.1", "tls1.2-cbc-sha1"],
)
def test_old_protocols_and_weak_ciphers_are_refused(tls_server: dict, weaken) -> None:
    context = client_context(tls_server["cert"])
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    try:
        weaken(context)
    except ssl.SSLError:
        pytest.fail("the client library cannot even offer the weak setting")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        conn = https(tls_server, context)
        conn.request("GET", "/v1/openapi.json")
        conn.getresponse().read()
    # the server still serves a modern client
    conn = https(tls_server)
    conn.request("GET", "/v1/openapi.json")
    assert conn.getresponse().status == 200
    conn.close()


def test_plain_http_and_stalled_handshakes_are_dropped(tls_server: dict) -> None:
    plain = socket.create_connection(("127.0.0.1", tls_server["port"]), timeout=10)
    plain.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        data = plain.recv(4096)
    except ConnectionResetError:
        data = b""
    assert b"openapi" not in data  # no answer in the clear
    plain.close()
    stalled = [socket.create_connection(("127.0.0.1", tls_server["port"]), timeout=10)]
    started = time.monotonic()
    assert stalled[0].recv(1) == b""  # closed by the server at the header deadline (2 s)
    assert time.monotonic() - started < 8
    stalled[0].close()
    conn = https(tls_server)
    conn.request("GET", "/v1/openapi.json")
    assert conn.getresponse().status == 200
    conn.close()


def test_a_key_that_does_not_match_is_a_config_error(tmp_path: Path) -> None:
    from fsrecrypt.errors import ConfigError
    from fsrecrypt.web.tls import server_context

    cert, _key = make_certificate(tmp_path / "one" if (tmp_path / "one").mkdir() else tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _cert2, key2 = make_certificate(other)
    with pytest.raises(ConfigError, match="TLS certificate"):
        server_context(str(cert), str(key2))
