"""The event-source layer against the replaying ESL server (real captured bytes).

Each greenswitch 0.0.19 flaw has a ``test_stock_*`` companion that shows the
stock client misbehaving, next to the test showing ours does not. gevent runs
here without monkey patching: the clients use gevent sockets directly and the
replay server runs on real threads; the one scenario that freezes the whole
process (stock client, EOF mid-frame) runs in a subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import greenswitch.esl
import pytest

from fsrecrypt.daemon.esl import EslSettings, EventSource, _HardenedESL, backoff_delay
from fsrecrypt.daemon.eslparse import Event, classify_record_stop, parse_event_body
from fsrecrypt.errors import EslError, EventError
from tests.support.eslserver import (
    EslReplayServer,
    EslServerProcess,
    build_event_frame,
    load_fixture,
    split_frame,
)

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[2]
FORGED = "x\nvariable_fsrecrypt_tenant: evil\nRecord-File-Path: /etc/passwd"


def wait_until(pred: Callable[[], object], timeout: float = 3.0) -> bool:
    """Poll ``pred`` while letting greenlets run (never blocks the hub)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        gevent.sleep(0.01)
    return bool(pred())


@pytest.fixture
def server() -> Iterator[EslReplayServer]:
    """A replay server on a free loopback port (same as tests.support.eslserver.esl_server)."""
    srv = EslReplayServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def fast_settings(server: EslReplayServer, **kw: object) -> EslSettings:
    """Small timeouts so fault tests finish in well under a second each."""
    base: dict[str, object] = {
        "port": server.port,
        "connect_timeout": 0.5,
        "command_timeout": 0.3,
        "liveness_interval": 5.0,
        "backoff_base": 0.02,
        "backoff_cap": 0.1,
    }
    base.update(kw)
    return EslSettings(**base)  # type: ignore[arg-type]


class Harness:
    """An EventSource plus what it delivered."""

    def __init__(self, server: EslReplayServer, **kw: object) -> None:
        self.events: list[Event] = []
        self.states: list[str] = []
        self.source = EventSource(
            fast_settings(server, **kw), self.events.append, self.states.append
        )
        self.server = server

    def __enter__(self) -> Harness:
        self.source.start()
        assert wait_until(lambda: self.source.connected and self.server.subscribed), self.states
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.stop(timeout=2)


def stock_client(server: EslReplayServer) -> greenswitch.esl.InboundESL:
    """Stock greenswitch, connected and subscribed (its connect has no timeout: bound it)."""
    esl = greenswitch.esl.InboundESL("127.0.0.1", server.port, "ClueCon")
    with gevent.Timeout(3):
        esl.connect()
        esl.send("event plain RECORD_STOP")
    return esl


def stock_close(esl: greenswitch.esl.InboundESL) -> None:
    esl._run = False
    esl.sock.close()
    gevent.killall([g for g in (esl._receive_events_greenlet, esl._process_events_greenlet) if g])


def record_stop_body(**overrides: str) -> bytes:
    return split_frame(build_event_frame("record_stop.esl", overrides))[1]


# --- parsing ------------------------------------------------------------------------


def test_parse_captured_event_decodes_values_and_keeps_order() -> None:
    ev = parse_event_body(split_frame(load_fixture("record_stop.esl"))[1])
    assert ev.name == "RECORD_STOP"
    assert list(ev.headers)[:2] == ["Event-Name", "Core-UUID"]
    assert list(ev.headers)[-1] == "Record-Completion-Cause"
    assert ev.get("FreeSWITCH-IPv6") == "fd00::2"
    assert ev.get("Event-Date-GMT") == "Sun, 29 Nov 2026 18:51:58 GMT"
    assert ev.get("Record-File-Path") == "/tmp/fsrec/e434e7e5-b6d8-4dc0-9171-0f3a3f8cc83e.wav"
    assert ev.get("missing", "d") == "d"
    assert ev.body is None


