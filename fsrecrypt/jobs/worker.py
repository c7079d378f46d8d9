"""``fsrecrypt worker``: a gevent process working items of every active job.

Any number run, on any host sharing the database. Shape (one hub):

* ``concurrency`` work greenlets, each claiming a batch (round robin over
  the active jobs), handling it item by item, then the next batch; when no
  item is due they try to write the summary of finished jobs and wait
  ``poll_interval``;
* ``heartbeat``: renews this process's leases every ``heartbeat_interval``
  and re-queues items whose lease ran out (their worker died);
* ``housekeeping``: the lag gauge, and ``anchor_if_due`` (advisory-locked,
  so anchors are written from workers as from daemons).

Every greenlet is supervised as in the daemon: a loop pass failing with an
fsrecrypt error (database away) is retried; five unexpected errors in a row
or a greenlet ending before a stop make the process exit 70 so systemd
starts a fresh one. SIGTERM drains: no new batch is claimed, the item in
hand finishes, unstarted claimed items are handed back at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fsrecrypt import db
from fsrecrypt.config import Config
from fsrecrypt.errors import FsrecryptError
from fsrecrypt.jobs.runner import ItemEvent, JobWorker, reap_dead_local
from fsrecrypt.lifecycle.anchors import anchor_if_due
from fsrecrypt.logs import configure_logging, get_logger
from fsrecrypt.pipeline import Services

LOOP_CRASH_LIMIT = 5
EXIT_GREENLET_DIED = 70
HOUSEKEEPING_INTERVAL = 15.0
ANCHOR_CHECK_INTERVAL = 60.0


class WorkerMetrics:
    """The worker's Prometheus series (names are an interface: dashboards use them)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.items = Counter(
            "fsrecrypt_job_items",
            "Job items finished, by kind and state",
            ["kind", "state"],
            registry=r,
        )
        self.in_flight = Gauge(
            "fsrecrypt_job_items_in_flight",
            "Items claimed by this worker, not yet finished",
            registry=r,
        )
        self.lag = Gauge(
            "fsrecrypt_job_lag_seconds",
            "Age of the oldest due queued item of an active job",
            registry=r,
        )
        self.lost = Counter(
            "fsrecrypt_job_leases_lost",
            "Outcomes not recorded: the lease had moved on",
            registry=r,
        )
        self.loop_errors = Counter(
            "fsrecrypt_job_loop_errors",
            "Loop passes that failed unexpectedly",
            ["greenlet"],
            registry=r,
        )


