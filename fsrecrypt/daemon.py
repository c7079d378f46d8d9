"""``fsrecrypt run``: the arbiter that turns every RECORD_STOP into a stored recording.

Shape of the process (one gevent hub, no threads of our own):

* :class:`~fsrecrypt.esl.EventSource` reads FreeSWITCH's event stream and
  hands each event to :meth:`Daemon.on_event` in its dispatcher greenlet.
  The handler classifies the event, vets the path (lstat before any open),
  writes the idempotent ``pending`` row (so a crash keeps the event's tenant)
  and queues a job; it runs in the ESL dispatcher greenlet, never in the
  socket reader, so reading and liveness probes go on meanwhile.
* ``concurrency`` worker greenlets take jobs and run
  :func:`~fsrecrypt.pipeline.store_recording`. The file is read and encrypted
  frame by frame and every frame yields to the hub (``on_chunk``), so a
  10-minute WAV never stalls the ESL reader or the liveness probe; S3, KMS and
  PostgreSQL I/O is cooperative through monkey-patching and psycogreen.
* Transient failures retry with capped exponential backoff and jitter; after
  ``max_attempts`` the row is ``failed`` and the plaintext stays.
* The sweeper resumes ``pending`` rows and adopts finished files no row
  covers, at start and every ``sweep_interval``: that is why a kill -9, a
  lost event or a daemon that was down loses nothing. The database, not
  this process's memory, is the queue of record.

Why the order of operations is safe: the plaintext is deleted by
``store_recording`` only after the ``stored`` row is committed, so a crash at
any instant leaves either a pending row (resumed), a stored row with the file
still present (the sweep finishes the deletion), or nothing yet (the sweep
adopts the file).

This module is named in ``cli.LAZY_COMMANDS``: it imports only click, the
standard library and light fsrecrypt modules at top level. gevent, boto3,
psycopg2, structlog and prometheus_client are imported inside functions, and
``run`` monkey-patches before anything imports boto3 or psycopg2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fsrecrypt.cli import State, config_option
from fsrecrypt.config import Config, load_config
from fsrecrypt.errors import (
    DatabaseError,
    FsrecryptError,
    InputFileError,
    InvalidState,
    PathRefused,
    SourceIncomplete,
    UnknownTenant,
)

if TYPE_CHECKING:  # pragma: no cover
    from fsrecrypt.db import Recording, Tenant
    from fsrecrypt.esl import Event, EventSource
    from fsrecrypt.pipeline import Services

STATUS_SUBCLASS = "fsrecrypt::status"
HEARTBEAT_INTERVAL = 5.0
STATUS_EVENT_INTERVAL = 30.0
LEASE_SECONDS = 600.0
ORPHAN_UPLOAD_AGE = 3600.0
SWEEP_BATCH = 1000
# A periodic loop whose pass fails with an unexpected (non-fsrecrypt) error this
# many times in a row is broken, not unlucky: it stops and the daemon exits.
LOOP_CRASH_LIMIT = 5
# Exit status when a supervised greenlet died (EX_SOFTWARE): non-zero, so
# systemd's Restart=on-failure starts a fresh process.
EXIT_GREENLET_DIED = 70


class UnexpectedJobError(FsrecryptError):
    """A job failed with an exception fsrecrypt does not map (a bug or an unknown library error).

    Treated as transient so the job is retried up to ``max_attempts``; the
    plaintext stays until a retry succeeds.
    """

    hint = "The job will be retried; the full traceback is in the daemon's log."
    transient = True


class LoopBroken(FsrecryptError):
    """A periodic loop failed with unexpected errors LOOP_CRASH_LIMIT passes in a row.

    Raised out of the loop so its greenlet dies and the supervisor ends the
    process with EXIT_GREENLET_DIED: a restart is more likely to heal a
    wedged client or connection than retrying forever while half alive.
    """

    hint = (
        "The daemon exits so systemd restarts it; the tracebacks of each failed pass "
        "are in its log."
    )


# --- logging -------------------------------------------------------------------------


def configure_logging(level: str, fmt: str) -> None:
    """structlog to stdout (journald adds time and unit); JSON or console lines.

    Called again on SIGHUP: the renderer and level are rebuilt and stdout is
    re-resolved, which is what "reopen logs" means for a journald service.
    """
    import logging

    import structlog

    levels = {"debug": 10, "info": 20, "warning": 30, "error": 40}
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(levels[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(levels[level], logging.WARNING), stream=sys.stderr, force=True)


def _log() -> Any:
    import structlog

    return structlog.get_logger("fsrecrypt.daemon")


# --- files ---------------------------------------------------------------------------


def wav_complete(path: str, allowed_dirs: Sequence[str] | None = None) -> bool:
    """True when ``path`` is a WAV whose RIFF and data sizes match the file on disk.

    FreeSWITCH writes a 44-byte placeholder header while recording and fixes
    the sizes when it closes the file, so consistent sizes mean "finished".
    The file is opened by the same descriptor walk as every other read
    (:func:`fsrecrypt.pipeline.open_source`) and judged by the one rule
    (:func:`fsrecrypt.pipeline.wav_state`) the pipeline applies before storing.
    """
    from fsrecrypt.pipeline import open_source

    try:
        source = open_source(path, allowed_dirs)
    except (FsrecryptError, OSError):
        return False
    try:
        return source.wav_state == "complete"
    finally:
        source.close()


def open_by_others(roots: Sequence[str]) -> set[str]:
    """Paths under ``roots`` that some other process holds open (from /proc/*/fd).

    Processes we may not inspect (FreeSWITCH under another user without
    CAP_SYS_PTRACE) are skipped; the quiet period and the WAV header check
    still guard against adopting a file that is being written.
    """
    prefixes = tuple(str(Path(r).resolve()) + os.sep for r in roots)
    me = str(os.getpid())
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefixes):
                found.add(target)
    return found


def iter_candidate_files(roots: Sequence[str]) -> Iterator[tuple[str, os.stat_result]]:
    """Regular, non-hidden files below the recordings directories (symlinks not followed)."""
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield path, st


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of systemd's WATCHDOG_USEC), or None if unset."""
    from fsrecrypt.numbers import NumberError, parse_int

    try:
        usec = parse_int(os.environ.get("WATCHDOG_USEC"), minimum=1)
    except NumberError:
        return None
    return usec / 1e6 / 2


def path_text_problem(path: str) -> str | None:
    """Why ``path`` cannot be handled as text, or None.

    A NUL byte cannot be in a file name at all (the kernel would see a
    different, shorter path), and a name that is not UTF-8 cannot be written
    to PostgreSQL as the row's source path; both are refused up front.
    """
    from fsrecrypt.esl import db_safe_text

    if "\x00" in path:
        return "the path contains a NUL byte"
    if db_safe_text(path) != path:
        return "the path is not valid UTF-8, so it cannot be recorded in the database"
    return None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter on the upper half (never below base/2)."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return max(base / 2, ceiling / 2 + random.random() * ceiling / 2)  # noqa: S311


# --- jobs ----------------------------------------------------------------------------


@dataclass
class Job:
    """One recording to store: from an event (``tenant_name``) or a row (``recording_id``)."""

    path: str
    tenant_name: str | None = None
    recording_id: str | None = None
    call_uuid: str | None = None
    core_uuid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    received: float = field(default_factory=time.monotonic)
    attempts: int = 0
    origin: str = "event"


class Metrics:
    """The Prometheus series, on a registry of our own (no process-global state)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "fsrecrypt_refused_events", "Events refused (path safety, bad event)", ["reason"],
            registry=r,
        )
        self.retries = Counter("fsrecrypt_retries", "Transient failures retried", registry=r)
        self.swept = Counter("fsrecrypt_swept_files", "Orphan files adopted by the sweep",
                             registry=r)
        self.loop_errors = Counter(
            "fsrecrypt_loop_errors",
            "Passes of a periodic loop that failed unexpectedly",
            ["greenlet"],
            registry=r,
        )


# --- the daemon ----------------------------------------------------------------------


class Daemon:
    """Owns the event source, the worker pool, the sweeper and the housekeeping greenlets."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        import gevent.event
        import gevent.queue

        from fsrecrypt.pipeline import Services, host_worker_prefix, worker_id

        self.config = config
        self.config_path = config_path
        self.services: Services = Services(config)
        self.worker = worker_id()
        self.worker_prefix = host_worker_prefix()
        self.log = _log()
        self.metrics = Metrics()
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.busy: set[str] = set()  # paths queued, running or waiting for a retry
        self.running = 0
        self.stopping = gevent.event.Event()
        self.stopped = gevent.event.Event()
        self.refused_paths: set[tuple[str, str]] = set()  # unknown tenant: never adopt
        self.last_progress = time.monotonic()
        self.started_at = time.time()
        self.counts: dict[str, int] = {}
        self.events: EventSource | None = None
        self._greenlets: list[Any] = []
        self._workers: list[Any] = []
        self._notifier: Any = None
        self._supervised: dict[str, Any] = {}
        self.failures: list[dict[str, Any]] = []  # supervised greenlets that died
        self.exit_code = 0
        self._last_status_event = 0.0
        self._last_abort = float("-inf")

    # --- lifecycle ----------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, drain, return the exit code."""
        import gevent

        from fsrecrypt.esl import EslSettings, EventSource

        cfg = self.config
        self._notify("STATUS=starting")
        gevent.signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        if not self._startup_checks():
            self.services.close()
            return 0
        fs = cfg.freeswitch
        settings = EslSettings(
            host=fs.host,
            port=fs.port,
            password=fs.resolved_password(),
            connect_timeout=fs.connect_timeout,
            command_timeout=fs.command_timeout,
            liveness_interval=fs.liveness_interval,
            backoff_cap=fs.backoff_cap,
        )
        self.events = EventSource(settings, self.on_event, self.on_esl_state)
        gevent.signal_handler(signal.SIGHUP, self.reload)
        metrics_thread = self._start_metrics_server()
        self._workers = [
            self._supervise(f"worker-{n}", gevent.spawn(self._worker_loop, n))
            for n in range(cfg.pipeline.concurrency)
        ]
        self._greenlets = [
            self._supervise("sweeper", gevent.spawn(self._sweep_loop)),
            self._supervise("housekeeping", gevent.spawn(self._housekeeping_loop)),
        ]
        if watchdog_interval() is not None:
            self._greenlets.append(self._supervise("watchdog", gevent.spawn(self._watchdog_loop)))
        if metrics_thread is not None:
            # prometheus_client serves from a thread (a greenlet once patched):
            # a watcher that outlives it tells the supervisor when it is gone.
            self._greenlets.append(self._supervise("metrics", gevent.spawn(metrics_thread.join)))
        self.events.start()
        for name, greenlet in self.events.greenlets().items():
            self._supervise(name, greenlet)
        self._notify("READY=1", "STATUS=running")
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            worker=self.worker,
            concurrency=cfg.pipeline.concurrency,
            recordings_dirs=list(fs.recordings_dirs),
            store=cfg.storage.backend,
            keys=cfg.keys.provider,
        )
        self.stopping.wait()
        return self._drain()

    # --- supervision (the arbiter's part) --------------------------------------------

    def _supervise(self, name: str, greenlet: Any) -> Any:
        """Watch a long-lived greenlet: it may end only after a stop was requested.

        Like gunicorn's arbiter watching its workers, but the remedy is the
        process's, not the greenlet's: a half-alive daemon (events no longer
        handled, the sweep gone) must not keep reporting itself healthy, so
        the death is logged, written to the heartbeat (``fsrecrypt health``
        names it), the watchdog is no longer fed, and the daemon drains and
        exits with EXIT_GREENLET_DIED so systemd restarts it.
        """
        self._supervised[name] = greenlet
        greenlet.link(lambda g: self._greenlet_ended(name, g))
        return greenlet

    def _greenlet_ended(self, name: str, greenlet: Any) -> None:
        if self.stopping.is_set():
            return  # ended by the drain: expected
        exc = greenlet.exception
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "returned unexpectedly"
        reason = reason[:300]
        self.failures.append({"greenlet": name, "error": reason, "time": time.time()})
        self.exit_code = EXIT_GREENLET_DIED
        self.log.error(
            "daemon.greenlet_died",
            greenlet=name,
            error=reason,
            hint="The daemon stops and exits non-zero so systemd restarts it.",
        )
        self._write_heartbeat()
        self._notify(f"STATUS=failed: greenlet {name} died ({reason})")
        self.request_stop(f"greenlet {name} died")

    def _loop(self, name: str, one_pass: Callable[[], None], interval: Callable[[], float]) -> None:
        """Run ``one_pass`` every ``interval()`` seconds until a stop is requested.

        One failing pass never ends the loop: fsrecrypt's own errors (a
        database or store outage) are expected and simply retried next time;
        anything else is logged with its traceback and counted. Only
        LOOP_CRASH_LIMIT unexpected failures in a row raise LoopBroken, which
        the supervisor turns into a restart.
        """
        crashes = 0
        while not self.stopping.is_set():
            try:
                one_pass()
                crashes = 0
            except FsrecryptError as exc:
                crashes = 0
                self.log.warning("daemon.loop_pass_failed", greenlet=name, error=exc.one_line())
            except Exception as exc:
                crashes += 1
                self.metrics.loop_errors.labels(name).inc()
                self.log.exception(
                    "daemon.loop_pass_crashed",
                    greenlet=name,
                    error=repr(exc),
                    consecutive=crashes,
                    limit=LOOP_CRASH_LIMIT,
                )
                if crashes >= LOOP_CRASH_LIMIT:
                    raise LoopBroken(
                        f"the {name} loop failed {crashes} times in a row "
                        f"(last: {type(exc).__name__})"
                    ) from exc
            self.stopping.wait(interval())

    def _startup_checks(self) -> bool:
        """Fail fast on what cannot heal by waiting (schema, config), then release stale claims.

        A database that is merely down is waited for (with backoff), because
        systemd restarting us in a loop helps nobody. Returns False when a
        stop was requested while waiting.
        """

        attempt = 0
        while not self.stopping.is_set():
            try:
                self.services.db.ping()
                released = self.services.db.release_claims(self.worker_prefix)
                break
            except DatabaseError as exc:
                if not exc.transient:
                    raise
                delay = backoff(attempt, 1.0, 30.0)
                attempt += 1
                self.log.warning("daemon.database_unavailable", error=str(exc),
                                 retry_in=round(delay, 2))
                self._notify(f"STATUS=waiting for PostgreSQL: {exc}")
                self.stopping.wait(delay)
        else:
            return False
        if released:
            self.log.info("daemon.released_stale_claims", rows=released)
        return True

    def request_stop(self, signame: str = "SIGTERM") -> None:
        """Stop taking events; the main greenlet drains and exits."""
        if self.stopping.is_set():
            return
        self.log.info("daemon.stopping", signal=signame,
                      grace=self.config.pipeline.shutdown_grace)
        self._notify("STOPPING=1", "STATUS=stopping")
        self.stopping.set()

    def _drain(self) -> int:
        """Finish in-flight jobs up to ``shutdown_grace``; queued jobs stay pending rows."""
        import gevent

        if self.events is not None:
            self.events.stop(timeout=2.0)
        for g in self._greenlets:
            g.kill(block=False)
        # Queued jobs are not started: their rows stay pending for the next run.
        left = self.queue.qsize()
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in self._workers:
            self.queue.put(None)
        deadline = time.monotonic() + self.config.pipeline.shutdown_grace
        for w in self._workers:
            w.join(max(0.0, deadline - time.monotonic()))
        unfinished = [w for w in self._workers if not w.dead]
        gevent.killall(unfinished, block=True, timeout=5)
        self._write_heartbeat(state="stopped")  # "failed" wins when a greenlet died
        self.services.close()
        self.log.info(
            "daemon.stopped",
            left_pending=left,
            interrupted=len(unfinished),
            exit_code=self.exit_code,
        )
        self.stopped.set()
        return self.exit_code

    def reload(self) -> None:
        """SIGHUP: re-read the config, re-open logs, apply what can change at runtime.

        Reloadable: logging, retry policy, sweep/quiet periods, shutdown grace,
        default tenant. Connection settings, stores and concurrency need a
        restart (they are logged as ignored if they changed).
        """
        try:
            new = load_config(self.config_path)
        except FsrecryptError as exc:
            self.log.error("daemon.reload_failed", error=exc.one_line())
            return
        configure_logging(new.logging.level, new.logging.format)
        old = self.config
        fs_keep = {
            k: getattr(old.freeswitch, k)
            for k in ("host", "port", "password", "password_file", "connect_timeout",
                      "command_timeout", "liveness_interval", "backoff_cap")
        }
        pipeline = dataclasses.replace(new.pipeline, concurrency=old.pipeline.concurrency)
        merged = dataclasses.replace(
            old,
            logging=new.logging,
            pipeline=pipeline,
            freeswitch=dataclasses.replace(new.freeswitch, **fs_keep),
            metrics=dataclasses.replace(new.metrics, listen=old.metrics.listen),
        )
        ignored = [
            name for name in ("database", "keys", "storage")
            if getattr(new, name) != getattr(old, name)
        ]
        if new.pipeline.concurrency != old.pipeline.concurrency:
            ignored.append("pipeline.concurrency")
        self.config = merged
        self.services.config = merged
        self.log.info("daemon.reloaded", source=new.source, needs_restart=ignored)

    # --- systemd --------------------------------------------------------------------

    def _notify(self, *lines: str) -> None:
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        if self._notifier is None:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        self._notifier.notify("\n".join(lines))

    def progress_ok(self) -> bool:
        """Is work moving? Idle counts as healthy; a backlog with no attempt finishing doesn't."""
        stall_limit = max(300.0, 2 * self.config.pipeline.shutdown_grace)
        idle = self.running == 0 and self.queue.empty()
        return idle or time.monotonic() - self.last_progress < stall_limit

    def _watchdog_loop(self) -> None:
        interval = watchdog_interval() or 1.0
        self._loop("watchdog", self._watchdog_pass, lambda: interval)

    def _watchdog_pass(self) -> None:
        """Feed systemd's watchdog only while every greenlet lives and work moves."""
        if self.failures:
            self.log.error(
                "daemon.watchdog_withheld", failed=[f["greenlet"] for f in self.failures]
            )
        elif self.progress_ok():
            self._notify("WATCHDOG=1")
        else:
            self.log.error(
                "daemon.watchdog_withheld",
                stalled_for=round(time.monotonic() - self.last_progress, 1),
            )

    # --- observability ------------------------------------------------------------------

    def _start_metrics_server(self) -> Any:
        """Start the /metrics endpoint; returns its serving thread (None when not serving)."""
        listen = self.config.metrics.listen
        if not listen:
            return None
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        try:
            _server, thread = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.metrics.registry
            )
        except OSError as exc:
            self.log.error("daemon.metrics_unavailable", listen=listen, error=str(exc))
            return None
        self.log.info("daemon.metrics_listening", listen=listen)
        return thread

    def _write_heartbeat(self, state: str = "running", esl_connected: bool | None = None) -> None:
        path = self.config.metrics.heartbeat_file
        if not path:
            return
        doc = {
            "pid": os.getpid(),
            "time": time.time(),
            "state": "failed" if self.failures else state,
            "failures": self.failures,
            "esl_connected": (
                bool(self.events and self.events.connected)
                if esl_connected is None
                else esl_connected
            ),
            "queue": self.queue.qsize() + self.running,
            "progress_ok": self.progress_ok(),
            "started_at": self.started_at,
            "counts": self.counts,
        }
        tmp = f"{path}.tmp"
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except OSError as exc:
            self.log.warning("daemon.heartbeat_failed", path=path, error=exc.strerror)

    def _housekeeping_loop(self) -> None:
        """Heartbeat, gauges and the CUSTOM status event, every few seconds."""
        self._loop("housekeeping", self._housekeeping_pass, lambda: HEARTBEAT_INTERVAL)

    def _housekeeping_pass(self) -> None:
        self._write_heartbeat()
        depth = self.queue.qsize() + self.running
        self.metrics.queue_depth.set(depth)
        if self.events is not None:
            self.metrics.reconnects.set(self.events.reconnects)
        try:
            age = self.services.db.oldest_pending_age()
            self.metrics.oldest_pending.set(age)
        except FsrecryptError:
            age = -1.0
        if time.monotonic() - self._last_status_event >= STATUS_EVENT_INTERVAL:
            if self._send_status_event(depth, age):
                self._last_status_event = time.monotonic()
        self._notify(
            f"STATUS=running; queue {depth}; esl "
            f"{'up' if self.events and self.events.connected else 'down'}; "
            f"stored {self.counts.get('stored', 0)}"
        )

    def _send_status_event(self, depth: int, age: float) -> bool:
        if self.events is None or not self.events.connected:
            return False
        headers = {
            "FSRecrypt-State": "stopping" if self.stopping.is_set() else "running",
            "FSRecrypt-PID": str(os.getpid()),
            "FSRecrypt-Queue-Depth": str(depth),
            "FSRecrypt-Oldest-Pending-Seconds": f"{age:.0f}",
            "FSRecrypt-Stored": str(self.counts.get("stored", 0)),
            "FSRecrypt-Failed": str(self.counts.get("failed", 0)),
        }
        try:
            self.events.send_event(STATUS_SUBCLASS, headers)
        except (FsrecryptError, ValueError) as exc:
            self.log.warning("daemon.status_event_failed", error=str(exc))
            return False
        return True

    def on_esl_state(self, state: str) -> None:
        self.metrics.esl_connected.set(1 if state == "connected" else 0)
        if state in ("connected", "disconnected"):
            # `fsrecrypt health` reads the heartbeat: let it see the change now,
            # not at the next periodic write.
            self._write_heartbeat(esl_connected=state == "connected")
        if state == "connected" and self.events is not None:
            import gevent

            self.metrics.reconnects.set(self.events.reconnects)
            gevent.spawn(self._send_status_event, self.queue.qsize() + self.running, 0.0)

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.metrics.recordings.labels(outcome).inc()

    def _refuse(self, reason: str, **fields: Any) -> None:
        self.metrics.refused.labels(reason).inc()
        self.counts["refused"] = self.counts.get("refused", 0) + 1
        self.log.warning("event.refused", reason=reason, **fields)

    # --- tenants ----------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant:
        """Looked up for every recording, never cached: `fsrecrypt rotate` switches a
        tenant's key "at once", and a cached row would keep wrapping with the old key."""
        return self.services.db.tenant_by_name(name)

    def tenant_by_id(self, tenant_id: str) -> Tenant:
        return self.services.db.tenant_by_id(tenant_id)

    def _tenant_exists(self, name: str) -> bool:
        try:
            self.tenant(name)
        except UnknownTenant:
            return False
        return True

    # --- events -----------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Handle one event (runs in the ESL dispatcher); a failure is this event's alone.

        Whatever handling one event raises (a library error on a hostile
        value, a bug) refuses that event: counted as ``internal-error`` in
        ``fsrecrypt_refused_events``, one log line with the traceback, and the
        dispatcher goes on with the next event. The file is left untouched.
        """
        try:
            self._handle_event(event)
        except Exception as exc:
            self.metrics.refused.labels("internal-error").inc()
            self.counts["refused"] = self.counts.get("refused", 0) + 1
            self.log.error(
                "event.refused",
                reason="internal-error",
                event_name=getattr(event, "name", None),
                error_type=type(exc).__name__,
                error=repr(exc)[:500],
                exc_info=exc,
            )

    def _handle_event(self, event: Event) -> None:
        """Classify one event and turn it into a row and a job."""
        from fsrecrypt.errors import EventError
        from fsrecrypt.esl import classify_record_stop

        if self.stopping.is_set() or event.name != "RECORD_STOP":
            return
        fs = self.config.freeswitch
        try:
            rs = classify_record_stop(event, fs.tenant_variable, fs.consent_variable)
        except EventError as exc:
            self._refuse("bad-event", error=str(exc))
            return
        tenant_name = rs.tenant or fs.default_tenant
        base = {"call_uuid": rs.call_uuid, "core_uuid": rs.core_uuid, "cause": rs.cause}
        problem = path_text_problem(rs.path)
        if problem is not None:
            self._refuse("path", error=f"refusing {rs.path!r}: {problem}", **base)
            return
        if rs.sanitised:
            # Kept, not refused: the recording must still be encrypted. The
            # row says which values were altered (NUL or non-UTF-8 bytes).
            self.log.warning("event.values_sanitised", fields=list(rs.sanitised), **base)
        metadata: dict[str, Any] = {
            "consent": rs.consent,
            "completion_cause": rs.cause,
            "record_ms": rs.record_ms,
            "channel_uuid": rs.channel_uuid,
            "event_sequence": rs.event_seq,
            "event_timestamp": rs.event_timestamp,
        }
        if rs.sanitised:
            metadata["sanitised_fields"] = list(rs.sanitised)
        if rs.disposition == "remote":
            self._count("out-of-scope")
            self.log.info("event.out_of_scope", reason="not a local file (URL path)", **base)
            return
        if not tenant_name:
            self._count("unknown-tenant")
            self.log.error("event.no_tenant", path=rs.path,
                           hint="Set the channel variable or [freeswitch] default_tenant; "
                                "the file was left in place.", **base)
            return
        if rs.disposition in ("discarded", "uri-failure"):
            self._record_terminal(rs, tenant_name, metadata, base)
            return
        try:
            self._vet_path(rs.path)
        except PathRefused as exc:
            self._refuse("path", error=str(exc), **base)
            return
        except (OSError, RuntimeError, ValueError) as exc:
            # e.g. a self-looping symlink (RuntimeError from Path.resolve) or
            # a rename racing realpath (EINVAL): unresolvable means refused.
            self._refuse(
                "path",
                error=f"refusing {rs.path!r}: cannot resolve it ({type(exc).__name__})",
                **base,
            )
            return
        job = Job(path=rs.path, tenant_name=tenant_name, call_uuid=rs.call_uuid,
                  core_uuid=rs.core_uuid, metadata=metadata)
        if job.path not in self.busy:
            self._register_early(job)
        self.submit(job)

    def _register_early(self, job: Job) -> None:
        """Write the pending row now, so a crash before the job runs keeps the event's tenant.

        Without the row, a file whose job was lost (kill -9) could only be
        adopted by the sweep, which knows just the default tenant. Any
        failure here is left to the job, which registers (idempotently) itself.
        """
        from fsrecrypt.pipeline import open_source

        try:
            source = open_source(job.path, self.config.freeswitch.recordings_dirs)
        except FsrecryptError:
            return
        try:
            # The tenant is resolved inside the INSERT (one statement, no
            # separate lookup): the key is read later, when the job claims.
            recording, _created = self.services.db.create_pending_for_tenant_name(
                tenant_name=job.tenant_name or "", source_path=source.path,
                source_fingerprint=source.fingerprint, call_uuid=job.call_uuid,
                core_uuid=job.core_uuid, metadata=job.metadata,
            )
            job.recording_id = recording.id
        except FsrecryptError:
            return
        finally:
            source.fileobj.close()

    def _hold_for_tenant(self, job: Job, exc: UnknownTenant) -> None:
        """Keep an unknown tenant's file out of the sweep's default-tenant adoption.

        The file stays where it is; the database remembers whose it is, so a
        restarted daemon does not store it under the default tenant, and the
        sweep stores it for its own tenant once that tenant is added.
        """
        from fsrecrypt.pipeline import fingerprint_of

        try:
            st = os.lstat(job.path)
            self.services.db.hold_unassigned(
                source_path=job.path, source_fingerprint=fingerprint_of(st),
                tenant_name=job.tenant_name or "", reason=exc.one_line(),
                call_uuid=job.call_uuid, core_uuid=job.core_uuid, metadata=job.metadata,
            )
        except (OSError, FsrecryptError) as err:
            # Not persisted: at least this process never adopts it.
            self.refused_paths.add((job.path, "*"))
            self.log.warning("job.unassigned_not_recorded", path=job.path, error=str(err))

    def _vet_path(self, path: str) -> None:
        """Refuse without opening: outside the directories, '..', NUL, symlinks, non-regular.

        The directories are walked by descriptor exactly as ``open_source``
        does (no name is resolved), so nothing here can be raced or looped.
        """
        from fsrecrypt.pipeline import vet_path

        vet_path(path, self.config.freeswitch.recordings_dirs)

    def _record_terminal(
        self, rs: Any, tenant_name: str, metadata: dict[str, Any], base: dict[str, Any]
    ) -> None:
        """Discarded (FreeSWITCH deleted the file) or uri-failure (file still open): a row only.

        The fingerprint names the event, not a file (there is none to read),
        so a replayed event finds the same row and is never retried.
        """
        discarded = rs.disposition == "discarded"
        status = "discarded" if discarded else "failed"
        fingerprint = f"{'absent' if discarded else 'uri-failure'}:{rs.core_uuid}:{rs.path}"
        error = None if discarded else (
            "uri-failure: FreeSWITCH reported the recording failed before the file was "
            "closed; the file was not read and was left in place"
        )
        try:
            tenant = self.tenant(tenant_name)
            self.services.db.create_pending(
                tenant_id=tenant.id, source_path=rs.path, source_fingerprint=fingerprint,
                call_uuid=rs.call_uuid, core_uuid=rs.core_uuid, metadata=metadata,
                status=status, last_error=error,
            )
        except UnknownTenant as exc:
            self._count("unknown-tenant")
            self.log.error("event.unknown_tenant", tenant=tenant_name, error=exc.one_line(), **base)
            return
        except FsrecryptError as exc:
            self.log.error("event.row_failed", disposition=rs.disposition, error=exc.one_line(),
                           **base)
            return
        outcome = "discarded" if discarded else "uri-failure"
        self._count(outcome)
        self.log.info("recording", outcome=outcome, tenant=tenant_name, **base)

    # --- the pool ------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job unless its file is already queued, running or waiting to retry."""
        if self.stopping.is_set() or job.path in self.busy:
            return False
        self.busy.add(job.path)
        self.queue.put(job)
        self.metrics.queue_depth.set(self.queue.qsize() + self.running)
        return True

    def _worker_loop(self, n: int) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.running += 1
            keep_busy = False
            try:
                keep_busy = self._attempt(job)
            except Exception as exc:  # a bug must not kill the worker
                self.log.exception("job.crashed", error=repr(exc))
            finally:
                self.running -= 1
                self.last_progress = time.monotonic()
                if not keep_busy:
                    self.busy.discard(job.path)

    def _attempt(self, job: Job) -> bool:
        """One try at a job; returns True when a retry was scheduled (path stays busy)."""
        import gevent

        from fsrecrypt.pipeline import open_source, register_source, store_recording

        started = time.monotonic()
        self.metrics.stage.labels("queue").observe(started - job.received)
        cfg = self.config
        recording: Recording | None = None
        claimed: Recording | None = None
        tenant_label = job.tenant_name
        try:
            if job.recording_id is not None:
                # Fast path: claim the row and read its tenant (the key as of
                # now, so rotation still takes effect at once) in one statement.
                pair = self.services.db.claim_with_tenant(
                    job.recording_id, self.worker, LEASE_SECONDS
                )
                if pair is not None:
                    claimed, tenant = pair
                    recording = claimed
                else:
                    # Stored (finish the deletion), leased elsewhere, or gone:
                    # look at the row the ordinary way.
                    recording = self.services.db.recording(job.recording_id)
                    if recording.status not in ("pending", "failed", "stored"):
                        return False
                    tenant = self.tenant_by_id(recording.tenant_id)
            else:
                tenant = self.tenant(job.tenant_name or "")
            tenant_label = tenant.name
            try:
                source = open_source(job.path, cfg.freeswitch.recordings_dirs)
            except InputFileError as exc:
                if recording is not None and recording.status != "stored":
                    self.services.db.record_attempt_failure(recording.id, exc.one_line(),
                                                            final=True)
                    self._count("failed")
                    self.log.error("recording", outcome="failed", recording_id=recording.id,
                                   tenant=tenant_label, error=exc.one_line())
                elif recording is None:
                    self._count("missing-file")
                    self.log.error("recording", outcome="missing-file", tenant=tenant_label,
                                   call_uuid=job.call_uuid, error=exc.one_line())
                return False
            try:
                if recording is None:
                    recording, _created = register_source(
                        self.services, source, tenant, call_uuid=job.call_uuid,
                        core_uuid=job.core_uuid, metadata=job.metadata,
                    )
                    job.recording_id = recording.id
                if recording.status not in ("pending", "failed", "stored"):
                    return False
                if recording.status == "stored" and (
                    not cfg.pipeline.delete_plaintext
                    or source.fingerprint != recording.source_fingerprint
                ):
                    # Only the very file that was stored may be deleted; a new
                    # file at the same path is someone else's (the sweep adopts it).
                    return False
                outcome = store_recording(
                    self.services, recording, source, tenant, worker=self.worker,
                    lease_seconds=LEASE_SECONDS, on_chunk=lambda _n: gevent.sleep(0),
                    claimed=claimed,
                )
            finally:
                source.fileobj.close()
        except SourceIncomplete as exc:
            return self._wait_for_complete(job, exc)
        except PathRefused as exc:
            self._refuse("path", error=str(exc), call_uuid=job.call_uuid)
            if recording is not None:
                self.services.db.record_attempt_failure(recording.id, exc.one_line(), final=True)
            return False
        except UnknownTenant as exc:
            self._count("unknown-tenant")
            self._hold_for_tenant(job, exc)
            self.log.error("recording", outcome="unknown-tenant", tenant=job.tenant_name,
                           call_uuid=job.call_uuid, error=exc.one_line())
            return False
        except InvalidState as exc:
            if "another worker" in str(exc):
                return self._retry_later(job, exc, count=False)
            self._fail_final(job, exc, tenant_label)
            return False
        except FsrecryptError as exc:
            if exc.transient:
                return self._retry_later(job, exc)
            self._fail_final(job, exc, tenant_label)
            return False
        except Exception as exc:  # unmapped library errors: retry, bounded by max_attempts
            self.log.exception("job.unexpected_error", error=repr(exc))
            err = UnexpectedJobError(f"unexpected {type(exc).__name__} while storing")
            return self._retry_later(job, err)
        total = time.monotonic() - job.received
        self.metrics.stage.labels("encrypt_upload").observe(time.monotonic() - started)
        self.metrics.stage.labels("total").observe(total)
        result = "already-stored" if outcome.already_stored else "stored"
        self._count(result)
        if outcome.source_changed:
            self._requeue_changed(job, tenant_label)
        self.metrics.bytes.inc(outcome.plaintext_bytes)
        self.log.info(
            "recording",
            outcome=result,
            recording_id=outcome.recording.id,
            tenant=tenant_label,
            call_uuid=outcome.recording.call_uuid,
            bytes=outcome.plaintext_bytes,
            encrypted_bytes=outcome.ciphertext_bytes,
            encrypt_s=round(outcome.encrypt_seconds, 4),
            total_s=round(total, 4),
            attempts=job.attempts + 1,
            plaintext_deleted=outcome.plaintext_deleted,
            origin=job.origin,
        )
        return outcome.source_changed

    def _wait_for_complete(self, job: Job, exc: SourceIncomplete) -> bool:
        """A WAV still being written: retry with backoff, then leave it to the sweep.

        Never counted towards ``failed``: the file is fine, just unfinished.
        After ``max_attempts`` quick retries the row stays pending with a
        later ``next_attempt_at``, so the sweep resumes it (with this tenant)
        instead of a worker waiting on it forever.
        """
        if job.recording_id is None or job.attempts + 1 < self.config.pipeline.max_attempts:
            return self._retry_later(job, exc)
        delay = self.config.pipeline.retry_cap
        try:
            self.services.db.record_attempt_failure(
                job.recording_id, exc.one_line(), final=False, retry_in=delay
            )
        except FsrecryptError as db_exc:
            self.log.warning("job.attempt_not_recorded", error=str(db_exc))
            return self._retry_later(job, exc, count=False)
        self._count("incomplete")
        self.log.warning("recording", outcome="incomplete", recording_id=job.recording_id,
                         tenant=job.tenant_name, call_uuid=job.call_uuid,
                         attempts=job.attempts + 1, resume_in=delay, error=exc.one_line())
        return False

    def _requeue_changed(self, job: Job, tenant: str | None) -> None:
        """The file changed after what was read was stored: keep it and store it again.

        The plaintext was not deleted (it holds bytes that were not stored);
        a fresh job for the same path and tenant registers the file as it is
        now and stores it once it is complete and stable.
        """
        import gevent

        p = self.config.pipeline
        again = Job(path=job.path, tenant_name=tenant, call_uuid=job.call_uuid,
                    core_uuid=job.core_uuid, metadata=dict(job.metadata), origin="changed",
                    attempts=job.attempts + 1)
        delay = backoff(again.attempts, p.retry_base, p.retry_cap)
        self._count("source-changed")
        self.log.warning("recording.source_changed", path=job.path, tenant=tenant,
                         call_uuid=job.call_uuid, retry_in=round(delay, 2),
                         hint="The plaintext was kept; it is stored again once stable.")

        def requeue() -> None:
            if self.stopping.is_set():
                self.busy.discard(job.path)
                return
            self.queue.put(again)

        gevent.spawn_later(delay, requeue)

    def _retry_later(self, job: Job, exc: FsrecryptError, *, count: bool = True) -> bool:
        import gevent

        p = self.config.pipeline
        job.attempts += 1 if count else 0
        # Without a row (the database never took the registration) giving up
        # would leave the file to the sweep, which only knows the default
        # tenant: keep retrying at the capped interval instead.
        final = job.attempts >= p.max_attempts and job.recording_id is not None
        delay = backoff(job.attempts, p.retry_base, p.retry_cap)
        if job.recording_id is not None and count:
            try:
                self.services.db.record_attempt_failure(
                    job.recording_id, exc.one_line(), final=final,
                    retry_in=None if final else delay,
                )
            except FsrecryptError as db_exc:
                # The database is (also) down: keep the schedule in memory.
                self.log.warning("job.attempt_not_recorded", error=str(db_exc))
        if final:
            self._count("failed")
            self.log.error("recording", outcome="failed", recording_id=job.recording_id,
                           tenant=job.tenant_name, call_uuid=job.call_uuid,
                           attempts=job.attempts, error=exc.one_line())
            return False
        if count:
            self.metrics.retries.inc()
        self.log.warning("job.retry", recording_id=job.recording_id, attempt=job.attempts,
                         retry_in=round(delay, 2), error=exc.one_line())

        def requeue() -> None:
            if self.stopping.is_set():
                self.busy.discard(job.path)
                return
            self.queue.put(job)

        gevent.spawn_later(delay, requeue)
        return True

    def _fail_final(self, job: Job, exc: FsrecryptError, tenant: str | None) -> None:
        if job.recording_id is not None:
            with contextlib.suppress(FsrecryptError):
                self.services.db.record_attempt_failure(job.recording_id, exc.one_line(),
                                                        final=True)
        self._count("failed")
        self.log.error("recording", outcome="failed", recording_id=job.recording_id,
                       tenant=tenant, call_uuid=job.call_uuid, error=exc.one_line(),
                       error_type=type(exc).__name__)

    # --- the sweep --------------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        self._loop("sweeper", self._sweep_pass, lambda: self.config.pipeline.sweep_interval)

    def _sweep_pass(self) -> None:
        # Orphaned uploads (a crash mid-multipart) are cleaned at start and then
        # hourly; only those older than ORPHAN_UPLOAD_AGE, so a live upload of
        # another daemon sharing the bucket is never cut.
        due = time.monotonic() - self._last_abort >= ORPHAN_UPLOAD_AGE
        self.sweep(abort_uploads=due)
        if due:
            self._last_abort = time.monotonic()

    def sweep(self, *, abort_uploads: bool = False) -> dict[str, int]:
        """Resume due pending rows, finish stored-but-undeleted files, adopt orphan files."""
        db = self.services.db
        resumed = 0
        from fsrecrypt.pipeline import is_inside

        dirs = self.config.freeswitch.recordings_dirs
        for rec in db.due_pending(limit=SWEEP_BATCH):
            # Rows of other hosts sharing the database are theirs to resume.
            if not is_inside(Path(rec.source_path), dirs):
                continue
            if self.submit(Job(path=rec.source_path, recording_id=rec.id,
                               call_uuid=rec.call_uuid, core_uuid=rec.core_uuid,
                               origin="resume")):
                resumed += 1
        adopted = self._sweep_files()
        aborted = 0
        if abort_uploads:
            try:
                aborted = self.services.store.abort_incomplete_uploads(ORPHAN_UPLOAD_AGE)
            except FsrecryptError as exc:
                self.log.warning("sweep.abort_uploads_failed", error=exc.one_line())
        if resumed or adopted or aborted:
            self.log.info("sweep.done", resumed=resumed, adopted=adopted, aborted_uploads=aborted)
        return {"resumed": resumed, "adopted": adopted, "aborted_uploads": aborted}

    def _sweep_files(self) -> int:
        import gevent

        from fsrecrypt.pipeline import fingerprint_of

        cfg = self.config
        dirs = cfg.freeswitch.recordings_dirs
        now = time.time()
        candidates: list[tuple[str, os.stat_result]] = []
        for path, st in iter_candidate_files(dirs):
            if path in self.busy or now - st.st_mtime < cfg.pipeline.quiet_period:
                continue
            if (path, "*") in self.refused_paths:
                continue
            problem = path_text_problem(path)
            if problem is not None:  # refused once, then never looked at again
                self.refused_paths.add((path, "*"))
                self._refuse("path", error=f"refusing {path!r}: {problem}", origin="sweep")
                continue
            candidates.append((path, st))
            if len(candidates) % 200 == 0:
                gevent.sleep(0)
        if not candidates:
            return 0
        held = open_by_others(dirs)
        adopted = 0
        for i in range(0, len(candidates), 500):
            batch = candidates[i : i + 500]
            rows = self.services.db.rows_for_sources([p for p, _ in batch])
            unassigned = self.services.db.unassigned_for([p for p, _ in batch])
            by_key = {(p, fp): (status, rid) for p, fp, status, rid in rows}
            # A pending row whose file grew since it was registered (its event
            # came while the WAV was being written) is still that row's file.
            pending_inode = {(p, ":".join(fp.split(":")[:2])): rid
                             for p, fp, status, rid in rows if status == "pending"}
            uri_failed = {p for p, fp, status, _ in rows if fp.startswith("uri-failure:")}
            for path, st in batch:
                if os.path.realpath(path) in held or path in uri_failed or path in self.busy:
                    continue
                row = by_key.get((path, fingerprint_of(st)))
                if row is not None:
                    status, rid = row
                    if status == "stored" and cfg.pipeline.delete_plaintext:
                        # Stored, then killed before the unlink: finish the job.
                        self.submit(Job(path=path, recording_id=rid, origin="finish"))
                    continue
                if not wav_complete(path, dirs):
                    continue
                grown = pending_inode.get((path, f"{st.st_dev}:{st.st_ino}"))
                if grown is not None:
                    self.submit(Job(path=path, recording_id=grown, origin="resume"))
                    continue
                waiting = unassigned.get((path, fingerprint_of(st)))
                if waiting is not None:
                    # Its event named a tenant: never the default one. Store it
                    # for that tenant once it exists; until then leave it alone.
                    if self._tenant_exists(waiting["tenant_name"]) and self.submit(
                        Job(path=path, tenant_name=waiting["tenant_name"],
                            call_uuid=waiting["call_uuid"], core_uuid=waiting["core_uuid"],
                            metadata={**waiting["metadata"], "assigned_by": "sweep"},
                            origin="sweep")
                    ):
                        adopted += 1
                        self.metrics.swept.inc()
                    continue
                if not cfg.freeswitch.default_tenant:
                    self.log.warning("sweep.orphan_without_tenant", path=path,
                                     hint="Set [freeswitch] default_tenant to adopt it.")
                    continue
                if self.submit(Job(path=path, tenant_name=cfg.freeswitch.default_tenant,
                                   metadata={"adopted_by": "sweep"}, origin="sweep")):
                    adopted += 1
                    self.metrics.swept.inc()
            gevent.sleep(0)
        return adopted


# --- commands --------------------------------------------------------------------------


@click.command("run")
@config_option
@click.pass_context
def run_command(ctx: click.Context) -> None:
    """Run the daemon: store every recording FreeSWITCH finishes (Ctrl-C/SIGTERM to stop)."""
    # Patch first: boto3/botocore, urllib3 and psycopg2 must see the patched
    # socket/ssl/threading modules, so nothing heavy may be imported before.
    from gevent import monkey

    monkey.patch_all()
    from fsrecrypt import db

    db.enable_gevent()
    state = ctx.ensure_object(State)
    config = state.config
    configure_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config, state.config_path)
    try:
        code = daemon.run()
    except FsrecryptError as exc:
        _log().error("daemon.fatal", error=exc.one_line())
        raise
    ctx.exit(code)


# --- health ------------------------------------------------------------------------------

HEALTHY, DEGRADED, DOWN = 0, 1, 2
_LEVEL_NAME = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}


@dataclass
class Check:
    name: str
    level: int
    detail: str


def _check(name: str, fail_level: int, func: Any) -> Check:
    try:
        detail = func()
        return Check(name, HEALTHY, str(detail or "ok"))
    except FsrecryptError as exc:
        return Check(name, fail_level, exc.one_line())
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not crash
        return Check(name, fail_level, f"{type(exc).__name__}: {exc}")


def run_health(config: Config) -> list[Check]:
    """Every check ``fsrecrypt health`` makes, in order; none raises."""
    from fsrecrypt.pipeline import Services

    services = Services(config)
    checks: list[Check] = []

    def freeswitch() -> str:
        from fsrecrypt.esl import EslSettings, _HardenedESL

        fs = config.freeswitch
        settings = EslSettings(host=fs.host, port=fs.port, password=fs.resolved_password(),
                               connect_timeout=fs.connect_timeout,
                               command_timeout=fs.command_timeout)
        conn = _HardenedESL(settings, lambda _e: None)
        conn.connect()
        try:
            reply = conn.send("api status")
        finally:
            conn.close("health check done")
        first = (reply.body or "").strip().splitlines()
        return first[0] if first else "answered"

    def database() -> str:
        return f"schema version {services.db.ping()}"

    def keys() -> str:
        tenants = services.db.tenants()
        for t in tenants:
            services.keys.check_key(t.kms_key_id)
        return f"{len(tenants)} tenant key(s) usable"

    def store() -> str:
        services.store.check()
        return f"{services.store.name} writable"

    def backlog() -> str:
        age = services.db.oldest_pending_age()
        limit = max(900.0, 3 * config.pipeline.sweep_interval)
        counts = services.db.status_counts()
        if age > limit:
            raise DatabaseError(
                f"oldest pending recording is {age:.0f}s old (limit {limit:.0f}s)",
                hint="Check the daemon's log for failing uploads or a stopped daemon.",
            )
        return f"oldest pending {age:.0f}s; failed {counts.get('failed', 0)}"

    def heartbeat() -> str:
        path = config.metrics.heartbeat_file
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputFileError(
                f"no daemon heartbeat at {path}",
                hint="Start the daemon ('systemctl start fsrecrypt') and check its log.",
            ) from None
        failures = [f for f in doc.get("failures") or [] if isinstance(f, dict)]
        if doc.get("state") == "failed" or failures:
            names = ", ".join(str(f.get("greenlet"))[:40] for f in failures[:5]) or "unknown"
            first = str(failures[0].get("error", ""))[:200] if failures else ""
            raise InvalidState(
                f"daemon pid {doc.get('pid')} lost its {names} greenlet ({first}) and exits "
                "to be restarted",
                hint="Check the daemon's log (journalctl -u fsrecrypt) for the traceback.",
            )
        age = time.time() - float(doc.get("time", 0))
        if doc.get("state") != "running" or age > 6 * HEARTBEAT_INTERVAL:
            raise InputFileError(
                f"daemon heartbeat is {age:.0f}s old (state {doc.get('state')})",
                hint="The daemon is stopped or hung; check 'systemctl status fsrecrypt'.",
            )
        if not doc.get("progress_ok", True):
            raise InvalidState("the daemon has a backlog but no job finished recently",
                               hint="Check the daemon's log for a stuck upload.")
        return f"pid {doc.get('pid')}, {age:.0f}s ago, esl " + (
            "connected" if doc.get("esl_connected") else "disconnected")

    checks.append(_check("freeswitch", DEGRADED, freeswitch))
    checks.append(_check("database", DOWN, database))
    db_ok = checks[-1].level == HEALTHY
    checks.append(_check("keys", DOWN, keys) if db_ok else
                  Check("keys", DOWN, "skipped: database unavailable"))
    checks.append(_check("store", DOWN, store))
    checks.append(_check("backlog", DEGRADED, backlog) if db_ok else
                  Check("backlog", DEGRADED, "skipped: database unavailable"))
    checks.append(_check("heartbeat", DOWN, heartbeat))
    services.close()
    return checks


@click.command("health")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def health_command(ctx: click.Context, as_json: bool) -> None:
    """Check FreeSWITCH, database, keys, store, backlog and the daemon (exit 0/1/2)."""
    config = ctx.ensure_object(State).config
    checks = run_health(config)
    level = max((c.level for c in checks), default=HEALTHY)
    if as_json:
        click.echo(json.dumps({
            "status": _LEVEL_NAME[level],
            "checks": {c.name: {"status": _LEVEL_NAME[c.level], "detail": c.detail}
                       for c in checks},
        }, indent=2))
    else:
        for c in checks:
            click.echo(f"{_LEVEL_NAME[c.level]:9} {c.name:10} {c.detail}")
        click.echo(f"overall: {_LEVEL_NAME[level]}")
    ctx.exit(level)