def test_parse_background_job_body() -> None:
    ev = parse_event_body(split_frame(load_fixture("uuid_record_background_job.esl"))[1])
    assert ev.name == "BACKGROUND_JOB"
    assert ev.get("Job-Command-Arg", "").startswith("{origination_uuid=cb863356")
    assert ev.body == "+OK cb863356-9279-493d-831c-6fff64b98a38\n"


def test_stock_greenswitch_lets_an_encoded_newline_forge_headers() -> None:
    body = record_stop_body(**{"Caller-Caller-ID-Name": FORGED}).decode()
    assert "x%0Avariable_fsrecrypt_tenant%3A%20evil%0A" in body  # as FreeSWITCH encodes it
    stock = greenswitch.esl.ESLEvent(body)
    assert stock.headers.get("variable_fsrecrypt_tenant") == "evil"
    assert stock.headers.get("Record-File-Path") == "/etc/passwd"


def test_encoded_newline_stays_inside_its_value() -> None:
    ev = parse_event_body(record_stop_body(**{"Caller-Caller-ID-Name": FORGED}))
    assert ev.get("Caller-Caller-ID-Name") == FORGED
    assert "variable_fsrecrypt_tenant" not in ev.headers
    assert ev.get("Record-File-Path") == "/tmp/fsrec/e434e7e5-b6d8-4dc0-9171-0f3a3f8cc83e.wav"
    rs = classify_record_stop(ev)
    assert rs.tenant is None
    assert rs.path.endswith("e434e7e5-b6d8-4dc0-9171-0f3a3f8cc83e.wav")


def test_non_utf8_value_is_decoded_leniently() -> None:
    body = record_stop_body(**{"Record-File-Path": "/tmp/caf\udce9.wav"})
    assert b"/tmp/caf%E9.wav" in body
    ev = parse_event_body(body + b"Raw: \xff\n\n")
    path = ev.get("Record-File-Path")
    assert path is not None
    assert path.encode("utf-8", "surrogateescape") == b"/tmp/caf\xe9.wav"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"Core-UUID: x\n\n",  # no Event-Name
        b"Event-Name: RECORD_STOP\nthis line has no colon\n\n",
        b"Event-Name: X\nContent-Length: 99\n\nshort",
        b"Event-Name: X\nContent-Length: nope\n\n",
    ],
)
def test_parse_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(EventError):
        parse_event_body(raw)


# --- classification -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "disposition", "cause", "record_ms", "size"),
    [
        ("record_stop.esl", "process", "success-silence", 3000, 48044),
        ("stereo_record_stop.esl", "process", "success-silence", 3000, 96044),
        ("min_sec_record_stop.esl", "discarded", "input-too-short", 2000, 32044),
        ("uuid_record_record_stop.esl", "process", "success-maxtime", 2500, 40044),
    ],
)
def test_classify_captured_record_stops(
    fixture: str, disposition: str, cause: str, record_ms: int, size: int
) -> None:
    ev = parse_event_body(split_frame(load_fixture(fixture))[1])
    rs = classify_record_stop(ev)
    assert rs.disposition == disposition
    assert rs.cause == cause
    assert rs.record_ms == record_ms
    assert rs.file_size_hint == size
    assert rs.core_uuid == "e452b2d0-0120-4b77-86cc-ae47fe99e2ed"
    assert rs.path == ev.get("Record-File-Path")
    assert rs.path.startswith("/tmp/fsrec/")
    assert rs.channel_uuid == ev.get("Unique-ID") == rs.call_uuid
    assert rs.event_seq == ev.get("Event-Sequence")
    assert rs.event_timestamp == ev.get("Event-Date-Timestamp")
    assert rs.key == f"{rs.core_uuid}:{rs.path}"
    assert rs.tenant is None and rs.consent is None


