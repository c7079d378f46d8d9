"""Creating a job from a stream of items, and working items: claim, handle, record.

``JobWorker`` is the one piece both front ends share: the command that
created a job works it in-process through :func:`run_job` (a heartbeat
thread renews its leases), and ``fsrecrypt worker`` runs several of its
loops as greenlets over every active job. An item is claimed in a batch
under a lease, handled by its kind, and its outcome recorded with a
compare-and-set on the lease holder; an item whose worker died is put back
by whoever reaps next (every heartbeat), so nothing waits for more than one
lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fsrecrypt.config import JobsConfig
from fsrecrypt.db.jobs import Job, JobItem
from fsrecrypt.errors import ConfigError, DatabaseError, FsrecryptError
from fsrecrypt.jobs.kinds import FinishedJob, JobContext, JobKind, Outcome, job_kind
from fsrecrypt.pipeline import Services, worker_id

_log = logging.getLogger("fsrecrypt.jobs")

ProgressCallback = Callable[[int, int], None]
# How long a command working its own job waits out a database outage before failing.
OUTAGE_PATIENCE = 300.0


@dataclass(frozen=True)
class ItemEvent:
    """One item's outcome, for the log line, the metrics and the progress bar."""

    job: Job
    item: JobItem
    outcome: Outcome
    seconds: float
    recorded: bool  # False: the lease was lost (another worker owns the item now)
    requeued: bool = False


def create_job(
    services: Services,
    kind: str,
    params: Mapping[str, Any],
    items: Iterable[Mapping[str, Any]],
    *,
    user_id: str,
) -> Job:
    """Create a job of ``kind`` whose items are the payloads ``items`` yields, streamed.

    ``items`` is consumed lazily and inserted in batches (a generator over a
    paginated listing keeps memory flat). If producing items fails the job is
    cancelled with the error and the error re-raised.
    """
    job_kind(kind)
    db = services.db
    job = db.create_job(kind, params, user_id)
    try:
        db.add_job_items(job.id, items)
    except BaseException as exc:
        with contextlib.suppress(FsrecryptError):
            db.abandon_job(job.id, f"creating its items failed: {type(exc).__name__}: {exc}")
        raise
    return db.seal_job(job.id)


