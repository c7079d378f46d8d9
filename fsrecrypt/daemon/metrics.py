"""The daemon's Prometheus series and the ``/metrics`` endpoint.

The names are part of the interface (dashboards and alerts use them): change
none without a release note.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """The Prometheus series, on a registry of our own (no process-global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.recordings = Counter(
            "fsrecrypt_recordings", "Recordings handled, by outcome", ["outcome"], registry=r
        )
        self.bytes = Counter("fsrecrypt_plaintext_bytes", "Plaintext bytes stored", registry=r)
        self.stage = Histogram(
            "fsrecrypt_stage_seconds",
            "Latency per stage (queue wait, encrypt+upload, RECORD_STOP to stored)",
            ["stage"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.queue_depth = Gauge("fsrecrypt_queue_depth", "Jobs queued or running", registry=r)
        self.oldest_pending = Gauge(
            "fsrecrypt_oldest_pending_seconds", "Age of the oldest pending row", registry=r
        )
        self.esl_connected = Gauge(
            "fsrecrypt_esl_connected", "1 while the Event Socket is up", registry=r
        )
        self.reconnects = Gauge("fsrecrypt_esl_reconnects", "ESL reconnects so far", registry=r)
        self.refused = Counter(
            "fsrecrypt_refused_events",
            "Events refused (path safety, bad event)",
            ["reason"],
            registry=r,
        )
        self.retries = Counter("fsrecrypt_retries", "Transient failures retried", registry=r)
        self.swept = Counter(
            "fsrecrypt_swept_files", "Orphan files adopted by the sweep", registry=r
        )
        self.mask_events = Counter(
            "fsrecrypt_mask_events",
            "RECORD_START and mask/unmask events, by outcome (stored, start, "
            "unknown-recording, too-many, malformed, not-recorded)",
            ["outcome"],
            registry=r,
        )
        self.mask_verdicts = Counter(
            "fsrecrypt_mask_verdicts",
            "Stored recordings with a mask announced, by verdict (verified: every span is "
            "digital silence in the audio; unverified: not)",
            ["verdict"],
            registry=r,
        )
        self.loop_errors = Counter(
            "fsrecrypt_loop_errors",
            "Passes of a periodic loop that failed unexpectedly",
            ["greenlet"],
            registry=r,
        )


def start_metrics_server(metrics: Metrics, listen: str, log: Any) -> Any:
    """Serve ``metrics`` on ``listen`` (HOST:PORT); returns the serving thread, or None.

    An empty ``listen`` means no endpoint. A port that cannot be bound is
    logged and the daemon runs on without it: storing recordings matters more
    than being scraped.
    """
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    try:
        _server, thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=metrics.registry
        )
    except OSError as exc:
        log.error("daemon.metrics_unavailable", listen=listen, error=str(exc))
        return None
    log.info("daemon.metrics_listening", listen=listen)
    return thread