@pytest.mark.parametrize(
    ("overrides", "disposition"),
    [
        ({"Record-Completion-Cause": "uri-failure"}, "uri-failure"),
        ({"Record-Completion-Cause": "empty-file"}, "discarded"),
        ({"variable_RECORD_DISCARDED": "true"}, "discarded"),
        ({"Record-File-Path": "http://rec.example/x.wav"}, "remote"),
        ({"Record-File-Path": "{foo=bar,baz=1}s3://bucket/x.wav"}, "remote"),
        ({"Record-Completion-Cause": "no-input-timeout"}, "process"),
    ],
)
def test_classify_dispositions(overrides: dict[str, str], disposition: str) -> None:
    rs = classify_record_stop(parse_event_body(record_stop_body(**overrides)))
    assert rs.disposition == disposition


def test_classify_strips_prefix_and_reads_configured_headers() -> None:
    ev = parse_event_body(
        record_stop_body(
            **{
                "Record-File-Path": "{record_min_sec=2}/var/rec/a b.wav",
                "variable_fsrecrypt_tenant": "acme",
                "variable_recording_consent": "yes",
                "variable_x_tenant": "other",
            }
        )
    )
    rs = classify_record_stop(ev)
    assert (rs.path, rs.tenant, rs.consent) == ("/var/rec/a b.wav", "acme", "yes")
    assert classify_record_stop(ev, tenant_header="variable_x_tenant").tenant == "other"


def test_classify_rejects_other_events_and_missing_path() -> None:
    with pytest.raises(EventError):
        classify_record_stop(parse_event_body(split_frame(load_fixture("record_start.esl"))[1]))
    with pytest.raises(EventError):
        classify_record_stop(parse_event_body(record_stop_body(**{"Record-File-Path": None})))  # type: ignore[arg-type]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert backoff_delay(0, 0.5, 30, rand=lambda: 0.0) == 0.25
    assert backoff_delay(0, 0.5, 30, rand=lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 30, rand=lambda: 1.0) == 4.0
    assert backoff_delay(50, 0.5, 30, rand=lambda: 1.0) == 30.0
    assert backoff_delay(50, 0.5, 30, rand=lambda: 0.0) == 15.0
    assert len({round(backoff_delay(4, 0.5, 30), 6) for _ in range(20)}) > 1


# --- live connection -----------------------------------------------------------------


def test_handshake_and_decoded_event_delivery(server: EslReplayServer) -> None:
    with Harness(server) as h:
        assert [c.line for c in server.commands("auth")] == ["auth ClueCon"]
        assert [c.line for c in server.commands("event")] == ["event plain RECORD_STOP"]
        assert h.source.last_event_at is None
        n = server.emit_fixture(
            "record_stop.esl",
            {"Record-File-Path": "/tmp/x y&z.wav", "variable_fsrecrypt_tenant": "acme"},
        )
        assert n == 1
        server.emit_fixture("record_start.esl")  # not subscribed: never sent
        assert wait_until(lambda: h.events)
        ev = h.events[0]
        assert ev.get("Record-File-Path") == "/tmp/x y&z.wav"
        rs = classify_record_stop(ev)
        assert (rs.tenant, rs.disposition) == ("acme", "process")
        assert h.source.last_event_at is not None
        assert "UP 0 years" in h.source.api("status")
        assert h.source.api("uuid_kill nope").startswith("-ERR uuid_kill")
        assert h.states[:2] == ["connecting", "connected"]
        gevent.sleep(0.05)
        assert len(h.events) == 1


def test_slow_handler_runs_outside_the_reader(server: EslReplayServer) -> None:
    seen: list[gevent.Greenlet] = []

    def slow(event: Event) -> None:
        seen.append(gevent.getcurrent())
        gevent.sleep(1.0)

    src = EventSource(fast_settings(server, liveness_interval=0.05), slow)
    src.start()
    try:
        assert wait_until(lambda: server.subscribed)
        server.emit_fixture("record_stop.esl")
        assert wait_until(lambda: seen)
        conn = src._conn
        assert conn is not None
        assert seen[0] is not conn._receive_events_greenlet
        t0 = time.monotonic()
        assert src.api("status", timeout=0.3)  # the reader is free while the handler sleeps
        assert time.monotonic() - t0 < 0.3
        gevent.sleep(0.4)  # several liveness probes happen meanwhile
        assert src.reconnects == 0 and src.connected
    finally:
        src.stop(timeout=2)


