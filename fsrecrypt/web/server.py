"""The hardened playback server: gevent's WSGI server with deadlines, caps and redacted logs.

Why not gevent's server as it comes: a client that sends half a request
header holds a connection (and a descriptor) forever, a few thousand of them
exhaust the open-files limit and keep everyone out, and the access log would
hold signed URLs (bearer credentials). Here each request has a deadline, the
connections are capped (per server and per client, evicting idle ones
first), the open-files limit is raised to what was granted, and every log
line is redacted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from fsrecrypt import db as dbmod
from fsrecrypt.config import Config, with_overrides
from fsrecrypt.errors import ConfigError, FsrecryptError
from fsrecrypt.pipeline import Services
from fsrecrypt.web.app import create_app

log = logging.getLogger("fsrecrypt.web")


_SENSITIVE_PARAMS = frozenset(
    {"sig", "signature", "token", "access_token", "api_key", "apikey", "key", "x-api-key", "who"}
)
_QUERY_PARAM_RE = re.compile(r"([?&;])([^=&;\s\"]*)=([^&;\s\"]*)")
_KEY_IN_TEXT_RE = re.compile(r"fsr_([0-9a-f]{16})_[A-Za-z0-9_-]+")
LOG_LINE_LIMIT = 2048


def redact(text: str) -> str:
    """``text`` safe for a log line: no signature, API key or token, no control characters.

    Why: a signed playback URL is a bearer credential until it expires, and
    the access log (request line with its query) is read by more people than
    may play recordings. Query parameters named like a credential (also when
    percent-encoded) keep their name and lose their value; anything shaped
    like an API key anywhere in the line keeps only its public id. Control
    characters are escaped (no forged log lines) and the line is bounded.
    """

    def param(match: re.Match[str]) -> str:
        if unquote(match[2]).lower() in _SENSITIVE_PARAMS:
            return f"{match[1]}{match[2]}=[redacted]"
        return match[0]

    text = _QUERY_PARAM_RE.sub(param, text)
    text = _KEY_IN_TEXT_RE.sub(r"fsr_\1_[redacted]", text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if len(text) > LOG_LINE_LIMIT:
        text = text[:LOG_LINE_LIMIT] + f"...[{len(text)} chars, truncated]"
    return text


class RedactingFilter(logging.Filter):
    """Applies :func:`redact` to every record of the server's access and error logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections ``fsrecrypt serve`` holds, and how long it waits for a request."""

    max_connections: int = 1000
    max_connections_per_client: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 30.0


FD_HEADROOM = 128
"""Descriptors kept free beside the connections: database pool, store and key
clients, log files, and connections accepted in one loop turn before older
ones are closed."""


def raise_nofile_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; return the soft limit.

    Why: the default soft limit (often 1024) is what made the server log
    "Too many open files" and stop accepting anyone; the hard limit is what
    the administrator granted (systemd LimitNOFILE=).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limits(playback: Any, *, nofile: int, reserved: int) -> ConnectionLimits:
    """The configured limits, with max_connections lowered to fit the open-files limit."""
    room = nofile - FD_HEADROOM - reserved
    if room < 1:
        raise ConfigError(
            f"the open-files limit ({nofile}) leaves no room for connections",
            hint="Raise LimitNOFILE= in the systemd unit (or ulimit -n).",
        )
    wanted = playback.max_connections
    if wanted > room:
        log.warning(
            "open-files limit %d allows %d connections, not the configured %d; lowered",
            nofile,
            room,
            wanted,
        )
    total = min(wanted, room)
    return ConnectionLimits(
        max_connections=total,
        max_connections_per_client=min(playback.max_connections_per_client, total),
        header_timeout=playback.header_timeout,
        idle_timeout=playback.idle_timeout,
    )


_BUSY_BODY = json.dumps(
    {
        "error": {
            "code": "too_many_connections",
            "message": "the server holds its maximum of connections",
            "hint": "Retry in a moment.",
        }
    }
).encode("ascii")
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode("ascii")
    + b"\r\n\r\n"
    + _BUSY_BODY
)


class Handler(WSGIHandler):  # type: ignore[misc]
    """gevent's WSGI handler: typed errors cut the connection, request deadlines, redacted log.

    Deadlines: a new connection must deliver its request line and headers
    within ``header_timeout`` seconds, a kept-alive one within ``idle_timeout``
    of its previous response (slow-header clients cannot hold a connection).
    While it waits for a request the connection is evictable (see
    :class:`LimitedServer`); from the end of its headers to the end of its
    response it is busy and never evicted.
    """

    _deadline: Any = None
    _served = 0

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        if isinstance(v, FsrecryptError):
            # Already logged and audited by the app: drop the connection
            # (nothing, or a body shorter than its Content-Length, went out).
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def handle(self) -> None:
        try:
            super().handle()
        except gevent.Timeout as timeout:
            if timeout is not self._deadline:
                raise
            # the request did not arrive in time; the socket is closed already
        finally:
            self._stop_deadline()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()

    def read_requestline(self) -> str:
        limits = getattr(self.server, "limits", None)
        if limits is not None:
            self.server.connection_waiting(True)
            seconds = limits.idle_timeout if self._served else limits.header_timeout
            self._stop_deadline()
            self._deadline = gevent.Timeout(seconds)
            self._deadline.start()
        try:
            line = super().read_requestline()
        except BaseException:
            self._stop_deadline()
            raise
        if not line:
            self._stop_deadline()
        return line  # type: ignore[no-any-return]

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._stop_deadline()
            self._served += 1
            if getattr(self.server, "limits", None) is not None:
                self.server.connection_waiting(False)

    def format_request(self) -> str:
        return redact(super().format_request())


