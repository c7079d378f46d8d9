"""FreeSWITCH Event Socket client: a hardened greenswitch, supervised (reconnect, liveness).

Event bodies are parsed and RECORD_STOPs classified in :mod:`fsrecrypt.daemon.eslparse`
(pure functions, no socket); this module owns the socket.

greenswitch 0.0.19 is kept as the dependency (``_HardenedESL`` subclasses its
``InboundESL``), but every code path that touches the socket is replaced,
because the stock client has flaws that matter for a daemon that must not
miss or misread a recording:

a. ``ESLEvent.parse_data`` URL-decodes the whole body *before* splitting it
   into lines, so a caller-chosen value with ``%0A`` (a caller id name, a
   channel variable set from SIP headers) forges extra headers such as the
   tenant or the file path. :func:`parse_event_body` splits lines first and
   decodes each value on its own.
b. No timeout after connect: ``auth`` and every command wait forever, and a
   command in flight when the socket dies never returns. Here connect, auth
   and each command have a deadline; a miss raises :class:`EslError` and
   kills the connection (a late reply would otherwise answer the next
   command).
c. EOF in the middle of a frame body makes ``_read_socket`` loop on empty
   reads without ever yielding: the whole process hangs at 100% CPU. Here EOF
   anywhere ends the reader and marks the connection down.
d. A non-UTF-8 byte in a body raises inside the reader greenlet, which dies
   while ``connected`` stays ``True``. Here values are decoded leniently and
   any reader failure is logged and marks the connection down.
e./f. No reconnect and no liveness check. :class:`EventSource` supervises
   the connection: capped, jittered exponential backoff, re-auth,
   re-subscribe, and a periodic ``api status`` whose miss forces a reconnect.

A ``text/disconnect-notice`` (FreeSWITCH exiting or shutting down) is a
disconnect like any other and triggers the reconnect loop.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.socket
from greenswitch.esl import InboundESL

from fsrecrypt.daemon.eslparse import MAX_BODY, Event, parse_event_body
from fsrecrypt.errors import EslError, EventError
from fsrecrypt.numbers import NumberError, parse_int

try:  # structlog is a declared dependency; stay importable without it
    import structlog

    log: Any = structlog.get_logger("fsrecrypt.esl")
except ImportError:  # pragma: no cover - exercised only without structlog
    import logging

    class _KwLogger:
        """Accept structlog-style ``log.info("event", key=value)`` on stdlib logging."""

        def __init__(self, name: str) -> None:
            self._log = logging.getLogger(name)

        def __getattr__(self, level: str) -> Callable[..., None]:
            method = getattr(self._log, level)

            def emit(event: str, **fields: object) -> None:
                extra = " ".join(f"{k}={v!r}" for k, v in fields.items())
                method(f"{event} {extra}".rstrip())

            return emit

    log = _KwLogger("fsrecrypt.esl")

__all__ = [
    "EslSettings",
    "EventSource",
    "Reply",
    "backoff_delay",
    "probe_status",
]

# Bounds that keep a broken or hostile peer from exhausting memory (and MAX_BODY
# from eslparse, shared with the event body parser).
MAX_LINE = 64 * 1024
MAX_ENVELOPE_LINES = 256
# Log level of each connection state: FreeSWITCH gone is a warning, so
# `journalctl -p warning` shows every outage; the rest is routine.
STATE_LEVELS = {"disconnected": "warning", "backoff": "warning"}
# Failed connects in a row after which the reconnect loop logs errors.
RECONNECT_LOOP_ATTEMPTS = 5


class EslAuthRefused(EslError):
    """FreeSWITCH refused the ESL password: retrying cannot help until the config changes."""


# --- settings -------------------------------------------------------------------


@dataclass(frozen=True)
class EslSettings:
    """How to reach FreeSWITCH and how impatient to be with it.

    Only RECORD_STOP is subscribed by default: it carries everything the
    pipeline needs (path, cause, channel variables) and the file is closed
    when it fires. CHANNEL_HANGUP_COMPLETE adds nothing: with ``uuid_record``
    the recording stops while the channel is still up, so a hangup is not a
    "recording done" signal, and each one is ~4.5 KB the reader must parse.
    """

    host: str = "127.0.0.1"
    port: int = 8021
    password: str = "ClueCon"  # noqa: S105 - FreeSWITCH's shipped default, overridden by config
    connect_timeout: float = 5.0
    command_timeout: float = 5.0
    liveness_interval: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    events: tuple[str, ...] = ("RECORD_STOP",)


# --- one connection ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A command/reply or api/response frame."""

    headers: dict[str, str]
    body: str | None

    @property
    def text(self) -> str:
        """Reply-Text of a command/reply ('' for an api/response)."""
        return self.headers.get("Reply-Text", "")


class _EofMidFrame(Exception):
    """The peer closed the socket inside a frame."""