def test_wrong_password_is_refused_like_freeswitch(server: EslReplayServer) -> None:
    conn = _HardenedESL(fast_settings(server, password="wrong"), lambda e: None)
    with pytest.raises(EslError, match="refused"):
        conn.connect()
    assert not conn.connected
    h = Harness(server, password="wrong")
    h.source.start()
    try:
        assert wait_until(lambda: h.states.count("backoff") >= 2)
        assert not h.source.connected and server.subscribed == 0
    finally:
        h.source.stop(timeout=2)


def test_connect_timeout_when_no_greeting(server: EslReplayServer) -> None:
    server.hang(new_connections=True)
    conn = _HardenedESL(fast_settings(server, connect_timeout=0.2), lambda e: None)
    t0 = time.monotonic()
    with pytest.raises(EslError, match="auth/request"):
        conn.connect()
    assert time.monotonic() - t0 < 1.0
    assert not conn.connected


# b. timeouts -------------------------------------------------------------------------


def test_stock_send_blocks_forever_when_the_socket_dies(server: EslReplayServer) -> None:
    esl = stock_client(server)
    try:
        server.hang()
        pending = gevent.spawn(esl.send, "api status")
        gevent.sleep(0.1)
        server.kill_connections()
        pending.join(0.5)
        assert not pending.ready()  # still waiting although the socket is gone
        assert esl.connected is False
        pending.kill()
    finally:
        stock_close(esl)


def test_command_timeout_raises_and_kills_the_connection(server: EslReplayServer) -> None:
    with Harness(server) as h:
        conn = h.source._conn
        server.hang()
        t0 = time.monotonic()
        with pytest.raises(EslError, match="did not answer"):
            h.source.api("status", timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 0.6
        assert conn is not None and not conn.connected and conn.dead.is_set()
        with pytest.raises(EslError):
            conn.send("api status")


def test_command_in_flight_fails_fast_when_the_socket_dies(server: EslReplayServer) -> None:
    with Harness(server) as h:
        server.hang()
        pending = gevent.spawn(h.source.api, "status", 5.0)
        gevent.sleep(0.1)
        server.kill_connections()
        pending.join(1.0)
        assert pending.ready()
        assert isinstance(pending.exception, EslError)


def test_commands_cannot_inject_lines(server: EslReplayServer) -> None:
    with Harness(server) as h:
        with pytest.raises(ValueError):
            h.source.api("status\n\nexit")
        with pytest.raises(ValueError):
            h.source.send_event("fsrecrypt::status", {"A": "1\n\nexit"})
        assert server.commands("exit") == []


def test_send_event_sends_custom_with_subclass(server: EslReplayServer) -> None:
    with Harness(server) as h:
        h.source.send_event("fsrecrypt::status", {"State": "ok", "Queue": "3"}, body="hi\n")
        (cmd,) = server.commands("sendevent")
        assert cmd.line == "sendevent CUSTOM"
        assert cmd.headers["Event-Subclass"] == "fsrecrypt::status"
        assert (cmd.headers["State"], cmd.headers["Queue"]) == ("ok", "3")
        assert cmd.body == b"hi\n"
        assert "UP" in h.source.api("status")  # replies still line up after a body


def test_api_when_not_connected_raises() -> None:
    src = EventSource(EslSettings(port=1), lambda e: None)
    with pytest.raises(EslError):
        src.api("status")


# c. EOF mid-frame ----------------------------------------------------------------------

_STOCK_MID_FRAME = textwrap.dedent(
    """
    import gevent, greenswitch.esl
    from tests.support.eslserver import EslReplayServer
    srv = EslReplayServer().start()
    esl = greenswitch.esl.InboundESL("127.0.0.1", srv.port, "ClueCon")
    esl.connect()
    esl.send("event plain RECORD_STOP")
    print("subscribed", flush=True)
    srv.drop_mid_frame()
    gevent.sleep(0.5)
    print("hub alive", flush=True)
    """
)


def test_stock_spins_the_hub_on_eof_mid_frame() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOCK_MID_FRAME],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert "subscribed" in out
    assert "hub alive" not in out  # the process froze in the reader's busy loop


