"""One bad event must cost that event only: the ESL dispatcher contains handler failures.

Each trigger below is an exception a real handler met on a hostile RECORD_STOP
(a self-looping symlink, ``%00`` in the path, a rename racing ``realpath``, a
non-UTF-8 byte that PostgreSQL or psycopg2 refuses). Before the fix, the
dispatcher's own ``log.exception(..., event=...)`` raised TypeError and the
dispatcher greenlet died: every later event was silently dropped.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import gevent
import psycopg2
import pytest
import structlog

from fsrecrypt.daemon.esl import EventSource
from fsrecrypt.daemon.eslparse import Event, classify_record_stop, parse_event_body
from tests.daemon.test_esl import fast_settings, wait_until
from tests.support.eslserver import EslReplayServer, build_event_frame, split_frame

pytestmark = pytest.mark.timeout(30)

TRIGGERS: dict[str, Callable[[], BaseException]] = {
    "symlink-loop": lambda: RuntimeError("Symlink loop from '/rec/loop.wav'"),
    "nul-in-path": lambda: ValueError("embedded null byte"),
    "rename-race": lambda: OSError(errno.EINVAL, "Invalid argument"),
    "pg-rejects-value": lambda: psycopg2.DataError("unsupported Unicode escape sequence"),
    "psycopg2-encode": lambda: UnicodeEncodeError(
        "utf-8", "\udcff", 0, 1, "surrogates not allowed"
    ),
    "bug": lambda: KeyError("consent"),
}


@pytest.fixture
def server() -> Iterator[EslReplayServer]:
    srv = EslReplayServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _stop_event(**overrides: str) -> bytes:
    return split_frame(build_event_frame("record_stop.esl", overrides))[1]


@pytest.mark.parametrize("trigger", sorted(TRIGGERS))
def test_a_raising_handler_costs_one_event_and_the_loop_goes_on(
    server: EslReplayServer, trigger: str
) -> None:
    handled: list[str] = []

    def handler(event: Event) -> None:
        path = event.get("Record-File-Path") or ""
        if path.endswith("bad.wav"):
            raise TRIGGERS[trigger]()
        handled.append(path)

    src = EventSource(fast_settings(server), handler)
    with structlog.testing.capture_logs() as logs:
        src.start()
        try:
            assert wait_until(lambda: src.connected and server.subscribed)
            dispatcher = src.greenlets()["esl-dispatcher"]
            for name in ("bad.wav", "good1.wav", "bad.wav", "good2.wav"):
                server.emit_fixture("record_stop.esl", {"Record-File-Path": f"/rec/{name}"})
            assert wait_until(lambda: len(handled) == 2, 5), (handled, logs)
            assert handled == ["/rec/good1.wav", "/rec/good2.wav"]
            assert not dispatcher.dead
            assert src.handler_failures == 2
        finally:
            src.stop(timeout=2)
    failed = [e for e in logs if e["event"] == "esl.on_event_failed"]
    assert len(failed) == 2  # one line per refused event
    assert failed[0]["event_name"] == "RECORD_STOP"
    assert failed[0]["error_type"] == type(TRIGGERS[trigger]()).__name__


def test_dispatcher_survives_a_failing_log_renderer(server: EslReplayServer) -> None:
    """Even when logging the failure fails, the next event is still delivered."""
    handled: list[str] = []

    def handler(event: Event) -> None:
        if not handled:
            handled.append("first")
            raise RuntimeError("first event fails")
        handled.append("second")

    def broken_processor(_logger: object, _name: str, event_dict: dict) -> dict:
        if event_dict.get("event") == "esl.on_event_failed":
            raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
        return event_dict

    old = structlog.get_config()
    structlog.configure(processors=[broken_processor, structlog.processors.KeyValueRenderer()])
    src = EventSource(fast_settings(server), handler)
    try:
        src.start()
        assert wait_until(lambda: src.connected and server.subscribed)
        server.emit_fixture("record_stop.esl")
        server.emit_fixture("record_stop.esl")
        assert wait_until(lambda: handled == ["first", "second"], 5), handled
        assert src.handler_failures == 1
    finally:
        src.stop(timeout=2)
        structlog.configure(**old)


def test_stop_still_ends_the_dispatcher_after_failures(server: EslReplayServer) -> None:
    src = EventSource(fast_settings(server), lambda e: (_ for _ in ()).throw(ValueError("x")))
    src.start()
    assert wait_until(lambda: src.connected and server.subscribed)
    names = src.greenlets()
    assert set(names) == {"esl-supervisor", "esl-dispatcher"}
    server.emit_fixture("record_stop.esl")
    assert wait_until(lambda: src.handler_failures == 1)
    src.stop(timeout=2)
    gevent.sleep(0)
    assert all(g.dead for g in names.values())
    assert src.greenlets() == {}


# --- header values that would reach PostgreSQL ---------------------------------------


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("variable_recording_consent", "consent"),
        ("Channel-Call-UUID", "call_uuid"),
        ("Unique-ID", "channel_uuid"),
        ("variable_fsrecrypt_tenant", "tenant"),
        ("Core-UUID", "core_uuid"),
        ("Event-Date-Timestamp", "event_timestamp"),
    ],
)
@pytest.mark.parametrize("hostile", ["yes\udcff\udcfe", "y\x00es", "\udced\udca0\udc80"])
def test_values_bound_for_postgresql_are_sanitised(header: str, field: str, hostile: str) -> None:
    rs = classify_record_stop(parse_event_body(_stop_event(**{header: hostile})))
    value = getattr(rs, field)
    assert "\x00" not in value
    value.encode("utf-8")  # strict: no lone surrogates left
    assert "\ufffd" in value
    assert rs.sanitised == (field,)


def test_clean_values_and_the_path_are_left_alone() -> None:
    path = "/rec/caf\udce9\x00.wav"
    rs = classify_record_stop(
        parse_event_body(
            _stop_event(
                **{
                    "Record-File-Path": path,
                    "variable_recording_consent": "oui, d\u00e9j\u00e0",
                }
            )
        )
    )
    assert rs.consent == "oui, d\u00e9j\u00e0"
    assert rs.path == path  # the daemon vets (and refuses) it; never silently rewritten
    assert rs.sanitised == ()
