"""The replay server itself: it must put on the wire exactly what FreeSWITCH would.

If its encoder or framing drifted from the captures, the client tests would
be testing against a fiction; these tests pin it to the captured bytes.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import pytest

from fsrecrypt.daemon.eslparse import parse_event_body
from tests.support.eslserver import (
    FIXTURES_DIR,
    EslReplayServer,
    build_event_frame,
    fs_url_encode,
    load_fixture,
    mask_frames,
    split_frame,
    split_transcript,
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


# --- filter: mod_event_socket's semantics ----------------------------------------------


def _events_after(port: int, commands: bytes, emit: Callable[[], object]) -> list[str]:
    """Subscribe with ``commands``, run ``emit``, return the Event-Names received."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"auth ClueCon\n\n" + commands)
        deadline = time.monotonic() + 5
        data = b""
        expected = commands.count(b"\n\n") + 1
        while data.count(b"Content-Type: command/reply") < expected:
            assert time.monotonic() < deadline, data
            data += sock.recv(65536)
        emit()
        sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
    names = []
    for frame in split_transcript(data[data.index(b"Content-Length") :]):
        if b"text/event-plain" in frame.split(b"\n\n", 1)[0]:
            names.append(parse_event_body(split_frame(frame)[1]).name)
    return names


def _mask_mix(server: EslReplayServer) -> Callable[[], object]:
    frames = mask_frames()

    def emit() -> None:
        for frame in frames:
            server.emit_frame(frame)

    return emit


def test_filter_replies_like_freeswitch(esl_server: EslReplayServer) -> None:
    out = _talk(
        esl_server.port,
        b"auth ClueCon\n\nfilter Event-Name RECORD_STOP\n\nfilter add API-Command-Argument a b\n\n"
        b"filter Event-Name\n\nfilter delete Event-Name RECORD_STOP\n\nfilter delete all\n\n",
    )
    replies = [line for line in out.decode().split("\n") if line.startswith("Reply-Text")]
    assert replies[1:] == [
        "Reply-Text: +OK filter added. [Event-Name]=[RECORD_STOP]",
        "Reply-Text: +OK filter added. [API-Command-Argument]=[a b]",
        "Reply-Text: -ERR invalid syntax",
        "Reply-Text: +OK filter deleted. [Event-Name][RECORD_STOP]",
        "Reply-Text: +OK filter deleted. [all][]",
    ]


def test_no_filter_sends_every_subscribed_event(esl_server: EslReplayServer) -> None:
    names = _events_after(
        esl_server.port, b"event plain API CHANNEL_EXECUTE\n\n", _mask_mix(esl_server)
    )
    assert names.count("API") == 7 and names.count("CHANNEL_EXECUTE") == 13


def test_filters_are_ored_across_and_within_headers(esl_server: EslReplayServer) -> None:
    names = _events_after(
        esl_server.port,
        b"filter Application record_session_mask\n\nfilter application RECORD_SESSION_UNMASK\n\n"
        b"filter API-Command uuid_record\n\nevent plain API CHANNEL_EXECUTE RECORD_STOP\n\n",
        _mask_mix(esl_server),
    )
    # RECORD_STOP is subscribed but matches no filter: not sent. Header names
    # and values compare case-insensitively.
    assert names == ["CHANNEL_EXECUTE", "CHANNEL_EXECUTE", "API", "API", "API", "API"]


def test_filter_regex_and_negative_veto(esl_server: EslReplayServer) -> None:
    names = _events_after(
        esl_server.port,
        b"filter API-Command-Argument /^\\S+ (mask|unmask) /\n\n"
        b"filter Event-Name API\n\nfilter API-Command -uuid_kill\n\nevent plain API\n\n",
        _mask_mix(esl_server),
    )
    # All 7 API events pass "Event-Name API" but uuid_kill is vetoed.
    assert names == ["API"] * 6


def test_api_commands_fire_api_events_through_the_filters(esl_server: EslReplayServer) -> None:
    def run_api() -> None:
        out = _talk(esl_server.port, b"auth ClueCon\n\napi status\n\napi uuid_record x mask y\n\n")
        assert out.count(b"api/response") == 2

    names = _events_after(
        esl_server.port, b"filter API-Command uuid_record\n\nevent plain API\n\n", run_api
    )
    assert names == ["API"]
    sent = esl_server.sent_events()
    assert ["API uuid_record"] in sent