def test_eof_mid_frame_ends_the_reader_and_reconnects(server: EslReplayServer) -> None:
    with Harness(server) as h:
        conn = h.source._conn
        assert server.drop_mid_frame() == 1
        assert wait_until(lambda: conn is not None and not conn.connected)
        assert conn is not None and "mid-frame" in (conn.down_reason or "")
        assert h.events == []
        assert wait_until(lambda: h.source.reconnects == 1 and server.subscribed == 1)
        server.emit_fixture("record_stop.esl")
        assert wait_until(lambda: len(h.events) == 1)


# d. non-UTF-8 -----------------------------------------------------------------------------


def _frame_with_ff() -> bytes:
    frame = build_event_frame("record_stop.esl", {"Caller-Caller-ID-Name": "x"})
    bad = frame.replace(b"Caller-Caller-ID-Name: x\n", b"Caller-Caller-ID-Name: \xff\n")
    assert len(bad) == len(frame) and bad != frame
    return bad


def test_stock_reader_dies_on_non_utf8_but_stays_connected(server: EslReplayServer) -> None:
    esl = stock_client(server)
    try:
        server.emit_raw(_frame_with_ff())
        assert wait_until(lambda: esl._receive_events_greenlet.dead, 1.0)
        assert esl.connected is True  # a zombie: nothing will ever be read again
    finally:
        stock_close(esl)


def test_non_utf8_event_is_delivered_and_reading_continues(server: EslReplayServer) -> None:
    with Harness(server) as h:
        server.emit_raw(_frame_with_ff())
        server.emit_fixture("stereo_record_stop.esl")
        assert wait_until(lambda: len(h.events) == 2)
        assert h.events[0].get("Caller-Caller-ID-Name") == "\udcff"
        assert h.source.connected and h.source.reconnects == 0


def test_garbage_event_is_skipped_not_fatal(server: EslReplayServer) -> None:
    with Harness(server) as h:
        body = b"no colon here\n\n"
        envelope = b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body)
        server.emit_raw(envelope + body)
        server.emit_fixture("record_stop.esl")
        assert wait_until(lambda: len(h.events) == 1)
        assert h.source.connected and h.source.reconnects == 0


def test_protocol_garbage_marks_down_and_reconnects(server: EslReplayServer) -> None:
    with Harness(server) as h:
        server.emit_raw(b"Content-Type: text/event-plain\nContent-Length: 999999999999\n\n")
        assert wait_until(lambda: h.source.reconnects == 1 and h.source.connected)


# e. reconnect ------------------------------------------------------------------------------


def test_stock_never_reconnects(server: EslReplayServer) -> None:
    esl = stock_client(server)
    try:
        server.stop()
        server.start()
        assert wait_until(lambda: not esl.connected, 1.0)
        gevent.sleep(0.3)
        assert server.connections_total == 1 and not esl.connected
    finally:
        stock_close(esl)


def test_reconnect_after_freeswitch_restart(server: EslReplayServer) -> None:
    with Harness(server) as h:
        server.stop()
        assert wait_until(lambda: not h.source.connected)
        gevent.sleep(0.2)  # refused connects while it is down: backoff
        server.start()
        assert wait_until(lambda: h.source.connected and server.subscribed == 1)
        assert h.source.reconnects == 1
        assert len(server.commands("event plain")) == 2
        assert len(server.commands("auth")) == 2
        assert "backoff" in h.states and h.states.count("connected") == 2
        server.emit_fixture("uuid_record_record_stop.esl")
        assert wait_until(lambda: len(h.events) == 1)


# f. liveness ------------------------------------------------------------------------------------


def test_liveness_miss_on_hang_forces_reconnect(server: EslReplayServer) -> None:
    with Harness(server, liveness_interval=0.1, command_timeout=0.2) as h:
        gevent.sleep(0.35)
        assert h.source.reconnects == 0  # probes answered
        assert len(server.commands("api status")) >= 2
        first = h.source._conn
        server.hang()  # socket stays open, nothing answers
        assert wait_until(lambda: h.source.reconnects == 1 and h.source.connected)
        assert first is not None and "no reply" in (first.down_reason or "")
        server.emit_fixture("record_stop.esl")
        assert wait_until(lambda: len(h.events) == 1)


