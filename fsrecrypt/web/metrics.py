"""The playback server's Prometheus series and their ``/metrics`` listener.

What an operator of ``fsrecrypt serve`` watches: requests by route and status
(errors, refusals), audio bytes streamed, the time to the first body byte
(how long a listener waits after a seek: header, key and first frame), and
authentication failures by reason (a burst of ``invalid_api_key`` or
``token_expired`` is an attack or a broken client). The names are part of
the interface (dashboards and alerts use them): change none without a
release note.

Measured by WSGI middleware around the Flask app, so every answer counts,
errors and refusals included; the route label is the route's operation id
(``streamRecording``...), never the raw path (ids would make one series per
recording). The series are served on ``[playback] metrics_listen``, a port of
their own, never on the API's listener.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ROUTE = "fsrecrypt.route"
AUTH_FAILURE = "fsrecrypt.auth_failure"
STREAM_ROUTES = frozenset({"streamRecording", "downloadRecording"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class ServeMetrics:
    """The series, on a registry of our own (no process-global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "fsrecrypt_http_requests",
            "HTTP requests answered, by route (operation id), method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.streamed = Counter(
            "fsrecrypt_http_streamed_bytes",
            "Decrypted audio bytes sent (stream and download)",
            registry=r,
        )
        self.first_byte = Histogram(
            "fsrecrypt_http_time_to_first_byte_seconds",
            "From the request to its first body byte (a stream: first frame verified)",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.auth_failures = Counter(
            "fsrecrypt_http_auth_failures",
            "Requests refused for their credentials or roles, by reason (error code)",
            ["reason"],
            registry=r,
        )
        self.connections = Gauge(
            "fsrecrypt_http_open_connections", "Connections the server holds", registry=r
        )

    def watch_connections(self, count: Callable[[], int]) -> None:
        self.connections.set_function(count)


class _Measured:
    """The app's response body, passed through; records first byte, bytes and the request."""

    def __init__(self, body: Iterable[bytes], done: Callable[[int, float | None], None]) -> None:
        self._body = body
        self._done = done
        self._sent = 0
        self._first: float | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            if chunk and self._first is None:
                self._first = time.monotonic()
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._sent, self._first)


class MetricsMiddleware:
    """WSGI middleware feeding :class:`ServeMetrics` (the app names the route in ``environ``)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.monotonic()
        status: list[str] = ["500"]

        def recording_start(code: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = code.split(" ", 1)[0]
            return start_response(code, headers, exc_info)

        def done(sent: int, first: float | None) -> None:
            m = self.metrics
            route = str(environ.get(ROUTE) or "unmatched")
            method = environ.get("REQUEST_METHOD", "")
            m.requests.labels(route, method if method in _METHODS else "other", status[0]).inc()
            if first is not None:
                m.first_byte.labels(route).observe(first - started)
            if route in STREAM_ROUTES and sent:
                m.streamed.inc(sent)
            reason = environ.get(AUTH_FAILURE)
            if reason:
                m.auth_failures.labels(str(reason)[:40]).inc()

        try:
            body = self.app(environ, recording_start)
        except BaseException:
            done(0, None)
            raise
        return _Measured(body, done)


def start_metrics_listener(metrics: ServeMetrics, listen: str, log: Any) -> Any:
    """Serve ``/metrics`` on ``listen`` (HOST:PORT); None when off or the port is taken.

    A port that cannot be bound is logged and the server runs on without it:
    serving listeners matters more than being scraped.
    """
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    try:
        _server, thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=metrics.registry
        )
    except OSError as exc:
        log.error("metrics listener %s unavailable: %s", listen, exc)
        return None
    log.info("metrics on http://%s/metrics", listen)
    return thread