class LimitedServer(WSGIServer):  # type: ignore[misc]
    """gevent's WSGIServer with a cap on connections, per server and per client address.

    A new connection over a cap is admitted by closing a connection that is
    still waiting for its request (from the client holding the most such
    connections, oldest first): slow or idle clients give way, and one
    address (or many addresses) opening thousands of half-sent requests
    cannot keep a legitimate request out. When every connection is busy the
    newcomer gets an immediate 503 instead. Waiting is bounded by the
    handler's header and idle deadlines anyway.
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._live: dict[Any, str] = {}  # greenlet -> client address
        self._per_client: dict[str, int] = {}
        self._waiting: dict[str, dict[Any, None]] = {}  # client -> waiting greenlets
        self.refused = 0
        self.evicted = 0
        self._last_warning = 0.0

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def connection_waiting(self, waiting: bool) -> None:
        """Called by the handler: its connection waits for a request (evictable) or not."""
        me = gevent.getcurrent()
        client = self._live.get(me)
        if client is None:
            return
        queue = self._waiting.setdefault(client, {})
        queue.pop(me, None)
        if waiting:
            queue[me] = None
        elif not queue:
            del self._waiting[client]

    def _forget(self, greenlet: Any) -> None:
        client = self._live.pop(greenlet, None)
        if client is None:
            return
        left = self._per_client.get(client, 1) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)
        queue = self._waiting.get(client)
        if queue is not None:
            queue.pop(greenlet, None)
            if not queue:
                del self._waiting[client]

    def _evict(self, client: str | None) -> bool:
        if client is None:
            if not self._waiting:
                return False
            client = max(self._waiting, key=lambda c: len(self._waiting[c]))
        queue = self._waiting.get(client)
        if not queue:
            return False
        victim = next(iter(queue))
        self._forget(victim)
        victim.kill(block=False)
        self.evicted += 1
        return True

    def _admit(self, client: str) -> bool:
        if self._per_client.get(client, 0) >= self.limits.max_connections_per_client:
            if not self._evict(client):
                return False
        if len(self._live) >= self.limits.max_connections:
            return self._evict(None)
        return True

    def _refuse(self, sock: Any, client: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning(
                "connection limit reached (%d open, %d refused so far); refused %s",
                len(self._live),
                self.refused,
                client,
            )
        with contextlib.suppress(OSError):
            sock.settimeout(1)
            sock.sendall(_BUSY_RESPONSE)
        with contextlib.suppress(OSError):
            sock.close()

    def handle(self, sock: Any, address: Any) -> None:
        client = str(address[0]) if isinstance(address, tuple) and address else "local"
        if not self._admit(client):
            self._refuse(sock, client)
            return
        me = gevent.getcurrent()
        self._live[me] = client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            super().handle(sock, address)
        finally:
            self._forget(me)
            with contextlib.suppress(OSError):
                sock.close()


def make_server(app: Any, config: Any, listen: str | None = None) -> LimitedServer:
    """The playback server (not started) on ``listen`` or [playback] listen, limits applied."""
    nofile = raise_nofile_limit()
    db_pool = max(4, config.pipeline.concurrency + 2)  # as pipeline.Services sizes it
    limits = connection_limits(config.playback, nofile=nofile, reserved=db_pool)
    host, port = split_listen(listen or config.playback.listen)
    access = logging.getLogger("fsrecrypt.web.access")
    errors = logging.getLogger("fsrecrypt.web.error")
    for logger in (access, errors):
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
    return LimitedServer(
        (host, port),
        app,
        handler_class=Handler,
        log=access,
        error_log=errors,
        limits=limits,
    )


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the daemon's field names (``timestamp``, ``level``,
    ``event``), so ``[logging] format = "json"`` means the same for ``serve`` as for ``run``
    and one journald/log-shipper parser reads both."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str, fmt: str = "console") -> None:
    """Logs to stderr: JSON lines when ``[logging] format = "json"``, else plain text."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def run_server(
    config: Config, listen: str | None = None, *, listening: Callable[[str], None]
) -> None:
    """``fsrecrypt serve``: serve until SIGTERM/SIGINT, then drain for shutdown_grace seconds.

    ``listen`` (HOST:PORT) overrides [playback] listen. The caller must have
    monkey-patched (``gevent.monkey.patch_all``) before importing this
    package. ``listening`` is told the bound URL once the socket is open.
    """
    if listen:
        config = with_overrides(config, playback={"listen": listen})
    configure_logging(config.logging.level, config.logging.format)
    dbmod.enable_gevent()
    services = Services(config)
    try:
        services.db.ping()
        server = make_server(create_app(services), config)
        server.start()
        bound_host, bound_port = server.address[:2]
        listening(f"http://{bound_host}:{bound_port}/")

        def stop() -> None:
            log.info("stopping")
            server.stop(timeout=config.pipeline.shutdown_grace)

        gevent.signal_handler(signal.SIGTERM, stop)
        gevent.signal_handler(signal.SIGINT, stop)
        server.serve_forever()
    finally:
        services.close()