def test_disconnect_notice_triggers_reconnect(server: EslReplayServer) -> None:
    with Harness(server) as h:
        first = h.source._conn
        assert server.disconnect_notice(close=False) == 1  # socket left open by the server
        assert wait_until(lambda: h.source.reconnects == 1 and h.source.connected)
        assert first is not None and "disconnect-notice" in (first.down_reason or "")


def test_exit_frames_are_replayed(server: EslReplayServer) -> None:
    with Harness(server) as h:
        conn = h.source._conn
        assert conn is not None
        reply = conn.send("exit")
        assert reply.text == "+OK bye"
        assert wait_until(lambda: not conn.connected)
        assert "disconnect-notice" in (conn.down_reason or "")


def test_stop_is_prompt_and_final(server: EslReplayServer) -> None:
    h = Harness(server, liveness_interval=0.05)
    h.__enter__()
    t0 = time.monotonic()
    h.source.stop(timeout=2)
    assert time.monotonic() - t0 < 1.0
    assert h.states[-1] == "stopped" and not h.source.connected
    assert wait_until(lambda: server.subscribed == 0)
    n = server.connections_total
    gevent.sleep(0.2)
    assert server.connections_total == n


# --- the server as a separate process ----------------------------------------------------------


def test_replay_server_process_and_control_channel() -> None:
    proc = EslServerProcess()
    try:
        events: list[Event] = []
        src = EventSource(
            EslSettings(port=proc.port, connect_timeout=1, backoff_base=0.02, backoff_cap=0.1),
            events.append,
        )
        src.start()
        try:
            assert wait_until(lambda: src.connected)
            assert proc.call("wait_subscribed", n=1, timeout=2) is True
            assert (
                proc.call(
                    "emit_fixture",
                    name="record_stop.esl",
                    overrides={"variable_fsrecrypt_tenant": "acme"},
                )
                == 1
            )
            assert wait_until(lambda: events)
            assert classify_record_stop(events[0]).tenant == "acme"
            assert [c["line"] for c in proc.call("received", prefix="event")] == [
                "event plain RECORD_STOP"
            ]
            proc.call("stop")
            proc.call("start")
            assert wait_until(lambda: src.reconnects == 1 and src.connected)
        finally:
            src.stop(timeout=2)
    finally:
        proc.close()
    assert proc.proc.returncode == 0


def test_rude_rejection_is_a_connect_error() -> None:
    """apply-inbound-acl refusal: FreeSWITCH sends text/rude-rejection and hangs up."""
    lsock = socket.create_server(("127.0.0.1", 0))
    body = b"Access Denied, go away.\n"
    frame = b"Content-Type: text/rude-rejection\nContent-Length: %d\n\n" % len(body) + body

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(frame)
            time.sleep(1.0)  # keep it open: the client must not wait for EOF

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = lsock.getsockname()[1]
        conn = _HardenedESL(EslSettings(port=port, connect_timeout=3), lambda e: None)
        t0 = time.monotonic()
        with pytest.raises(EslError, match="rude-rejection"):
            conn.connect()
        assert time.monotonic() - t0 < 1.0
        assert not conn.connected
    finally:
        lsock.close()


def test_stop_from_inside_the_event_handler(server: EslReplayServer) -> None:
    holder: list[EventSource] = []
    stopped: list[bool] = []

    def handler(event: Event) -> None:
        holder[0].stop(timeout=1)
        stopped.append(True)

    src = EventSource(fast_settings(server), handler)
    holder.append(src)
    src.start()
    assert wait_until(lambda: server.subscribed)
    server.emit_fixture("record_stop.esl")
    assert wait_until(lambda: stopped, 2.0)
    assert not src.connected
    assert wait_until(lambda: server.subscribed == 0)
