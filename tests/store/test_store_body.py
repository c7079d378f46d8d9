"""The S3 GET body reader behind /stream: short bodies fail typed; connections are reused.

A body that ends before its Content-Length must never pass for a complete
object (the frames' tags would catch a cut inside a frame, but not a cut at
a frame boundary before the final frame is even asked for by a range read).
A tiny loopback HTTP server stands in for S3 here because moto cannot be told
to cut a response short; everything else runs through the real boto3 client.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from fsrecrypt.errors import StorageError
from fsrecrypt.pipeline import IterReader
from fsrecrypt.store import S3Store

BODY = bytes(range(256)) * 4096  # 1 MiB


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: list[tuple[str, int]] = []  # client address of each request

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).connections.append(self.client_address)
        short = self.path.split("?")[0].endswith("/short")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("ETag", '"x"')
        self.end_headers()
        if short:
            self.wfile.write(BODY[: len(BODY) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(BODY)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def fake_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    _Handler.connections = []
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _read_all_with_readinto(body: object) -> bytes:
    reader = IterReader(body)  # type: ignore[arg-type]
    out = bytearray()
    buf = bytearray(300_000)
    while n := reader.readinto(buf):
        out += buf[:n]
    return bytes(out)


def test_whole_body_read_into_buffers_and_connection_reused(fake_s3: str) -> None:
    store = S3Store("bucket", endpoint_url=fake_s3, region="us-east-1")
    for _ in range(3):
        assert _read_all_with_readinto(store.get_range("rec/full", 0, None)) == BODY
    assert b"".join(store.get_range("rec/full", 0, None)) == BODY
    ports = {port for _host, port in _Handler.connections}
    assert len(_Handler.connections) == 4
    assert len(ports) == 1, "each finished body should give its connection back to the pool"


@pytest.mark.parametrize("reader", ["readinto", "iterate"])
def test_short_body_is_a_storage_error(fake_s3: str, reader: str) -> None:
    store = S3Store("bucket", endpoint_url=fake_s3, region="us-east-1")
    body = store.get_range("rec/short", 0, None)
    with pytest.raises(StorageError):
        if reader == "readinto":
            _read_all_with_readinto(body)
        else:
            b"".join(body)
