"""The replay server itself: it must put on the wire exactly what FreeSWITCH would.

If its encoder or framing drifted from the captures, the client tests would
be testing against a fiction; these tests pin it to the captured bytes.
"""

from __future__ import annotations

import socket
import time

import pytest

from fsrecrypt.daemon.eslparse import parse_event_body
from tests.support.eslserver import (
    FIXTURES_DIR,
    EslReplayServer,
    build_event_frame,
    fs_url_encode,
    load_fixture,
    split_frame,
)

pytestmark = pytest.mark.timeout(20)

EVENT_FIXTURES = sorted(
    p.name for p in FIXTURES_DIR.glob("*.esl") if b"text/event-plain" in p.read_bytes()
)


def test_fixtures_are_present() -> None:
    assert len(EVENT_FIXTURES) >= 15
    assert "record_stop.esl" in EVENT_FIXTURES


@pytest.mark.parametrize("name", EVENT_FIXTURES)
def test_reencoding_every_captured_value_reproduces_the_capture(name: str) -> None:
    """Decode every header, encode it again as the server does: byte-identical frame."""
    original = load_fixture(name)
    event = parse_event_body(split_frame(original)[1])
    values = {k: v for k, v in event.headers.items() if k != "Content-Length"}
    assert build_event_frame(name, values, event_body=event.body) == original


def test_encoder_matches_freeswitch_rules() -> None:
    assert fs_url_encode("a b:c/d,e-f.g") == b"a%20b%3Ac/d,e-f.g"
    assert fs_url_encode("{x=1}&park") == b"%7Bx%3D1%7D%26park"
    assert fs_url_encode("100%\n\t") == b"100%25%0A%09"
    assert fs_url_encode("é~") == b"%C3%A9~"


def test_overrides_keep_order_append_new_and_fix_content_length() -> None:
    frame = build_event_frame(
        "record_stop.esl",
        {"Record-File-Path": "/tmp/a b.wav", "New-Header": "v", "Event-Sequence": None},
    )
    envelope, body = split_frame(frame)
    assert [k for k, _ in envelope] == ["Content-Length", "Content-Type"]
    assert int(dict(envelope)["Content-Length"]) == len(body) == len(frame.split(b"\n\n", 1)[1])
    lines = body.split(b"\n")
    assert lines[-5:] == [
        b"Record-File-Path: /tmp/a%20b.wav",
        b"Record-Completion-Cause: success-silence",
        b"New-Header: v",
        b"",
        b"",
    ]
    assert b"Event-Sequence" not in body


def _talk(port: int, data: bytes, wait: float = 0.3) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(data)
        s.settimeout(wait)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def test_handshake_bytes_are_the_captured_ones(esl_server: EslReplayServer) -> None:
    out = _talk(esl_server.port, b"auth ClueCon\n\napi status\n\nexit\n\n")
    greeting = load_fixture("auth_request.esl") + load_fixture("auth_reply.esl")
    assert load_fixture("transcript_main.raw").startswith(greeting + load_fixture("api_status.esl"))
    bye = load_fixture("exit_0_command_reply.esl") + load_fixture(
        "exit_1_text_disconnect-notice.esl"
    )
    assert load_fixture("transcript_exit.raw") == greeting + bye
    assert out == greeting + load_fixture("api_status.esl") + bye


def test_wrong_password_gets_err_and_is_disconnected(esl_server: EslReplayServer) -> None:
    out = _talk(esl_server.port, b"auth nope\n\napi status\n\n", wait=1.0)
    assert out == load_fixture("auth_request.esl") + (
        b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n"
    )
    assert esl_server.commands("api") == []


def test_commands_before_auth_are_refused(esl_server: EslReplayServer) -> None:
    out = _talk(esl_server.port, b"api status\n\n")
    assert out.endswith(b"Reply-Text: -ERR command not found\n\n")


def test_bgapi_replies_then_emits_background_job(esl_server: EslReplayServer) -> None:
    out = _talk(esl_server.port, b"auth ClueCon\n\nevent plain BACKGROUND_JOB\n\nbgapi status\n\n")
    reply_at = out.index(b"Reply-Text: +OK Job-UUID: ")
    job = out[reply_at + 26 : reply_at + 62].decode()
    frame = out[out.index(b"Content-Length", reply_at) :]
    event = parse_event_body(split_frame(frame)[1])
    assert event.name == "BACKGROUND_JOB"
    assert event.get("Job-UUID") == job and event.get("Job-Command") == "status"
    assert event.body is not None and event.body.startswith("UP 0 years")


def test_restart_on_the_same_port() -> None:
    srv = EslReplayServer().start()
    try:
        port = srv.port
        srv.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        srv.start()
        assert srv.port == port
        assert _talk(port, b"").startswith(b"Content-Type: auth/request")
    finally:
        srv.stop()


def test_wait_subscribed_times_out(esl_server: EslReplayServer) -> None:
    t0 = time.monotonic()
    assert esl_server.wait_subscribed(1, timeout=0.2) is False
    assert time.monotonic() - t0 >= 0.2
