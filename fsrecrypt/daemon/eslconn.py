"""One FreeSWITCH Event Socket connection: a hardened greenswitch ``InboundESL``.

:mod:`fsrecrypt.daemon.esl` supervises connections (reconnect, liveness);
event bodies are parsed in :mod:`fsrecrypt.daemon.eslparse` (pure); what the
daemon subscribes to, and the ``filter`` commands that keep a busy switch's
other events off the socket, are in :mod:`fsrecrypt.daemon.eslsub`.

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

A ``text/disconnect-notice`` (FreeSWITCH exiting or shutting down) marks the
connection down like any other disconnect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.socket
from greenswitch.esl import InboundESL

from fsrecrypt.daemon.eslparse import MAX_BODY, Event, parse_event_body
from fsrecrypt.daemon.eslsub import EslFilter, filter_commands
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
    "EslAuthRefused",
    "EslSettings",
    "Reply",
    "log",
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
    # ``filter`` lines sent before ``event plain`` (see fsrecrypt.daemon.eslsub).
    filters: tuple[EslFilter, ...] = ()


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

    def subscribe(self, events: tuple[str, ...], filters: tuple[EslFilter, ...] = ()) -> None:
        """``filter ...`` lines, then ``event plain ...``; every reply must be +OK.

        Filters go first so that no unfiltered event is sent in between.
        """
        for name in events:
            _check_line(name, "event name")
        for command in filter_commands(filters):
            reply = self.send(command)
            if not reply.text.startswith("+OK"):
                self.close("filter refused")
                raise EslError(f"FreeSWITCH refused {command!r}: {reply.text[:200]}")
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
