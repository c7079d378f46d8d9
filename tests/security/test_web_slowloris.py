"""A real ``fsrecrypt serve`` against slow and half-open clients, and its log (defects 5, 8).

5: 1,100 connections that sent half a request header kept a legitimate
request out and made the server log "Too many open files". The server is
started here with a soft open-files limit of 1024 (a common default) and
must still answer a legitimate request within 1 s while 2,000 half-open
connections, from one address and from many, are open.
8: a signed playback URL is a bearer credential; the access log must not
hold its signature.
"""

from __future__ import annotations

import http.client
import os
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.serve import serve_process
from tests.web.test_web_app import wav_bytes
from tests.web.test_web_server import ingest, make_setup

HALF_REQUEST = b"GET /v1/openapi.json HTTP/1.1\r\nHost: fsrecrypt\r\nX-Slow: "


def _raise_own_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.fail(f"the test needs {wanted} open files; the hard limit is {hard}")


def _low_soft_limit() -> None:  # runs in the server's process before exec
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


@contextmanager
def serve_low_nofile(config_path: Path, log_path: Path) -> Iterator[tuple[int, int]]:
    """`fsrecrypt serve` started with soft NOFILE 1024; yields (port, pid)."""
    with serve_process(config_path, log_path, preexec_fn=_low_soft_limit) as started:
        yield started


def _get(
    port: int,
    path: str,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0)
    )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _open_half_requests(port: int, sources: list[str], per_source: int) -> list[socket.socket]:
    socks = []
    for source in sources:
        for _ in range(per_source):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((source, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            try:
                s.send(HALF_REQUEST)
            except OSError:
                pass  # already refused or evicted: the server is doing its job
            socks.append(s)
    return socks


def _server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def server(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    _services, cfg, _tenant, _key = make_setup(
        tmp_path, pg_dsn, playback={"header_timeout": 1.5, "idle_timeout": 3.0}
    )
    _services.close()
    log_path = tmp_path / "serve.log"
    with serve_low_nofile(cfg, log_path) as (port, pid):
        yield port, pid, log_path


@pytest.mark.parametrize(
    "sources",
    [["127.0.0.2"], [f"127.0.1.{i}" for i in range(1, 41)]],
    ids=["one-address", "forty-addresses"],
)
def test_legit_request_answered_within_1s_under_2000_half_open(
    server: tuple[int, int, Path], sources: list[str]
) -> None:
    port, pid, log_path = server
    _raise_own_nofile(2000 + 256)
    socks = _open_half_requests(port, sources, 2000 // len(sources))
    try:
        assert len(socks) == 2000
        time.sleep(0.5)  # let the server accept (and shed) them
        for _ in range(3):
            started = time.monotonic()
            status, body = _get(port, "/v1/openapi.json", timeout=5)
            elapsed = time.monotonic() - started
            assert status == 200 and b"openapi" in body
            assert elapsed < 1.0, f"legitimate request took {elapsed:.2f}s"
        # the server holds a bounded number of descriptors, far below the 2,000 attackers
        assert _server_fds(pid) < 1024
    finally:
        for s in socks:
            s.close()
    text = log_path.read_text(errors="replace")
    assert "Too many open files" not in text


def test_half_sent_header_is_closed_after_header_timeout(server: tuple[int, int, Path]) -> None:
    port, _pid, _log = server
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(HALF_REQUEST)
        started = time.monotonic()
        # a slow client trickling bytes does not extend the deadline
        data = b""
        while time.monotonic() - started < 8:
            try:
                s.sendall(b"x")
            except OSError:
                break
            s.settimeout(0.3)
            try:
                data = s.recv(100)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        assert data == b""
        assert time.monotonic() - started < 5
    finally:
        s.close()


def test_access_log_redacts_signed_url_signatures(pg_dsn: str, tmp_path: Path) -> None:
    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn)
    rid = ingest(services, tmp_path, tenant, wav_bytes(0.3))
    services.close()
    log_path = tmp_path / "serve.log"
    with serve_low_nofile(cfg, log_path) as (port, _pid):
        status, body = _get(
            port, f"/v1/recordings/{rid}/playback", timeout=10, headers={"X-API-Key": key}
        )
        assert status == 200
        import json

        url = json.loads(body)["url"]
        sig = url.rsplit("sig=", 1)[1]
        assert _get(port, url, timeout=10)[0] == 200
        # an API key sent in a query string is not logged either
        _get(port, f"/v1/recordings?api_key={key}&Sig={sig}", timeout=10)
        time.sleep(0.3)
    text = log_path.read_text(errors="replace")
    assert f"/v1/recordings/{rid}/stream?" in text  # the line is there...
    assert sig not in text  # ...without its signature
    assert "sig=[redacted]" in text
    assert key not in text and key.split("_")[2] not in text
