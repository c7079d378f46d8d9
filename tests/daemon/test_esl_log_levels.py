"""ESL trouble is logged at warning/error, so ``journalctl -p warning`` shows it.

Before, a refused password, FreeSWITCH going away and an endless reconnect
loop were all ``info`` lines: invisible to anyone filtering by priority.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from structlog.testing import capture_logs

from fsrecrypt.daemon.esl import RECONNECT_LOOP_ATTEMPTS, EventSource
from tests.daemon.test_esl import fast_settings, server  # noqa: F401 - the fixture
from tests.support.eslserver import EslReplayServer
from tests.support.moto import free_port


def _wait(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    import gevent

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        gevent.sleep(0.01)
    return pred()


def _states(logs: list[dict], state: str) -> list[dict]:
    return [ln for ln in logs if ln.get("event") == "esl.state" and ln.get("state") == state]


def test_a_refused_password_is_an_error(server: EslReplayServer) -> None:  # noqa: F811
    with capture_logs() as logs:
        src = EventSource(fast_settings(server, password="wrong"), lambda e: None)
        src.start()
        try:
            assert _wait(lambda: len(_states(logs, "backoff")) >= 1)
        finally:
            src.stop(timeout=2)
    first = _states(logs, "backoff")[0]
    assert first["log_level"] == "error"
    assert "refused the ESL password" in first["error"]
    assert "wrong" not in str(logs)  # the password is never logged


def test_freeswitch_gone_is_a_warning_and_a_reconnect_loop_an_error(
    server: EslReplayServer,  # noqa: F811
) -> None:
    with capture_logs() as logs:
        src = EventSource(fast_settings(server), lambda e: None)
        src.start()
        try:
            assert _wait(lambda: src.connected)
            server.kill_connections()
            assert _wait(lambda: len(_states(logs, "disconnected")) >= 1)
        finally:
            src.stop(timeout=2)
    assert {ln["log_level"] for ln in _states(logs, "disconnected")} == {"warning"}
    assert {ln["log_level"] for ln in _states(logs, "connected")} == {"info"}

    closed = fast_settings(server, port=free_port(), backoff_cap=0.02)
    with capture_logs() as logs:
        src = EventSource(closed, lambda e: None)
        src.start()
        try:
            assert _wait(lambda: len(_states(logs, "backoff")) > RECONNECT_LOOP_ATTEMPTS)
        finally:
            src.stop(timeout=2)
    levels = [ln["log_level"] for ln in _states(logs, "backoff")]
    assert levels[: RECONNECT_LOOP_ATTEMPTS - 1] == ["warning"] * (RECONNECT_LOOP_ATTEMPTS - 1)
    assert levels[RECONNECT_LOOP_ATTEMPTS - 1 :] and set(levels[RECONNECT_LOOP_ATTEMPTS - 1 :]) == {
        "error"
    }
