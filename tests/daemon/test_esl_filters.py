"""The daemon's mask subscription through ESL filters: what it is sent on a busy switch.

The replay server applies ``filter`` exactly as mod_event_socket does (see
``tests/test_eslserver.py``); the stream is the captured mask transcript,
renamed per call, mixed with the API events other clients cause.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent
import pytest

from fsrecrypt.daemon.esl import EslSettings, EventSource
from fsrecrypt.daemon.eslparse import Event
from fsrecrypt.daemon.eslsub import recording_subscription
from tests.support.eslmix import busy_switch
from tests.support.eslserver import EslReplayServer

pytestmark = pytest.mark.timeout(60)


def wait_until(pred: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        gevent.sleep(0.01)
    return bool(pred())


def _receive(use_filters: bool, calls: int = 20) -> tuple[list[Event], int, int]:
    """Events an EventSource with the mask subscription receives for ``calls`` calls."""
    sub = recording_subscription(masks=True, use_filters=use_filters)
    server = EslReplayServer().start()
    events: list[Event] = []
    source = EventSource(
        EslSettings(
            port=server.port,
            liveness_interval=0.05,  # our own "api status" probes fire API events too
            events=sub.events,
            filters=sub.filters,
        ),
        events.append,
    )
    try:
        source.start()
        assert wait_until(lambda: server.subscribed == 1)
        wanted = stops = 0
        for call in busy_switch(calls, "/var/lib/freeswitch/recordings"):
            for frame in call.frames:
                server.emit_frame(frame)
            wanted += call.wanted
            stops += 1
        gevent.sleep(0.3)  # a few liveness probes more
        assert wait_until(lambda: sum(e.name == "RECORD_STOP" for e in events) == stops)
        return events, wanted, stops
    finally:
        source.stop(timeout=2)
        server.stop()


def test_filters_keep_unrelated_api_and_channel_events_off_the_socket() -> None:
    events, wanted, stops = _receive(use_filters=True)
    names = {(e.name, e.get("API-Command") or e.get("Application")) for e in events}
    assert names == {
        ("RECORD_START", None),
        ("RECORD_STOP", None),
        ("CHANNEL_EXECUTE", "record_session_mask"),
        ("CHANNEL_EXECUTE", "record_session_unmask"),
        ("API", "uuid_record"),
    }
    assert len(events) == wanted
    # Our own liveness probes ("api status") are not sent back to us either.
    assert not [e for e in events if e.get("API-Command") == "status"]
    assert len(events) / stops < 4


def test_without_filters_every_api_and_execute_event_arrives() -> None:
    events, wanted, stops = _receive(use_filters=False)
    commands = {e.get("API-Command") for e in events if e.name == "API"}
    assert {"status", "show", "uuid_getvar", "uuid_broadcast"} <= commands
    assert len(events) > 4 * wanted
    assert len(events) / stops > 15


def test_filters_are_sent_before_the_subscription_and_again_after_a_reconnect() -> None:
    sub = recording_subscription(masks=True)
    server = EslReplayServer().start()
    source = EventSource(
        EslSettings(
            port=server.port,
            backoff_base=0.02,
            backoff_cap=0.1,
            events=sub.events,
            filters=sub.filters,
        ),
        lambda _e: None,
    )
    try:
        source.start()
        assert wait_until(lambda: server.subscribed == 1)
        server.kill_connections()
        assert wait_until(lambda: source.reconnects == 1 and server.subscribed == 1)
        lines = [c.line for c in server.commands() if c.line.split()[0] in ("filter", "event")]
        once = [
            "filter Event-Name RECORD_START",
            "filter Event-Name RECORD_STOP",
            "filter Application record_session_mask",
            "filter Application record_session_unmask",
            "filter API-Command uuid_record",
            "event plain RECORD_START RECORD_STOP CHANNEL_EXECUTE API",
        ]
        assert lines == once + once
    finally:
        source.stop(timeout=2)
        server.stop()


def test_filter_lines_cannot_inject_commands() -> None:
    from fsrecrypt.daemon.eslsub import EslFilter

    with pytest.raises(ValueError, match="single line"):
        EslFilter("API-Command", "x\nevent plain ALL").command()
    with pytest.raises(ValueError):
        EslFilter("Bad Header", "x").command()


def test_without_mask_tracking_only_record_stop_and_no_filter() -> None:
    from fsrecrypt.daemon.eslsub import Subscription

    assert recording_subscription(masks=False) == Subscription(("RECORD_STOP",), ())
