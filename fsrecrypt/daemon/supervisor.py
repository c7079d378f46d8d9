"""The arbiter of ``fsrecrypt run``: start the parts, supervise them, reload, drain, exit.

Shape of the process (one gevent hub, no threads of our own):

* :class:`~fsrecrypt.daemon.esl.EventSource` reads FreeSWITCH's event stream
  and hands each event to :meth:`~fsrecrypt.daemon.events.EventHandler.on_event`
  in its dispatcher greenlet (never in the socket reader, so reading and
  liveness probes go on meanwhile).
* ``concurrency`` worker greenlets take :class:`~fsrecrypt.daemon.jobs.Job`\\ s
  from the :class:`~fsrecrypt.daemon.jobs.JobQueue` and run
  :meth:`~fsrecrypt.daemon.jobs.JobRunner.attempt`. Every frame yields to the
  hub, so a 10-minute WAV never stalls the ESL reader or the liveness probe.
* The ``sweeper`` loop (:mod:`fsrecrypt.daemon.sweep`) resumes what no event
  announced; the ``housekeeping`` loop (:mod:`fsrecrypt.daemon.health`)
  writes the heartbeat; the ``watchdog`` loop feeds systemd.

Every long-lived greenlet is supervised: one that ends before a stop was
requested makes the daemon record it in the heartbeat, stop feeding the
watchdog, drain and exit with :data:`EXIT_GREENLET_DIED`, so systemd starts a
fresh process instead of a half-alive one reporting itself healthy.

Why the order of operations is safe: the plaintext is deleted by
``store_recording`` only after the ``stored`` row is committed, so a crash at
any instant leaves either a pending row (resumed), a stored row with the file
still present (the sweep finishes the deletion), or nothing yet (the sweep
adopts the file).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from fsrecrypt import db
from fsrecrypt.config import Config, load_config
from fsrecrypt.daemon.esl import EslSettings, EventSource
from fsrecrypt.daemon.eslsub import recording_subscription
from fsrecrypt.daemon.events import EventHandler
from fsrecrypt.daemon.health import HEARTBEAT_INTERVAL, Heartbeat
from fsrecrypt.daemon.jobs import JobQueue, JobRunner, backoff, renew_claims
from fsrecrypt.daemon.metrics import start_metrics_server
from fsrecrypt.daemon.runtime import Runtime
from fsrecrypt.daemon.sweep import Sweeper
from fsrecrypt.daemon.systemd import watchdog_interval
from fsrecrypt.errors import DatabaseError, FsrecryptError
from fsrecrypt.logs import configure_logging, get_logger
from fsrecrypt.pipeline import Services

# A periodic loop whose pass fails with an unexpected (non-fsrecrypt) error this
# many times in a row is broken, not unlucky: it stops and the daemon exits.
LOOP_CRASH_LIMIT = 5
# Exit status when a supervised greenlet died (EX_SOFTWARE): non-zero, so
# systemd's Restart=on-failure starts a fresh process.
EXIT_GREENLET_DIED = 70


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


def pause(
    stopping: gevent.event.Event,
    wake: gevent.event.Event,
    since: float,
    interval: Callable[[], float],
) -> None:
    """Wait until ``interval()`` after ``since``, re-reading it whenever ``wake`` is set (SIGHUP).

    So a new interval counts from the last pass: shortened below the time
    already waited, the next pass runs at once; lengthened, it waits on.
    """
    while not stopping.is_set():
        wake.clear()
        remaining = since + interval() - time.monotonic()
        if remaining <= 0:
            return
        gevent.wait([stopping, wake], timeout=remaining, count=1)


def interval_or_now(run_now: set[str], name: str, interval: float) -> float:
    """``interval``, or 0 once after ``name`` was put in ``run_now`` (run its pass now)."""
    if name in run_now:
        run_now.discard(name)
        return 0.0
    return interval


def lease_pass(rt: Runtime, run_now: set[str], wakes: dict[str, gevent.event.Event]) -> None:
    """Renew this daemon's claims; sweep now when another daemon's claims ran out."""
    if renew_claims(rt):
        run_now.add("sweeper")
        wakes.setdefault("sweeper", gevent.event.Event()).set()


class Daemon:
    """Composes the parts (jobs, events, sweep, heartbeat) and supervises their greenlets."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.rt = Runtime(config, config_path)
        self.jobs = JobQueue(self.rt)
        self.runner = JobRunner(self.rt, self.jobs)
        self.handler = EventHandler(self.rt, self.jobs)
        self.sweeper = Sweeper(self.rt, self.jobs)
        self.failures: list[dict[str, Any]] = []  # supervised greenlets that died
        self.heartbeat = Heartbeat(self.rt, self.jobs, self.failures)
        self.events: EventSource | None = None
        self.exit_code = 0
        self._greenlets: list[Any] = []
        self._workers: list[Any] = []
        self._supervised: dict[str, Any] = {}
        # One per periodic loop, set by SIGHUP: the loop re-reads its interval at once.
        self._wakes: dict[str, gevent.event.Event] = {}
        self._run_now: set[str] = set()

    @property
    def config(self) -> Config:
        return self.rt.config

    @property
    def services(self) -> Services:
        return self.rt.services

    # --- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, drain, return the exit code."""
        rt, cfg = self.rt, self.rt.config
        rt.notifier.notify("STATUS=starting")
        gevent.signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        if not startup_checks(self.rt):
            rt.services.close()
            return 0
        fs = cfg.freeswitch
        subscription = recording_subscription(masks=cfg.pci.track_masks)
        settings = EslSettings(
            host=fs.host,
            port=fs.port,
            password=fs.resolved_password(),
            connect_timeout=fs.connect_timeout,
            command_timeout=fs.command_timeout,
            liveness_interval=fs.liveness_interval,
            backoff_cap=fs.backoff_cap,
            events=subscription.events,
            filters=subscription.filters,
        )
        self.events = EventSource(settings, self.handler.on_event, self.heartbeat.on_esl_state)
        self.heartbeat.events = self.events
        gevent.signal_handler(signal.SIGHUP, self.reload)
        metrics_thread = start_metrics_server(rt.metrics, cfg.metrics.listen, rt.log)
        self._workers = [
            self._supervise(f"worker-{n}", gevent.spawn(self.jobs.worker_loop, self.runner.attempt))
            for n in range(cfg.pipeline.concurrency)
        ]
        self._greenlets = [
            self._spawn_loop(
                "sweeper",
                self.sweeper.sweep_pass,
                lambda: interval_or_now(
                    self._run_now, "sweeper", self.rt.config.pipeline.sweep_interval
                ),
            ),
            self._spawn_loop(
                "housekeeping", self.heartbeat.housekeeping_pass, lambda: HEARTBEAT_INTERVAL
            ),
            self._spawn_loop(
                "leases",
                lambda: lease_pass(self.rt, self._run_now, self._wakes),
                lambda: self.rt.config.jobs.heartbeat_interval,
            ),
        ]
        watchdog = watchdog_interval()
        if watchdog is not None:
            self._greenlets.append(
                self._spawn_loop("watchdog", self._watchdog_pass, lambda: watchdog)
            )
        if metrics_thread is not None:
            # prometheus_client serves from a thread (a greenlet once patched):
            # a watcher that outlives it tells the supervisor when it is gone.
            self._greenlets.append(self._supervise("metrics", gevent.spawn(metrics_thread.join)))
        self.events.start()
        for name, greenlet in self.events.greenlets().items():
            self._supervise(name, greenlet)
        rt.notifier.notify("READY=1", "STATUS=running")
        rt.log.info(
            "daemon.started",
            pid=os.getpid(),
            worker=rt.worker,
            concurrency=cfg.pipeline.concurrency,
            recordings_dirs=list(fs.recordings_dirs),
            store=cfg.storage.backend,
            keys=cfg.keys.provider,
        )
        rt.stopping.wait()
        return self._drain()

    def request_stop(self, signame: str = "SIGTERM") -> None:
        """Stop taking events; the main greenlet drains and exits."""
        rt = self.rt
        if rt.stopping.is_set():
            return
        rt.log.info("daemon.stopping", signal=signame, grace=rt.config.pipeline.shutdown_grace)
        rt.notifier.notify("STOPPING=1", "STATUS=stopping")
        rt.stopping.set()

    def _drain(self) -> int:
        """Finish in-flight jobs up to ``shutdown_grace``; queued jobs stay pending rows."""
        rt = self.rt
        if self.events is not None:
            self.events.stop(timeout=2.0)
        self.handler.finish_intake(timeout=2.0)
        for g in self._greenlets:
            g.kill(block=False)
        # Queued jobs are not started: their rows stay pending for the next run.
        left = self.jobs.drop_queued(len(self._workers))
        deadline = time.monotonic() + rt.config.pipeline.shutdown_grace
        for w in self._workers:
            w.join(max(0.0, deadline - time.monotonic()))
        unfinished = [w for w in self._workers if not w.dead]
        gevent.killall(unfinished, block=True, timeout=5)
        self.heartbeat.write(state="stopped")  # "failed" wins when a greenlet died
        rt.services.close()
        rt.log.info(
            "daemon.stopped",
            left_pending=left,
            interrupted=len(unfinished),
            exit_code=self.exit_code,
        )
        return self.exit_code

    def reload(self) -> None:
        """SIGHUP: re-read the config, re-open logs, apply what can change at runtime.

        Reloadable: logging, retry policy, sweep/quiet periods, shutdown grace,
        default tenant. Connection settings, stores and concurrency need a
        restart (they are logged as ignored if they changed).
        """
        rt = self.rt
        try:
            new = load_config(rt.config_path)
        except FsrecryptError as exc:
            rt.log.error("daemon.reload_failed", error=exc.one_line())
            return
        configure_logging(new.logging.level, new.logging.format)
        old = rt.config
        fs_keep = {
            k: getattr(old.freeswitch, k)
            for k in (
                "host",
                "port",
                "password",
                "password_file",
                "connect_timeout",
                "command_timeout",
                "liveness_interval",
                "backoff_cap",
            )
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
            name
            for name in ("database", "keys", "storage")
            if getattr(new, name) != getattr(old, name)
        ]
        if new.pipeline.concurrency != old.pipeline.concurrency:
            ignored.append("pipeline.concurrency")
        rt.set_config(merged)
        # A sleeping loop would otherwise keep the old interval until it
        # wakes (a sweep_interval of 300 s lowered to 10 s: 300 s later).
        for wake in self._wakes.values():
            wake.set()
        rt.log.info("daemon.reloaded", source=new.source, needs_restart=ignored)

    # --- supervision --------------------------------------------------------------------

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
        rt = self.rt
        if rt.stopping.is_set():
            return  # ended by the drain: expected
        exc = greenlet.exception
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "returned unexpectedly"
        reason = reason[:300]
        self.failures.append({"greenlet": name, "error": reason, "time": time.time()})
        self.exit_code = EXIT_GREENLET_DIED
        rt.log.error(
            "daemon.greenlet_died",
            greenlet=name,
            error=reason,
            hint="The daemon stops and exits non-zero so systemd restarts it.",
        )
        self.heartbeat.write()
        rt.notifier.notify(f"STATUS=failed: greenlet {name} died ({reason})")
        self.request_stop(f"greenlet {name} died")

    def _spawn_loop(
        self, name: str, one_pass: Callable[[], None], interval: Callable[[], float]
    ) -> Any:
        return self._supervise(name, gevent.spawn(self._loop, name, one_pass, interval))

    def _loop(self, name: str, one_pass: Callable[[], None], interval: Callable[[], float]) -> None:
        """Run ``one_pass`` every ``interval()`` seconds until a stop is requested.

        One failing pass never ends the loop: fsrecrypt's own errors (a
        database or store outage) are expected and simply retried next time;
        anything else is logged with its traceback and counted. Only
        LOOP_CRASH_LIMIT unexpected failures in a row raise LoopBroken, which
        the supervisor turns into a restart.
        """
        rt = self.rt
        crashes = 0
        while not rt.stopping.is_set():
            try:
                one_pass()
                crashes = 0
            except FsrecryptError as exc:
                crashes = 0
                rt.log.warning("daemon.loop_pass_failed", greenlet=name, error=exc.one_line())
            except Exception as exc:
                crashes += 1
                rt.metrics.loop_errors.labels(name).inc()
                rt.log.exception(
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
            wake = self._wakes.setdefault(name, gevent.event.Event())
            pause(rt.stopping, wake, time.monotonic(), interval)

    def _watchdog_pass(self) -> None:
        """Feed systemd's watchdog only while every greenlet lives and work moves."""
        rt = self.rt
        if self.failures:
            rt.log.error("daemon.watchdog_withheld", failed=[f["greenlet"] for f in self.failures])
        elif self.jobs.progress_ok():
            rt.notifier.notify("WATCHDOG=1")
        else:
            rt.log.error(
                "daemon.watchdog_withheld",
                stalled_for=round(time.monotonic() - self.jobs.last_progress, 1),
            )


def startup_checks(rt: Runtime) -> bool:
    """Fail fast on what cannot heal by waiting (schema, config), then release stale claims.

    A database that is merely down is waited for (with backoff), because
    systemd restarting us in a loop helps nobody. Returns False when a
    stop was requested while waiting.
    """
    attempt = 0
    while not rt.stopping.is_set():
        try:
            rt.services.db.ping()
            released = rt.services.db.release_claims(rt.worker_prefix)
            break
        except DatabaseError as exc:
            if not exc.transient:
                raise
            delay = backoff(attempt, 1.0, 30.0)
            attempt += 1
            rt.log.warning("daemon.database_unavailable", error=str(exc), retry_in=round(delay, 2))
            rt.notifier.notify(f"STATUS=waiting for PostgreSQL: {exc}")
            rt.stopping.wait(delay)
    else:
        return False
    if released:
        rt.log.info("daemon.released_stale_claims", rows=released)
    # Build the key provider before events are taken: for aws-kms-hierarchy
    # that imports the Material Providers Library (~0.7 s of CPU), which
    # would otherwise stall the loop under the first recordings. No I/O.
    _ = rt.services.keys
    return True


def run_daemon(config: Config, config_path: str | None = None) -> int:
    """``fsrecrypt run``: serve until stopped; returns the process's exit code.

    The caller has monkey-patched (gevent) before importing this package.
    A fatal typed error (schema, config) is logged as ``daemon.fatal`` and raised.
    """
    db.enable_gevent()
    configure_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config, config_path)
    try:
        return daemon.run()
    except FsrecryptError as exc:
        get_logger().error("daemon.fatal", error=exc.one_line())
        raise