def _check_line(value: str, what: str) -> None:
    if "\n" in value or "\r" in value:
        # A newline would end the command block and let the rest be read as
        # a second command: an injection into the control channel.
        raise ValueError(f"{what} must not contain a line break")


class _HardenedESL(InboundESL):  # type: ignore[misc]
    """greenswitch's InboundESL with every socket path replaced (see the module doc)."""

    def __init__(
        self,
        settings: EslSettings,
        on_event: Callable[[Event], None],
        on_down: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(settings.host, settings.port, settings.password, settings.connect_timeout)
        self.settings = settings
        self._on_event = on_event
        self._on_down = on_down
        self._send_lock = gevent.lock.Semaphore()
        self.dead = gevent.event.Event()
        self.down_reason: str | None = None
        self.sock: gevent.socket.socket | None = None

    # connection -------------------------------------------------------------

    def connect(self) -> None:
        """Connect, wait for auth/request and authenticate, each within connect_timeout."""
        timeout = self.settings.connect_timeout
        try:
            self.sock = gevent.socket.create_connection(
                (self.settings.host, self.settings.port), timeout=timeout
            )
        except OSError as exc:
            raise EslError(
                f"cannot connect to FreeSWITCH ESL at {self.settings.host}:{self.settings.port}: "
                f"{exc}"
            ) from None
        # Reads block without a socket timeout: an idle event stream is normal,
        # and liveness probes detect a dead peer. Writes are bounded by
        # gevent.Timeout in send().
        self.sock.settimeout(None)
        self.sock_file = self.sock.makefile("rb")
        self.connected = True
        self._receive_events_greenlet = gevent.spawn(self._reader)
        if not self._auth_request_event.wait(timeout) or not self.connected:
            self.close(f"no auth/request greeting within {timeout}s")
            raise EslError(
                f"FreeSWITCH at {self.settings.host}:{self.settings.port} sent no auth/request: "
                f"{self.down_reason}"
            )
        self.authenticate()

    def authenticate(self) -> None:
        """Send ``auth``; a refusal is an EslError (FreeSWITCH then closes the socket)."""
        reply = self.send(f"auth {self.password}", timeout=self.settings.connect_timeout)
        if not reply.text.startswith("+OK"):
            self.close("authentication refused")
            raise EslAuthRefused(
                "FreeSWITCH refused the ESL password",
                hint="Check [freeswitch] password against event_socket.conf.xml",
            )

    def subscribe(self, events: tuple[str, ...]) -> None:
        """``event plain ...``; the reply must be +OK."""
        for name in events:
            _check_line(name, "event name")
        reply = self.send("event plain " + " ".join(events))
        if not reply.text.startswith("+OK"):
            self.close("subscription refused")
            raise EslError(f"FreeSWITCH refused the event subscription: {reply.text}")

    # commands ---------------------------------------------------------------

    def send(self, data: str, timeout: float | None = None, body: str | None = None) -> Reply:
        """Send one command block and wait for its reply within ``timeout``.

        A timeout kills the connection: replies are matched to commands by
        order only, so once one is missing every later match would be wrong.
        """
        if not self.connected or self.sock is None:
            raise EslError("not connected to FreeSWITCH")
        timeout = self.settings.command_timeout if timeout is None else timeout
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        first = data.split("\n", 1)[0]
        verb = "auth" if first.startswith("auth ") else first[:80]  # never log the password
        payload = data.encode("utf-8")
        if body is None:
            payload += b"\n\n"
        else:
            encoded = body.encode("utf-8")
            payload += b"\nContent-Length: %d\n\n" % len(encoded) + encoded
        try:
            with gevent.Timeout(timeout):
                with self._send_lock:  # keeps send order == reply order
                    self._commands_sent.append(result)
                    self.sock.sendall(payload)
                return result.get()  # type: ignore[no-any-return]
        except gevent.Timeout:
            self.close(f"no reply to {verb} within {timeout}s")
            raise EslError(f"FreeSWITCH did not answer {verb!r} within {timeout}s") from None
        except OSError as exc:
            self.close(f"send failed: {exc}")
            raise EslError(f"ESL connection failed while sending {verb!r}: {exc}") from None

    # reading ----------------------------------------------------------------

    def _readline(self) -> bytes:
        line = self.sock_file.readline(MAX_LINE)
        if line and not line.endswith(b"\n") and len(line) >= MAX_LINE:
            raise EslError("ESL envelope line too long")
        return line  # type: ignore[no-any-return]

    def _read_frame(self) -> tuple[dict[str, str], bytes] | None:
        """One frame: envelope lines up to a blank line, then Content-Length bytes.

        Returns None on a clean EOF between frames; raises _EofMidFrame when
        the peer vanished inside one.
        """
        headers: dict[str, str] = {}
        lines = 0
        while True:
            line = self._readline()
            if not line:
                if lines:
                    raise _EofMidFrame("EOF inside the envelope")
                return None
            if line in (b"\n", b"\r\n"):
                if lines:
                    break
                continue  # stray blank line between frames
            lines += 1
            if lines > MAX_ENVELOPE_LINES:
                raise EslError("ESL envelope has too many lines")
            name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
            headers.setdefault(name.strip(), value.strip())
        body = b""
        if "Content-Length" in headers:
            try:
                length = parse_int(headers["Content-Length"], max_digits=12)
            except NumberError:
                raise EslError("ESL Content-Length is not a number") from None
            if length < 0 or length > MAX_BODY:
                raise EslError(f"ESL Content-Length out of range: {length}")
            chunks: list[bytes] = []
            remaining = length
            while remaining:
                chunk = self.sock_file.read(remaining)
                if not chunk:
                    raise _EofMidFrame(f"EOF after {length - remaining} of {length} body bytes")
                chunks.append(chunk)
                remaining -= len(chunk)
            body = b"".join(chunks)
        return headers, body

    def _reader(self) -> None:
        """Read frames until EOF or error; whatever ends it marks the connection down."""
        reason = "connection closed by FreeSWITCH"
        try:
            while True:
                frame = self._read_frame()
                if frame is None:
                    break
                if not self._dispatch(*frame):
                    reason = "disconnect-notice from FreeSWITCH"
                    break
        except _EofMidFrame as exc:
            reason = f"connection dropped mid-frame ({exc})"
        except (OSError, ValueError) as exc:
            reason = f"read failed: {exc}"
        except EslError as exc:
            reason = f"protocol error: {exc}"
        except Exception as exc:  # never die silently: log and mark down
            log.exception("esl.reader_crashed", error=repr(exc))
            reason = f"reader crashed: {type(exc).__name__}"
        finally:
            self.close(reason)

    def _dispatch(self, headers: dict[str, str], body: bytes) -> bool:
        """Route one frame; False means the connection is over."""
        ctype = headers.get("Content-Type", "")
        if ctype == "auth/request":
            self._auth_request_event.set()
        elif ctype in ("command/reply", "api/response"):
            text = body.decode("utf-8", "surrogateescape") if ctype == "api/response" else None
            if self._commands_sent:
                self._commands_sent.pop(0).set(Reply(headers, text))
            else:
                log.warning("esl.unexpected_reply", content_type=ctype)
        elif ctype == "text/event-plain":
            try:
                event = parse_event_body(body)
            except EventError as exc:
                log.warning("esl.bad_event", error=str(exc), size=len(body))
            else:
                self._on_event(event)
        elif ctype == "text/disconnect-notice":
            if headers.get("Content-Disposition") == "linger":
                return True
            return False
        elif ctype == "text/rude-rejection":
            # apply-inbound-acl refused us; close() below wakes connect()
            raise EslError("rude-rejection (check apply-inbound-acl)")
        else:
            log.debug("esl.ignored_frame", content_type=ctype)
        return True

    def close(self, reason: str = "closed") -> None:
        """Mark down once: fail pending commands, close the socket, notify the owner."""
        if self.dead.is_set():
            return
        self.down_reason = reason
        self.connected = False
        self._run = False
        self.dead.set()
        pending, self._commands_sent = self._commands_sent, []
        for result in pending:
            result.set_exception(EslError(f"ESL connection lost: {reason}"))
        self._auth_request_event.set()
        # shutdown() first: close() alone leaves the descriptor open while the
        # reader's makefile() still references it, so FreeSWITCH would never
        # see us go. The reader is killed before its buffered file is closed
        # (closing a BufferedReader another greenlet is reading raises).
        if self.sock is not None:
            try:
                self.sock.shutdown(gevent.socket.SHUT_RDWR)
            except OSError:  # already gone
                pass
        reader = self._receive_events_greenlet
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=True, timeout=1)
        for closer in (getattr(self, "sock_file", None), self.sock):
            if closer is not None:
                try:
                    closer.close()
                except (OSError, RuntimeError):  # already gone / still in use
                    pass
        if self._on_down is not None:
            self._on_down(reason)


def probe_status(settings: EslSettings) -> str:
    """Connect, authenticate, ``api status`` once and close: the answer's first line.

    ``fsrecrypt health`` asks this of FreeSWITCH; every step has the
    settings' deadlines, and a failure is an EslError.
    """
    conn = _HardenedESL(settings, lambda _e: None)
    conn.connect()
    try:
        reply = conn.send("api status")
    finally:
        conn.close("health check done")
    first = (reply.body or "").strip().splitlines()
    return first[0] if first else "answered"


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
                conn.subscribe(s.events)
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
            self._set_state("connected", events=list(s.events), reconnects=self.reconnects)
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
