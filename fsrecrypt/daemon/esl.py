"""FreeSWITCH Event Socket, supervised: reconnect with backoff, liveness probes.

One connection (the hardened greenswitch client, deadlines, frame reading) is
:mod:`fsrecrypt.daemon.eslconn`; event bodies are parsed and RECORD_STOPs
classified in :mod:`fsrecrypt.daemon.eslparse` (pure functions, no socket).

greenswitch has no reconnect and no liveness check (flaws e./f. after the
four in :mod:`fsrecrypt.daemon.eslconn`). :class:`EventSource` supervises the
connection: capped, jittered exponential backoff, re-auth, re-subscribe (with
the same event filters), and a periodic ``api status`` whose miss forces a
reconnect. A ``text/disconnect-notice`` (FreeSWITCH exiting or shutting
down) is a disconnect like any other and triggers the reconnect loop.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent
import gevent.event
import gevent.queue

from fsrecrypt.daemon.eslconn import (
    RECONNECT_LOOP_ATTEMPTS,
    STATE_LEVELS,
    EslAuthRefused,
    EslSettings,
    Reply,
    _check_line,
    _HardenedESL,
    probe_status,
)
from fsrecrypt.daemon.eslconn import log as _log
from fsrecrypt.daemon.eslparse import Event
from fsrecrypt.errors import EslError

log: Any = _log  # the one "fsrecrypt.esl" logger, shared with the connection

__all__ = [
    "RECONNECT_LOOP_ATTEMPTS",
    "EslSettings",
    "EventSource",
    "Reply",
    "_HardenedESL",
    "backoff_delay",
    "probe_status",
]


# --- the supervised event source ------------------------------------------------------


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before reconnect ``attempt`` (0-based): capped exponential, half of it jittered.

    Jitter keeps a fleet of daemons from reconnecting in lock-step when
    FreeSWITCH restarts; keeping half the delay fixed keeps the growth real.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return ceiling / 2 + rand() * ceiling / 2


_STOP = object()


class EventSource:
    """A supervised ESL subscription: connect, subscribe, probe liveness, reconnect.

    ``on_event`` runs in a dispatcher greenlet fed by a queue, never in the
    socket reader, so a slow handler delays its own work but not reading
    (nor the liveness replies). ``on_state`` receives ``connecting``,
    ``connected``, ``disconnected``, ``backoff`` and ``stopped``.
    """

    def __init__(
        self,
        settings: EslSettings,
        on_event: Callable[[Event], None],
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_event = on_event
        self.on_state = on_state
        self._up = False
        self.reconnects = 0
        self.last_event_at: float | None = None
        self.state = "stopped"
        self._conn: _HardenedESL | None = None
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self._stopping = gevent.event.Event()
        self._supervisor: gevent.Greenlet | None = None
        self._dispatcher: gevent.Greenlet | None = None
        self._ever_connected = False
        self.handler_failures = 0

    @property
    def connected(self) -> bool:
        """Subscribed and the socket is alive right now (not just "not yet noticed down")."""
        conn = self._conn
        return self._up and conn is not None and conn.connected

    # lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Spawn the supervisor and the dispatcher greenlets (returns at once)."""
        if self._supervisor is not None:
            return
        self._stopping.clear()
        self._dispatcher = gevent.spawn(self._dispatch_loop)
        self._supervisor = gevent.spawn(self._supervise)

    def greenlets(self) -> dict[str, gevent.Greenlet]:
        """The long-lived greenlets started by :meth:`start`, by name, for a supervisor.

        ``esl-supervisor`` connects, probes liveness and reconnects (each
        connection's socket reader is its child: a dead reader is a dropped
        connection, reconnected); ``esl-dispatcher`` runs ``on_event``.
        Neither returns before :meth:`stop`, so either ending earlier means
        events are no longer being handled.
        """
        named = {"esl-supervisor": self._supervisor, "esl-dispatcher": self._dispatcher}
        return {name: g for name, g in named.items() if g is not None}

    def stop(self, timeout: float = 5.0) -> None:
        """Close the connection and stop both greenlets; queued events are still delivered."""
        self._stopping.set()
        conn = self._conn
        if conn is not None:
            conn.close("stopping")
        current = gevent.getcurrent()
        if self._supervisor is not None:
            if self._supervisor is not current:  # stop() may be called from a handler
                self._supervisor.join(timeout)
                self._supervisor.kill(block=False)
            self._supervisor = None
        if self._dispatcher is not None:
            self._queue.put(_STOP)
            if self._dispatcher is not current:
                self._dispatcher.join(timeout)
                self._dispatcher.kill(block=False)
            self._dispatcher = None
        self._up = False
        self._set_state("stopped")

    # commands ------------------------------------------------------------------

    def _current(self) -> _HardenedESL:
        conn = self._conn
        if conn is None or not conn.connected:
            raise EslError("not connected to FreeSWITCH")
        return conn

    def api(self, command: str, timeout: float | None = None) -> str:
        """Run ``api <command>`` and return the api/response body.

        Raises EslError when not connected or on no reply within ``timeout``
        (default command_timeout; the connection is then dropped and
        re-established by the supervisor), ValueError on a line break.
        """
        _check_line(command, "api command")
        reply = self._current().send(f"api {command}", timeout)
        return reply.body or ""

    def send_event(
        self, subclass: str, headers: Mapping[str, str], body: str | None = None
    ) -> None:
        """Fire a CUSTOM event with ``Event-Subclass: subclass`` through ``sendevent``.

        Header names and values must be single lines (a line break would
        inject commands into the ESL stream); a body is sent with its
        Content-Length.
        """
        _check_line(subclass, "event subclass")
        lines = ["sendevent CUSTOM", f"Event-Subclass: {subclass}"]
        for name, value in headers.items():
            _check_line(name, "header name")
            _check_line(str(value), f"header {name}")
            if ":" in name or not name:
                raise ValueError(f"invalid header name {name!r}")
            lines.append(f"{name}: {value}")
        reply = self._current().send("\n".join(lines), body=body)
        if not reply.text.startswith("+OK"):
            raise EslError(f"FreeSWITCH refused sendevent {subclass}: {reply.text}")

    # internals -----------------------------------------------------------------

    def _set_state(self, state: str, level: str = "", **fields: object) -> None:
        """Record and log a state change; ``level`` defaults by state (see STATE_LEVELS)."""
        if state == self.state and not fields:
            return
        self.state = state
        getattr(log, level or STATE_LEVELS.get(state, "info"))(
            "esl.state", state=state, host=self.settings.host, port=self.settings.port, **fields
        )
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("esl.on_state_failed", state=state)

    def _enqueue(self, event: Event) -> None:
        self.last_event_at = time.time()
        self._queue.put(event)

    def _dispatch_loop(self) -> None:
        """Hand queued events to ``on_event`` one by one until stopped.

        A handler failure costs that one event, never the loop: whatever the
        handler raises (a bug, a library error on a hostile value) is counted
        in ``handler_failures`` and logged, and the next event is delivered.
        Only ``stop()`` ends this loop; the owner supervises the greenlet for
        anything else (see :meth:`greenlets`).
        """
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self.on_event(item)
            except Exception as exc:
                self.handler_failures += 1
                # The log call itself must not end the loop either (a renderer
                # choking on an odd value): nothing more can be done then.
                with contextlib.suppress(Exception):
                    log.error(
                        "esl.on_event_failed",
                        event_name=getattr(item, "name", None),
                        error_type=type(exc).__name__,
                        error=repr(exc)[:500],
                        exc_info=exc,
                    )

    def _supervise(self) -> None:
        attempt = 0
        s = self.settings
        while not self._stopping.is_set():
            self._set_state("connecting")
            conn = _HardenedESL(s, self._enqueue)
            self._conn = conn
            try:
                conn.connect()
                conn.subscribe(s.events, s.filters)
            except EslError as exc:
                conn.close(str(exc))
                delay = backoff_delay(attempt, s.backoff_base, s.backoff_cap)
                attempt += 1
                # A refused password never fixes itself, and a loop of failed
                # connects is an outage: both are errors (journalctl -p err).
                loud = isinstance(exc, EslAuthRefused) or attempt >= RECONNECT_LOOP_ATTEMPTS
                self._set_state(
                    "backoff",
                    level="error" if loud else "warning",
                    error=exc.one_line(),
                    delay=round(delay, 3),
                    attempt=attempt,
                )
                self._stopping.wait(delay)
                continue
            attempt = 0
            if self._ever_connected:
                self.reconnects += 1
            self._ever_connected = True
            self._up = True
            self._set_state(
                "connected",
                events=list(s.events),
                filters=len(s.filters),
                reconnects=self.reconnects,
            )
            self._watch(conn)
            self._up = False
            conn.close("supervisor closing")
            if self._stopping.is_set():
                break
            self._set_state("disconnected", reason=conn.down_reason)
            delay = backoff_delay(attempt, s.backoff_base, s.backoff_cap)
            attempt += 1
            self._stopping.wait(delay)

    def _watch(self, conn: _HardenedESL) -> None:
        """Probe with ``api status`` every liveness_interval until the connection dies."""
        s = self.settings
        while not self._stopping.is_set():
            if conn.dead.wait(s.liveness_interval):
                return
            if self._stopping.is_set():
                return
            try:
                conn.send("api status", s.command_timeout)
            except EslError as exc:
                log.warning("esl.liveness_miss", error=str(exc))
                conn.close(f"liveness probe failed: {exc}")
                return