class Worker:
    def __init__(self, config: Config, *, concurrency: int | None = None) -> None:
        self.config = config
        self.concurrency = concurrency or config.jobs.concurrency
        self.services = Services(config)
        self.metrics = WorkerMetrics()
        self.log = get_logger("fsrecrypt.worker")
        self.jobs = JobWorker(
            self.services,
            on_item=self._on_item,
            warn=lambda why: self.log.warning("worker.job_skipped", reason=why),
        )
        self.stopping = gevent.event.Event()
        self.exit_code = 0
        self._next_anchor = 0.0

    # --- per item -------------------------------------------------------
    def _on_item(self, ev: ItemEvent) -> None:
        state = "requeued" if ev.requeued else ev.outcome.state
        self.metrics.items.labels(ev.job.kind, state).inc()
        if not ev.recorded:
            self.metrics.lost.inc()
        self.metrics.in_flight.set(self.jobs.in_flight)
        self.log.info(
            "job_item",
            job=ev.job.id,
            kind=ev.job.kind,
            seq=ev.item.seq,
            state=state,
            message=ev.outcome.message[:300],
            attempt=ev.item.attempts,
            seconds=round(ev.seconds, 3),
            recorded=ev.recorded,
            worker=self.jobs.worker,
        )

    # --- loops ------------------------------------------------------------
    def _work_pass(self) -> bool:
        if self.jobs.work_batch(None, self.stopping.is_set):
            return True
        for job_id in self.services.db.active_job_ids():
            if self.jobs.try_finish(job_id):
                self.log.info("job_finished", job=job_id, worker=self.jobs.worker)
        return False

    def _heartbeat_pass(self) -> bool:
        self.jobs.heartbeat()
        return False

    def _housekeeping_pass(self) -> bool:
        self.metrics.lag.set(self.services.db.oldest_queued_age())
        self.metrics.in_flight.set(self.jobs.in_flight)
        if self.config.audit.anchoring and time.monotonic() >= self._next_anchor:
            self._next_anchor = time.monotonic() + ANCHOR_CHECK_INTERVAL
            receipt = anchor_if_due(self.services, user_id="fsrecrypt-worker")
            if receipt is not None:
                self.log.info("worker.anchor_written", seq=receipt.seq, sha256=receipt.sha256)
        return False

    def _loop(self, name: str, one_pass: Callable[[], bool], interval: float) -> None:
        """``one_pass`` until a stop: again at once while busy, else after ``interval``."""
        crashes = 0
        while not self.stopping.is_set():
            busy = False
            try:
                busy = one_pass()
                crashes = 0
            except FsrecryptError as exc:
                crashes = 0
                self.log.warning("worker.loop_pass_failed", greenlet=name, error=exc.one_line())
            except Exception as exc:  # counted; the supervisor acts on a streak
                crashes += 1
                self.metrics.loop_errors.labels(name).inc()
                self.log.exception(
                    "worker.loop_pass_crashed", greenlet=name, error=repr(exc), consecutive=crashes
                )
                if crashes >= LOOP_CRASH_LIMIT:
                    raise
            if not busy:
                self.stopping.wait(interval)

    def _supervise(self, name: str, greenlet: Any) -> Any:
        def ended(g: Any) -> None:
            if self.stopping.is_set():
                return
            exc = g.exception
            reason = f"{type(exc).__name__}: {exc}" if exc is not None else "returned"
            self.log.error("worker.greenlet_died", greenlet=name, error=reason[:300])
            self.exit_code = EXIT_GREENLET_DIED
            self.request_stop(f"greenlet {name} died")

        greenlet.link(ended)
        return greenlet

    def request_stop(self, why: str = "SIGTERM") -> None:
        if not self.stopping.is_set():
            self.log.info("worker.stopping", reason=why)
            self.stopping.set()

    # --- the process ---------------------------------------------------------
    def run(self) -> int:
        gevent.signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        cfg = self.config.jobs
        if cfg.metrics_listen:
            host, _, port = cfg.metrics_listen.rpartition(":")
            try:
                start_http_server(int(port), addr=host.strip("[]"), registry=self.metrics.registry)
            except OSError as exc:
                self.log.error(
                    "worker.metrics_unavailable", listen=cfg.metrics_listen, error=str(exc)
                )
        try:
            released = reap_dead_local(self.services)
        except FsrecryptError as exc:
            self.log.warning("worker.startup_reap_failed", error=exc.one_line())
            released = 0
        self.log.info(
            "worker.started",
            worker=self.jobs.worker,
            concurrency=self.concurrency,
            released_dead_local=released,
        )
        work = [
            self._supervise(
                f"work-{n}",
                gevent.spawn(self._loop, f"work-{n}", self._work_pass, cfg.poll_interval),
            )
            for n in range(self.concurrency)
        ]
        others = [
            self._supervise(
                "heartbeat",
                gevent.spawn(self._loop, "heartbeat", self._heartbeat_pass, cfg.heartbeat_interval),
            ),
            self._supervise(
                "housekeeping",
                gevent.spawn(
                    self._loop, "housekeeping", self._housekeeping_pass, HOUSEKEEPING_INTERVAL
                ),
            ),
        ]
        self.stopping.wait()
        grace = self.config.pipeline.shutdown_grace
        gevent.joinall(work, timeout=grace)
        gevent.killall([g for g in work + others if not g.dead], timeout=5)
        try:
            self.services.db.release_job_items([self.jobs.worker])
        except FsrecryptError as exc:
            self.log.warning("worker.release_failed", error=exc.one_line())
        self.services.close()
        self.log.info("worker.stopped", exit_code=self.exit_code)
        return self.exit_code


def run_worker(config: Config, *, concurrency: int | None = None) -> int:
    """``fsrecrypt worker``: serve until stopped (the caller monkey-patched first)."""
    db.enable_gevent()
    configure_logging(config.logging.level, config.logging.format)
    return Worker(config, concurrency=concurrency).run()