class JobWorker:
    """Claims, handles and records items for one process (thread/greenlet safe)."""

    def __init__(
        self,
        services: Services,
        *,
        settings: JobsConfig | None = None,
        worker: str | None = None,
        on_item: Callable[[ItemEvent], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.services = services
        self.warn = warn or _log.warning
        self.settings = settings or services.config.jobs
        self.worker = worker or worker_id()
        self.on_item = on_item
        self.in_flight = 0
        self._kinds: dict[int, tuple[JobContext, JobKind]] = {}
        self._lock = threading.Lock()
        self._next_job = 0
        self._unknown: set[int] = set()
        self._held: set[tuple[int, int]] = set()

    # --- leases -------------------------------------------------------
    def heartbeat(self) -> int:
        """Renew my leases and take over expired ones (call every heartbeat_interval)."""
        with self._lock:
            held = list(self._held)
        renewed = self.services.db.renew_job_leases(self.worker, self.settings.lease_seconds, held)
        self.services.db.reap_job_leases(self.settings.max_attempts)
        return renewed

    # --- working --------------------------------------------------------
    def work_batch(self, job_ids: list[int] | None = None, stop: Callable[[], bool] = bool) -> int:
        """Claim one batch (from the next job with due items) and work it; 0 if none was due."""
        db = self.services.db
        candidates = job_ids if job_ids is not None else db.active_job_ids()
        if not candidates:
            return 0
        with self._lock:
            start = self._next_job % len(candidates)
            self._next_job += 1
        for job_id in candidates[start:] + candidates[:start]:
            if not self._knows(job_id):
                continue
            items = db.claim_job_items(
                job_id,
                self.worker,
                limit=self.settings.batch_size,
                lease_seconds=self.settings.lease_seconds,
            )
            if items:
                return self._work(job_id, items, stop)
        return 0

    def _work(self, job_id: int, items: list[JobItem], stop: Callable[[], bool]) -> int:
        with self._lock:
            self._held.update((i.job_id, i.seq) for i in items)
        self.in_flight += len(items)
        handled = 0
        try:
            ctx, kind = self._context(job_id)
            for item in items:
                if stop():
                    break
                self._one(ctx, kind, item)
                handled += 1
                self._let_go(item)
        finally:
            # Stopped, or the loop failed (database away): hand the unstarted
            # items back; if even that fails they are no longer renewed, so
            # their lease runs out and another worker takes them.
            for unstarted in items[handled:]:
                with contextlib.suppress(FsrecryptError):
                    self.services.db.requeue_job_item(unstarted, self.worker, delay=0, refund=True)
                self._let_go(unstarted)
        return handled

    def _let_go(self, item: JobItem) -> None:
        self.in_flight -= 1
        with self._lock:
            self._held.discard((item.job_id, item.seq))

    def _knows(self, job_id: int) -> bool:
        """False for a job of a kind this version does not know: its items are left alone.

        (A newer fsrecrypt elsewhere may have created it; claiming its items
        here would only hold them under leases nobody can finish.)
        """
        if job_id in self._unknown:
            return False
        try:
            self._context(job_id)
        except ConfigError as exc:
            self._unknown.add(job_id)
            self.warn(f"job {job_id} skipped: {exc.message}")
            return False
        return True

    def _context(self, job_id: int) -> tuple[JobContext, JobKind]:
        with self._lock:
            found = self._kinds.get(job_id)
        if found is None:
            job = self.services.db.job(job_id)
            found = (JobContext(self.services, job, self.worker), job_kind(job.kind))
            with self._lock:
                found = self._kinds.setdefault(job_id, found)
        return found

    def _one(self, ctx: JobContext, kind: JobKind, item: JobItem) -> None:
        started = time.monotonic()
        max_attempts = kind.max_attempts or self.settings.max_attempts
        requeue_in: float | None = None
        try:
            outcome = kind.handle(ctx, dict(item.payload))
            if not isinstance(outcome, Outcome):
                raise TypeError(f"{kind.name}.handle returned {type(outcome).__name__}")
        except FsrecryptError as exc:
            message = f"{type(exc).__name__}: {exc.message}"
            retry = kind.retry_transient or isinstance(exc, DatabaseError)  # never the item's fault
            if exc.transient and retry and item.attempts < max_attempts:
                requeue_in = min(300.0, 2.0**item.attempts)
            outcome = Outcome("failed", message)
        except Exception as exc:  # noqa: BLE001 - contained: one bad item never stops the loop
            _log.exception("job %s item %s: unexpected error", ctx.job.id, item.seq)
            outcome = Outcome("failed", f"internal error: {type(exc).__name__}")
        if requeue_in is not None:
            recorded = self._record(
                lambda: self.services.db.requeue_job_item(
                    item, self.worker, delay=requeue_in, message=outcome.message
                )
            )
        else:
            recorded = self._record(
                lambda: self.services.db.finish_job_item(
                    item, self.worker, outcome.state, outcome.message, outcome.result
                )
            )
        if self.on_item is not None:
            self.on_item(
                ItemEvent(
                    ctx.job,
                    item,
                    outcome,
                    time.monotonic() - started,
                    recorded,
                    requeued=requeue_in is not None,
                )
            )

    def _record(self, write: Callable[[], bool]) -> bool:
        """Write an outcome, retrying while the database is away (up to half a lease).

        If it stays away the item keeps its lease until that runs out; then
        another worker does it again, and the kind's compare-and-set writes
        find it done.
        """
        deadline = time.monotonic() + self.settings.lease_seconds / 2
        delay = 0.2
        while True:
            try:
                return write()
            except DatabaseError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # --- finishing -------------------------------------------------------
    def try_finish(self, job_id: int) -> bool:
        """Write the job's summary if nothing is left and nobody else is writing it."""
        db = self.services.db
        job = db.claim_job_finish(job_id, self.worker, self.settings.lease_seconds * 4)
        if job is None:
            return False
        ctx, kind = self._context(job_id)
        ctx.job = job
        finished = FinishedJob(job, db.job_counts(job_id), lambda: db.iter_job_items(job_id))
        error = None
        try:
            result = kind.finish(ctx, finished)
        except FsrecryptError as exc:
            error = f"{type(exc).__name__}: {exc.message}"
            result = dict(finished.counts)
        db.complete_job(job_id, self.worker, result, error)
        with self._lock:
            self._kinds.pop(job_id, None)
        return True


def run_job(
    services: Services,
    job_id: int,
    *,
    progress: ProgressCallback | None = None,
    settings: JobsConfig | None = None,
    stop: threading.Event | None = None,
) -> Job:
    """Work a job in this process until it is finished (or cancelled); return its final row.

    Workers elsewhere may take items of the same job meanwhile: progress
    counts everyone's work, and this process waits for items others hold
    (or takes them over when their lease runs out) before the summary.
    """
    stop = stop or threading.Event()
    db = services.db
    last: list[tuple[int, int]] = []

    def report(_event: ItemEvent | None = None) -> None:
        if progress is None:
            return
        counts = db.job_counts(job_id)
        now = (counts["done"] + counts["failed"] + counts["skipped"], counts["total"])
        if not last or now != last[0]:
            last[:] = [now]
            progress(*now)

    worker = JobWorker(services, settings=settings, on_item=report)
    with contextlib.suppress(DatabaseError):
        reap_dead_local(services)
    beat = threading.Thread(target=_beat, args=(worker, stop), daemon=True, name="job-heartbeat")
    beat.start()

    def step() -> bool:
        """One batch, or one look at the job when none was due; True once it is over."""
        if worker.work_batch([job_id], stop.is_set):
            return False
        report()
        if not db.job(job_id).active:
            return True
        if not worker.try_finish(job_id):
            stop.wait(min(worker.settings.poll_interval, 1.0))
            db.reap_job_leases(worker.settings.max_attempts)
            reap_dead_local(services)
        return False

    outage_since: float | None = None
    try:
        report()
        while not stop.is_set():
            try:
                if step():
                    break
                outage_since = None
            except DatabaseError:
                # PostgreSQL restarting: keep trying (the pool reconnects) for a while.
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > OUTAGE_PATIENCE:
                    raise
                stop.wait(1.0)
    finally:
        stop.set()
        beat.join(timeout=5)
        # Interrupted (Ctrl-C, an error): hand back what this process still holds.
        with contextlib.suppress(FsrecryptError):
            db.release_job_items([worker.worker])
    report()
    return db.job(job_id)


def reap_dead_local(services: Services) -> int:
    """Re-queue items held by processes of THIS host that no longer exist.

    A lease names ``host:pid:nonce``; a command killed and run again on the
    same host need not wait a lease for its own dead items.
    """
    prefix = f"{socket.gethostname()}:"
    dead = []
    for holder in services.db.job_item_holders(prefix):
        pid_text = holder[len(prefix) :].split(":", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            dead.append(holder)
    return services.db.release_job_items(dead) if dead else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _beat(worker: JobWorker, stop: threading.Event) -> None:
    while not stop.wait(worker.settings.heartbeat_interval):
        try:
            worker.heartbeat()
        except FsrecryptError as exc:  # the next beat tries again
            _log.warning("job heartbeat failed: %s", exc)
