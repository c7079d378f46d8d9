"""``POST /v1/recordings`` against a real ``fsrecrypt serve`` process, like an attacker would.

A real server (gevent's WSGI handler, the deadlines, the socket) because what
matters here is what the Flask test client hides: a body cut short, a client
that stalls or lies about its Content-Length, and whether any plaintext byte
reaches the disk on the way (werkzeug's own form parser would spool it to a
temporary file). After every refused or broken upload the store holds no new
object, no temporary file, and no row claims a stored recording.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fsrecrypt import pipeline
from fsrecrypt.lifecycle.custody import recording_custody
from fsrecrypt.web import create_api_key
from tests.support.serve import serve_process
from tests.web.test_web_app import wav_bytes
from tests.web.test_web_server import make_setup

MAX_UPLOAD = 4 * 1024 * 1024
GAP = 2.0


@dataclass
class Server:
    services: pipeline.Services
    root: Path
    port: int
    pid: int
    key: str
    tenant: str
    tmpdir: Path
    listen_key: str

    def objects(self) -> set[str]:
        store = self.root / "objects"
        return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}

    def rows(self, call_uuid: str) -> list[Any]:
        return self.services.db.recordings(call_uuid=call_uuid)

    def conn(self, timeout: float = 20) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def post(
        self, body: bytes, content_type: str, *, query: str = "", headers: dict | None = None
    ) -> tuple[int, dict[str, str], Any]:
        conn = self.conn()
        try:
            conn.request(
                "POST",
                "/v1/recordings" + query,
                body=body,
                headers={"X-API-Key": self.key, "Content-Type": content_type, **(headers or {})},
            )
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, dict(resp.headers), json.loads(raw) if raw else None
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = Path(tmp_path_factory.mktemp("web-upload"))
    tmpdir = root / "serve-tmp"
    tmpdir.mkdir()
    services, cfg, tenant, key = make_setup(
        root,
        pg_dsn,
        playback={
            "max_upload_bytes": MAX_UPLOAD,
            "idle_timeout": GAP,
            "header_timeout": 5.0,
            "upload_timeout": 30.0,
            "metrics_listen": "",
        },
    )
    # the setup's key may only listen: uploads need a key with the role 'ingest'
    _row, ingest_key = create_api_key(services, tenant, "uploader@example.com", roles=("ingest",))
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)  # where werkzeug/tempfile would spool plaintext
    try:
        with serve_process(cfg, root / "serve.log") as (port, pid):
            yield Server(services, root, port, pid, ingest_key, tenant, tmpdir, key)
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        services.close()


def multipart(
    parts: list[tuple[str, bytes, dict[str, str]]], boundary: str = "fsrBoundary42"
) -> tuple[bytes, str]:
    """A multipart/form-data body written by hand (so tests can also write broken ones)."""
    out = bytearray()
    for name, value, extra in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if "filename" in extra:
            disposition += f'; filename="{extra["filename"]}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        for header, hvalue in extra.items():
            if header != "filename":
                out += f"{header}: {hvalue}\r\n".encode()
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def form(call_uuid: str, audio: bytes, **fields: str) -> tuple[bytes, str]:
    parts = [("call_uuid", call_uuid.encode(), {})]
    parts += [(k, v.encode(), {}) for k, v in fields.items()]
    parts.append(("file", audio, {"filename": "call.wav", "Content-Type": "audio/wav"}))
    return multipart(parts)


def plain(server: Server, rec: Any) -> bytes:
    opened = pipeline.open_recording(server.services, rec)
    return b"".join(pipeline.iter_plaintext(server.services, opened))


def nothing_stored(server: Server, call_uuid: str, before: set[str]) -> None:
    """No stored row, no new object, no temporary file: the upload left nothing."""
    deadline = time.monotonic() + 15
    while True:
        rows = server.rows(call_uuid)
        settled = all(r.status == "discarded" for r in rows)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(r.status == "discarded" for r in rows), [(r.status, r.last_error) for r in rows]
    assert all(r.s3_path is None for r in rows)
    assert server.objects() == before
    assert list(server.tmpdir.iterdir()) == []


def raw_socket(server: Server, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(head)
    return sock


def request_head(server: Server, content_type: str, length: int | None, query: str = "") -> bytes:
    lines = [
        f"POST /v1/recordings{query} HTTP/1.1",
        "Host: 127.0.0.1",
        f"X-API-Key: {server.key}",
        f"Content-Type: {content_type}",
    ]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if length and len(rest) >= length[0]:
                break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


# -- what works -------------------------------------------------------------------------------


def test_multipart_upload_stores_like_the_daemon(server: Server) -> None:
    audio = wav_bytes(3.0, seed=31)
    call = str(uuid.uuid4())
    body, ctype = form(call, audio, consent="announced", metadata='{"agent": "42"}')
    status, headers, doc = server.post(body, ctype)
    assert status == 201, doc
    assert headers["Location"] == f"/v1/recordings/{doc['id']}"
    assert doc["call_uuid"] == call and doc["status"] == "stored"
    assert doc["size_bytes"] == len(audio) and doc["sample_rate"] == 8000
    rec = server.services.db.recording(doc["id"])
    meta = rec.encryption_metadata
    assert meta["origin"] == "upload" and meta["consent"] == "announced"
    assert meta["client_metadata"] == {"agent": "42"} and meta["wav"]["channels"] == 1
    # the object decrypts to the upload, byte for byte
    assert plain(server, rec) == audio
    # the same encrypt audit row as the daemon writes, naming the uploader and its address
    (row,) = server.services.db.audit_rows(recording_id=rec.id, action="encrypt")
    assert row["success"] and row["user_id"] == "uploader@example.com"
    assert str(row["ip_address"]) == "127.0.0.1"
    assert row["details"]["origin"] == "upload" and row["details"]["bytes"] == len(audio)
    # custody: a keyed fingerprint computed while encrypting, and the origin
    custody = recording_custody(server.services, rec.id, user_id="test")
    assert custody["fingerprint"]["value"] and custody["created"]["sweep"] == {"origin": "upload"}
    fingerprint = custody["fingerprint"]["value"]
    from fsrecrypt.pipeline.custody import FingerprintKey

    key = FingerprintKey.from_config(server.services.config, create=False)
    assert key.fingerprint(rec.tenant_id, [audio]) == fingerprint


def test_raw_body_and_chunked_upload(server: Server) -> None:
    audio = wav_bytes(1.0, seed=32)
    call = str(uuid.uuid4())
    status, _h, doc = server.post(audio, "audio/wav", query=f"?call_uuid={call}&consent=yes")
    assert status == 201, doc
    rec = server.services.db.recording(doc["id"])
    assert rec.encryption_metadata["consent"] == "yes"
    assert plain(server, rec) == audio
    # chunked transfer coding (no Content-Length), chunks of odd sizes
    call2 = str(uuid.uuid4())
    sock = raw_socket(server, request_head(server, "audio/x-wav", None, f"?call_uuid={call2}"))
    for i in range(0, len(audio), 7001):
        piece = audio[i : i + 7001]
        sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    sock.sendall(b"0\r\n\r\n")
    status, body = read_answer(sock)
    sock.close()
    assert status == 201, body
    rec2 = server.services.db.recording(json.loads(body)["id"])
    assert plain(server, rec2) == audio


def test_idempotent_retry_returns_the_first_result(server: Server) -> None:
    audio = wav_bytes(1.0, seed=33)
    call = str(uuid.uuid4())
    key = f"retry-{uuid.uuid4()}"
    body, ctype = form(call, audio)
    first = server.post(body, ctype, headers={"Idempotency-Key": key})
    assert first[0] == 201
    before = server.objects()
    again = server.post(body, ctype, headers={"Idempotency-Key": key})
    assert again[0] == 201 and again[2] == first[2]
    assert again[1]["Idempotent-Replayed"] == "true"
    assert [r.id for r in server.rows(call)] == [first[2]["id"]]
    assert server.objects() == before
    # the key is the tenant's: a new key stores a new recording
    other = server.post(body, ctype, headers={"Idempotency-Key": key + "-b"})
    assert other[0] == 201 and other[2]["id"] != first[2]["id"]


def test_a_failed_upload_frees_its_idempotency_key(server: Server) -> None:
    call = str(uuid.uuid4())
    key = f"cut-{uuid.uuid4()}"
    good = wav_bytes(1.0, seed=34)
    cut = good[:-100]  # the header promises 100 bytes more than sent: incomplete WAV
    status, _h, doc = server.post(
        cut, "audio/wav", query=f"?call_uuid={call}", headers={"Idempotency-Key": key}
    )
    assert status == 422 and doc["error"]["code"] == "incomplete_wav"
    status, _h, doc = server.post(
        good, "audio/wav", query=f"?call_uuid={call}", headers={"Idempotency-Key": key}
    )
    assert status == 201
    statuses = sorted(r.status for r in server.rows(call))
    assert statuses == ["discarded", "stored"]


# -- limits ------------------------------------------------------------------------------------


def test_too_large_is_413_before_and_while_reading(server: Server) -> None:
    before = server.objects()
    call = str(uuid.uuid4())
    # announced too large: refused without reading the body
    sock = raw_socket(
        server, request_head(server, "audio/wav", MAX_UPLOAD + 1, f"?call_uuid={call}")
    )
    status, body = read_answer(sock)
    sock.close()
    assert status == 413 and json.loads(body)["error"]["code"] == "upload_too_large"
    # chunked, grows past the limit while streaming: cut at the limit, nothing kept
    audio = wav_bytes(1.0, seed=35)
    sock = raw_socket(server, request_head(server, "audio/wav", None, f"?call_uuid={call}"))
    sock.sendall(f"{len(audio):x}\r\n".encode() + audio + b"\r\n")
    filler = b"\0" * 65536
    sent = len(audio)
    try:
        while sent <= MAX_UPLOAD + 65536:
            sock.sendall(f"{len(filler):x}\r\n".encode() + filler + b"\r\n")
            sent += len(filler)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server may close before the last chunk
    status, body = read_answer(sock)
    sock.close()
    assert status == 413
    nothing_stored(server, call, before)


def test_client_disconnect_mid_body_stores_nothing_and_no_plaintext_touches_disk(
    server: Server,
) -> None:
    before = server.objects()
    call = str(uuid.uuid4())
    marker = os.urandom(16)
    audio = wav_bytes(40.0, seed=36)  # 640 KB: beyond werkzeug's 500 KB in-memory spool
    audio = audio[:2000] + marker * 4 + audio[2064:]
    body, ctype = form(call, audio)
    sock = raw_socket(server, request_head(server, ctype, len(body)))
    sock.sendall(body[: len(body) * 3 // 4])
    # mid-body: the server holds no plaintext file (a spooled temp file shows as an fd)
    time.sleep(0.5)
    fds = []
    for fd in os.listdir(f"/proc/{server.pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{server.pid}/fd/{fd}"))
        except OSError:
            continue
    files = [t for t in fds if t.startswith("/") and not t.startswith(("/dev/", "/proc/"))]
    store = str(server.root / "objects")
    suspicious = [f for f in files if not f.startswith(store) and not f.endswith(".log")]
    assert not suspicious, suspicious
    assert list(server.tmpdir.iterdir()) == []
    sock.close()  # disconnect mid-body
    nothing_stored(server, call, before)
    for path in (server.root / "objects").rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes()


def test_stalled_and_lying_bodies_hit_the_deadline(server: Server) -> None:
    before = server.objects()
    call = str(uuid.uuid4())
    audio = wav_bytes(1.0, seed=37)
    # Content-Length larger than what is sent, connection kept open: the gap deadline
    sock = raw_socket(
        server, request_head(server, "audio/wav", len(audio) + 1000, f"?call_uuid={call}")
    )
    sock.sendall(audio)
    started = time.monotonic()
    status, body = read_answer(sock)
    waited = time.monotonic() - started
    sock.close()
    assert status == 400 and json.loads(body)["error"]["code"] == "upload_incomplete"
    assert GAP * 0.8 <= waited <= GAP + 15
    # a multipart upload that stops sending half way (slowloris on the body)
    body_bytes, ctype = form(call, audio)
    sock = raw_socket(server, request_head(server, ctype, len(body_bytes)))
    for i in range(0, len(body_bytes) // 2, 5000):
        sock.sendall(body_bytes[i : i + 5000])
        time.sleep(0.2)
    status, _ = read_answer(sock)
    sock.close()
    assert status == 400
    # Content-Length smaller than the body: only that many bytes are the upload, and a WAV
    # whose header promises more is refused (the rest is never taken as a next request)
    sock = raw_socket(
        server, request_head(server, "audio/wav", len(audio) // 2, f"?call_uuid={call}")
    )
    sock.sendall(audio + b"GET /v1/me HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = read_answer(sock)
    assert status == 422
    assert sock.recv(65536) == b""  # closed: the trailing bytes were not served
    sock.close()
    nothing_stored(server, call, before)


# -- hostile forms and content -----------------------------------------------------------------


def test_hostile_multipart(server: Server) -> None:
    before = server.objects()
    call = str(uuid.uuid4())
    audio = wav_bytes(0.5, seed=38)
    huge_header = [("call_uuid", call.encode(), {"X-Pad": "a" * 20000})]
    body, ctype = multipart([*huge_header, ("file", audio, {"filename": "a.wav"})])
    status, _h, doc = server.post(body, ctype)
    assert status == 431 and doc["error"]["code"] == "part_headers_too_large"
    many = [("consent", b"x", {}) for _ in range(50)]
    body, ctype = multipart([*many, ("file", audio, {"filename": "a.wav"})])
    status, _h, doc = server.post(body, ctype)
    assert status == 400 and doc["error"]["code"] in ("too_many_parts", "duplicate_field")
    body, ctype = multipart([("call_uuid", call.encode(), {}), ("zz", b"1", {})])
    assert server.post(body, ctype)[2]["error"]["code"] == "unexpected_part"
    # fields after the file
    body, ctype = multipart(
        [("file", audio, {"filename": "a.wav"}), ("call_uuid", call.encode(), {})]
    )
    status, _h, doc = server.post(body, ctype)
    assert status == 400 and doc["error"]["code"] == "missing_call_uuid"
    body, ctype = multipart(
        [
            ("call_uuid", call.encode(), {}),
            ("file", audio, {"filename": "a.wav"}),
            ("consent", b"late", {}),
        ]
    )
    status, _h, doc = server.post(body, ctype)
    assert status == 400 and doc["error"]["code"] == "fields_after_file"
    # no closing boundary: cut form
    body, ctype = form(call, audio)
    status, _h, doc = server.post(body[:-30], ctype)
    assert status == 400 and doc["error"]["code"] in ("upload_incomplete", "malformed_form")
    # a broken boundary parameter
    status, _h, doc = server.post(body, "multipart/form-data; boundary=" + "b" * 200)
    assert status == 400 and doc["error"]["code"] == "malformed_form"
    # undecodable part headers
    status, _h, doc = server.post(
        b'--B\r\nContent-Disposition: form-data; name="\xff\xfe"\r\n\r\nx\r\n--B--\r\n',
        "multipart/form-data; boundary=B",
    )
    assert status == 400
    nothing_stored(server, call, before)


def test_non_audio_is_refused(server: Server) -> None:
    before = server.objects()
    call = str(uuid.uuid4())
    audio = wav_bytes(0.5, seed=39)
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    q = f"?call_uuid={call}"
    for body, ctype in (
        (audio, "text/plain"),
        (audio, "application/json"),
        (audio, ""),
        (png, "audio/wav"),  # declared audio, is not
        (b"ID3" + os.urandom(500), "audio/wav"),  # audio, not the declared kind
        (b"<html><script>alert(1)</script></html>", "audio/mpeg"),
    ):
        status, _h, doc = server.post(body, ctype, query=q)
        assert status == 415, (ctype, status, doc)
        assert doc["error"]["code"] == "unsupported_media_type"
    for part_type in ("text/html", "image/png"):
        parts = [
            ("call_uuid", call.encode(), {}),
            ("file", audio, {"filename": "a.wav", "Content-Type": part_type}),
        ]
        body, ctype = multipart(parts)
        assert server.post(body, ctype)[0] == 415
    # octet-stream is taken when the bytes are audio, refused when not
    body, ctype = multipart(
        [
            ("call_uuid", call.encode(), {}),
            ("file", png, {"filename": "a.bin", "Content-Type": "application/octet-stream"}),
        ]
    )
    assert server.post(body, ctype)[0] == 415
    nothing_stored(server, call, before)


@pytest.mark.parametrize(
    "call_uuid",
    [
        "../../etc/passwd",
        "a/b",
        "..",
        "abc\x00def",
        "\u0663\u0664\u0665",  # Arabic-Indic digits: isdigit(), not ASCII
        "\uff11\uff12",  # full-width digits
        "abc\u202edef",  # right-to-left override
        "a" * 129,
        " leading-space",
        "a\r\nX-Injected: 1",
    ],
)
def test_call_uuid_injection_is_refused(server: Server, call_uuid: str) -> None:
    before = server.objects()
    audio = wav_bytes(0.5, seed=40)
    body, ctype = multipart(
        [("call_uuid", call_uuid.encode("utf-8"), {}), ("file", audio, {"filename": "../x.wav"})]
    )
    status, _h, doc = server.post(body, ctype)
    assert status == 400 and doc["error"]["code"] in ("invalid_call_uuid", "field_too_large"), doc
    assert server.objects() == before
    assert not server.rows(call_uuid.replace("\x00", ""))


def test_upload_needs_a_key_with_the_ingest_role(server: Server) -> None:
    audio = wav_bytes(0.5, seed=41)
    call = str(uuid.uuid4())
    body, ctype = form(call, audio)
    for headers, status, code in (
        ({}, 401, "auth_required"),
        ({"X-API-Key": server.listen_key}, 403, "forbidden_role"),
    ):
        conn = server.conn()
        conn.request(
            "POST", "/v1/recordings", body=body, headers={"Content-Type": ctype, **headers}
        )
        resp = conn.getresponse()
        assert resp.status == status
        assert json.loads(resp.read())["error"]["code"] == code
        assert resp.headers["Connection"] == "close"  # the body is not read
        conn.close()
    assert not server.rows(call)
    # a refused client announcing a huge body and sending none is answered at once
    sock = raw_socket(
        server,
        request_head(server, "audio/wav", 10**12, f"?call_uuid={call}").replace(
            server.key.encode(), server.listen_key.encode()
        ),
    )
    started = time.monotonic()
    status, _body = read_answer(sock)
    assert status == 403 and time.monotonic() - started < GAP
    # and the server closes at once instead of reading (and waiting for) the terabyte
    sock.settimeout(GAP)
    assert sock.recv(1) == b""
    sock.close()


def test_the_whole_upload_has_a_deadline_even_when_bytes_keep_coming() -> None:
    """A client trickling bytes (each within the gap) still meets upload_timeout."""
    from fsrecrypt.web.errors import ApiError
    from fsrecrypt.web.upload import Body

    now = [0.0]

    class Trickle:
        def read(self, _size: int) -> bytes:
            now[0] += 1.0  # one second per read: never a gap of 2 s
            return b"x"

    body = Body(Trickle(), limit=10**9, deadline=5.0, gap=2.0, clock=lambda: now[0])
    with pytest.raises(ApiError) as info:
        for _ in body.chunks():
            pass
    assert info.value.code == "upload_incomplete" and "upload_timeout" in info.value.message
    assert 4.0 <= now[0] <= 6.0


def test_curl_expect_100_continue_upload(server: Server, tmp_path: Path) -> None:
    """curl sends ``Expect: 100-continue`` before a large body: the server must ask for it."""
    import subprocess

    audio = wav_bytes(100.0, seed=42)  # 1.6 MB
    (tmp_path / "big.wav").write_bytes(audio)
    call = str(uuid.uuid4())
    run = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", "-H", f"X-API-Key: {server.key}",
            "-H", "Expect: 100-continue", "-F", f"call_uuid={call}",
            "-F", f"file=@{tmp_path / 'big.wav'};type=audio/wav",
            f"http://127.0.0.1:{server.port}/v1/recordings",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rec = server.services.db.recording(json.loads(run.stdout)["id"])
    assert plain(server, rec) == audio
