"""Jobs: one recording to store, its attempts, retries with backoff, and the final failure.

Where a RECORD_STOP becomes a stored row: :mod:`fsrecrypt.daemon.events` turns
the event into a :class:`Job`, :class:`JobQueue` hands it to a worker greenlet,
and :meth:`JobRunner.attempt` claims the row and calls
:func:`fsrecrypt.pipeline.store_recording` (``pipeline/ingest.py``: encrypt +
upload -> stored row + audit -> delete plaintext).

Transient failures retry with capped exponential backoff and jitter; after
``max_attempts`` the row is ``failed`` and the plaintext stays, with its next
automatic try scheduled (``failed_retry_base`` doubling up to
``failed_retry_cap``: the sweep resumes it, one attempt each time), so a
failure whose cause is fixed later leaves nothing behind. Every failed
attempt also writes a failed ``encrypt`` audit row. A WAV still being
written is never a failure: it waits, then is left to the sweep.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.queue

from fsrecrypt.daemon.masks import MaskTracker
from fsrecrypt.daemon.runtime import Runtime
from fsrecrypt.db import Recording, Tenant
from fsrecrypt.errors import (
    FsrecryptError,
    InputFileError,
    InvalidState,
    PathRefused,
    SourceIncomplete,
    UnknownTenant,
)
from fsrecrypt.pipeline import StoreOutcome, register_source, store_recording
from fsrecrypt.plaintext import SourceFile, fingerprint_of, open_source


class UnexpectedJobError(FsrecryptError):
    """A job failed with an exception fsrecrypt does not map (a bug or an unknown library error).

    Treated as transient so the job is retried up to ``max_attempts``; the
    plaintext stays until a retry succeeds.
    """

    hint = "The job will be retried; the full traceback is in the daemon's log."
    transient = True


def failed_retry_delay(last_wait: float | None, base: float, cap: float) -> float | None:
    """Seconds until a failed row's next automatic try; None when automatic retry is off.

    ``last_wait``: how long the row waited before the retry that just failed
    (None for its first failure). The first failure waits ``base``; each
    failed retry doubles the wait up to ``cap``, so a lasting fault costs one
    attempt per ``cap`` at most.
    """
    if base <= 0:
        return None
    if last_wait is None or not last_wait > 0:
        return base
    return min(cap, max(base, 2 * min(last_wait, cap)))


def next_failed_retry(rt: Runtime, job: Job) -> float | None:
    """When the row a job just failed for good is tried again (None: only ``fsrecrypt retry``)."""
    p = rt.config.pipeline
    return failed_retry_delay(job.failed_wait, p.failed_retry_base, p.failed_retry_cap)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter on the upper half (never below base/2)."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return max(base / 2, ceiling / 2 + random.random() * ceiling / 2)  # noqa: S311


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
    failed_wait: float | None = None  # a retry of a failed row: how long it had waited


class JobQueue:
    """The pool's queue: each file at most once (queued, running or waiting for a retry)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.busy: set[str] = set()  # paths queued, running or waiting for a retry
        self.running = 0
        self.last_progress = time.monotonic()

    def depth(self) -> int:
        return self.queue.qsize() + self.running

    def submit(self, job: Job) -> bool:
        """Queue a job unless its file is already queued, running or waiting to retry."""
        if self.rt.stopping.is_set() or job.path in self.busy:
            return False
        self.busy.add(job.path)
        self.queue.put(job)
        self.rt.metrics.queue_depth.set(self.depth())
        return True

    def put_later(self, job: Job, delay: float) -> None:
        """Queue ``job`` again after ``delay`` (its path stays busy meanwhile)."""

        def requeue() -> None:
            if self.rt.stopping.is_set():
                self.busy.discard(job.path)
                return
            self.queue.put(job)

        gevent.spawn_later(delay, requeue)

    def progress_ok(self) -> bool:
        """Is work moving? Idle counts as healthy; a backlog with no attempt finishing doesn't."""
        stall_limit = max(300.0, 2 * self.rt.config.pipeline.shutdown_grace)
        idle = self.running == 0 and self.queue.empty()
        return idle or time.monotonic() - self.last_progress < stall_limit

    def worker_loop(self, attempt: Callable[[Job], bool]) -> None:
        """Take jobs until a ``None`` arrives; a job's crash never ends the worker."""
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.running += 1
            keep_busy = False
            try:
                keep_busy = attempt(job)
            except Exception as exc:  # a bug must not kill the worker
                self.rt.log.exception("job.crashed", error=repr(exc))
            finally:
                self.running -= 1
                self.last_progress = time.monotonic()
                if not keep_busy:
                    self.busy.discard(job.path)

    def drop_queued(self, workers: int) -> int:
        """Forget queued jobs (their rows stay pending for the next run); stop ``workers``."""
        left = self.queue.qsize()
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in range(workers):
            self.queue.put(None)
        return left


class JobRunner:
    """One attempt at a job, and what each way it can end means for the row and the file."""

    def __init__(self, rt: Runtime, jobs: JobQueue) -> None:
        self.rt = rt
        self.jobs = jobs
        self.masks = MaskTracker(rt)

    def attempt(self, job: Job) -> bool:
        """One try at a job; returns True when a retry was scheduled (path stays busy)."""
        rt = self.rt
        started = time.monotonic()
        rt.metrics.stage.labels("queue").observe(started - job.received)
        tenant_label = job.tenant_name
        recording: Recording | None = None
        try:
            recording, claimed, tenant = self._claim(job)
            if tenant is None:
                return False
            tenant_label = tenant.name
            try:
                source = open_source(job.path, rt.config.freeswitch.recordings_dirs)
            except InputFileError as exc:
                self._file_gone(job, recording, tenant_label, exc)
                return False
            try:
                if recording is None:
                    recording, _created = register_source(
                        rt.services,
                        source,
                        tenant,
                        call_uuid=job.call_uuid,
                        core_uuid=job.core_uuid,
                        metadata=job.metadata,
                    )
                    job.recording_id = recording.id
                if not self._may_store(recording, source):
                    return False
                outcome = store_recording(
                    rt.services,
                    recording,
                    source,
                    tenant,
                    worker=rt.worker,
                    lease_seconds=rt.config.jobs.lease_seconds,
                    on_chunk=lambda _n: gevent.sleep(0),
                    claimed=claimed,
                )
            finally:
                source.fileobj.close()
        except SourceIncomplete as exc:
            return self._wait_for_complete(job, exc)
        except PathRefused as exc:
            rt.refuse(exc.reason, error=exc.one_line(), call_uuid=job.call_uuid)
            if recording is not None:
                rt.services.db.record_attempt_failure(recording.id, exc.one_line(), final=True)
            return False
        except UnknownTenant as exc:
            rt.count("unknown-tenant")
            hold_for_tenant(rt, job, exc)
            rt.log.error(
                "recording",
                outcome="unknown-tenant",
                tenant=job.tenant_name,
                call_uuid=job.call_uuid,
                error=exc.one_line(),
            )
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
            rt.log.exception("job.unexpected_error", error=repr(exc))
            err = UnexpectedJobError(f"unexpected {type(exc).__name__} while storing")
            return self._retry_later(job, err)
        self._stored(job, outcome, tenant_label, started)
        return outcome.source_changed

    def _claim(self, job: Job) -> tuple[Recording | None, Recording | None, Tenant | None]:
        """The job's row (claimed when possible) and its tenant, read now (never cached).

        Returns ``(recording, claimed, tenant)``: ``claimed`` is the row when
        this worker holds its lease; ``recording`` is None for an event whose
        row is not written yet (the attempt registers it); ``tenant`` is None
        when the row is past storing (nothing to do).
        """
        rt = self.rt
        if job.recording_id is None:
            return None, None, rt.tenant(job.tenant_name or "")
        # Fast path: claim the row and read its tenant (the key as of now, so
        # rotation still takes effect at once) in one statement.
        pair = rt.services.db.claim_with_tenant(
            job.recording_id, rt.worker, rt.config.jobs.lease_seconds
        )
        if pair is not None:
            claimed, tenant = pair
            return claimed, claimed, tenant
        # Stored (finish the deletion), leased elsewhere, or gone: look at the
        # row the ordinary way.
        recording = rt.services.db.recording(job.recording_id)
        if recording.status not in ("pending", "failed", "stored"):
            return recording, None, None
        return recording, None, rt.tenant_by_id(recording.tenant_id)

    def _may_store(self, recording: Recording, source: SourceFile) -> bool:
        if recording.status not in ("pending", "failed", "stored"):
            return False
        # A stored row: only the very file that was stored may be deleted; a
        # new file at the same path is someone else's (the sweep adopts it).
        return recording.status != "stored" or (
            self.rt.config.pipeline.delete_plaintext
            and source.fingerprint == recording.source_fingerprint
        )

    def _file_gone(
        self, job: Job, recording: Recording | None, tenant: str | None, exc: InputFileError
    ) -> None:
        rt = self.rt
        if recording is not None and recording.status != "stored":
            rt.services.db.record_attempt_failure(recording.id, exc.one_line(), final=True)
            rt.count("failed")
            rt.log.error(
                "recording",
                outcome="failed",
                recording_id=recording.id,
                tenant=tenant,
                error=exc.one_line(),
            )
        elif recording is None:
            rt.count("missing-file")
            rt.log.error(
                "recording",
                outcome="missing-file",
                tenant=tenant,
                call_uuid=job.call_uuid,
                error=exc.one_line(),
            )

    def _stored(self, job: Job, outcome: StoreOutcome, tenant: str | None, started: float) -> None:
        rt = self.rt
        total = time.monotonic() - job.received
        rt.metrics.stage.labels("encrypt_upload").observe(time.monotonic() - started)
        rt.metrics.stage.labels("total").observe(total)
        result = "already-stored" if outcome.already_stored else "stored"
        rt.count(result)
        if outcome.source_changed:
            self._requeue_changed(job, tenant)
        rt.metrics.bytes.inc(outcome.plaintext_bytes)
        self.masks.on_stored(outcome, tenant)
        rt.log.info(
            "recording",
            outcome=result,
            recording_id=outcome.recording.id,
            tenant=tenant,
            call_uuid=outcome.recording.call_uuid,
            bytes=outcome.plaintext_bytes,
            encrypted_bytes=outcome.ciphertext_bytes,
            encrypt_s=round(outcome.encrypt_seconds, 4),
            total_s=round(total, 4),
            attempts=job.attempts + 1,
            plaintext_deleted=outcome.plaintext_deleted,
            origin=job.origin,
        )

    # --- when it did not work ----------------------------------------------------------

    def _wait_for_complete(self, job: Job, exc: SourceIncomplete) -> bool:
        """A WAV still being written: retry with backoff, then leave it to the sweep.

        Never counted towards ``failed``: the file is fine, just unfinished.
        After ``max_attempts`` quick retries the row stays pending with a
        later ``next_attempt_at``, so the sweep resumes it (with this tenant)
        instead of a worker waiting on it forever.
        """
        rt = self.rt
        if job.recording_id is None or job.attempts + 1 < rt.config.pipeline.max_attempts:
            return self._retry_later(job, exc)
        delay = rt.config.pipeline.retry_cap
        try:
            rt.services.db.record_attempt_failure(
                job.recording_id, exc.one_line(), final=False, retry_in=delay, audit=False
            )
        except FsrecryptError as db_exc:
            rt.log.warning("job.attempt_not_recorded", error=str(db_exc))
            return self._retry_later(job, exc, count=False)
        rt.count("incomplete")
        rt.log.warning(
            "recording",
            outcome="incomplete",
            recording_id=job.recording_id,
            tenant=job.tenant_name,
            call_uuid=job.call_uuid,
            attempts=job.attempts + 1,
            resume_in=delay,
            error=exc.one_line(),
        )
        return False

    def _requeue_changed(self, job: Job, tenant: str | None) -> None:
        """The file changed after what was read was stored: keep it and store it again.

        The plaintext was not deleted (it holds bytes that were not stored);
        a fresh job for the same path and tenant registers the file as it is
        now and stores it once it is complete and stable.
        """
        p = self.rt.config.pipeline
        again = Job(
            path=job.path,
            tenant_name=tenant,
            call_uuid=job.call_uuid,
            core_uuid=job.core_uuid,
            metadata=dict(job.metadata),
            origin="changed",
            attempts=job.attempts + 1,
        )
        delay = backoff(again.attempts, p.retry_base, p.retry_cap)
        self.rt.count("source-changed")
        self.rt.log.warning(
            "recording.source_changed",
            path=job.path,
            tenant=tenant,
            call_uuid=job.call_uuid,
            retry_in=round(delay, 2),
            hint="The plaintext was kept; it is stored again once stable.",
        )
        self.jobs.put_later(again, delay)

    def _retry_later(self, job: Job, exc: FsrecryptError, *, count: bool = True) -> bool:
        rt = self.rt
        p = rt.config.pipeline
        job.attempts += 1 if count else 0
        # Without a row (the database never took the registration) giving up
        # would leave the file to the sweep, which only knows the default
        # tenant: keep retrying at the capped interval instead.
        final = job.attempts >= p.max_attempts and job.recording_id is not None
        delay = backoff(job.attempts, p.retry_base, p.retry_cap)
        if job.recording_id is not None and count:
            try:
                rt.services.db.record_attempt_failure(
                    job.recording_id,
                    exc.one_line(),
                    final=final,
                    retry_in=next_failed_retry(rt, job) if final else delay,
                )
            except FsrecryptError as db_exc:
                # The database is (also) down: keep the schedule in memory.
                rt.log.warning("job.attempt_not_recorded", error=str(db_exc))
        if final:
            rt.count("failed")
            rt.log.error(
                "recording",
                outcome="failed",
                recording_id=job.recording_id,
                tenant=job.tenant_name,
                call_uuid=job.call_uuid,
                attempts=job.attempts,
                next_retry_in=next_failed_retry(rt, job),
                error=exc.one_line(),
            )
            return False
        if count:
            rt.metrics.retries.inc()
        rt.log.warning(
            "job.retry",
            recording_id=job.recording_id,
            attempt=job.attempts,
            retry_in=round(delay, 2),
            error=exc.one_line(),
        )
        self.jobs.put_later(job, delay)
        return True

    def _fail_final(self, job: Job, exc: FsrecryptError, tenant: str | None) -> None:
        """A failure retrying at once cannot fix (e.g. the keyring is unreadable): the row is
        ``failed``, plaintext kept, automatic retry scheduled (for the operator's fix)."""
        rt = self.rt
        retry_in = next_failed_retry(rt, job)
        if job.recording_id is not None:
            with contextlib.suppress(FsrecryptError):
                rt.services.db.record_attempt_failure(
                    job.recording_id, exc.one_line(), final=True, retry_in=retry_in
                )
        rt.count("failed")
        rt.log.error(
            "recording",
            outcome="failed",
            recording_id=job.recording_id,
            tenant=tenant,
            call_uuid=job.call_uuid,
            error=exc.one_line(),
            error_type=type(exc).__name__,
            next_retry_in=retry_in,
        )


def hold_for_tenant(rt: Runtime, job: Job, exc: UnknownTenant) -> None:
    """Keep an unknown tenant's file out of the sweep's default-tenant adoption.

    The file stays where it is; the database remembers whose it is, so a
    restarted daemon does not store it under the default tenant, and the
    sweep stores it for its own tenant once that tenant is added.
    """
    try:
        st = os.lstat(job.path)
        rt.services.db.hold_unassigned(
            source_path=job.path,
            source_fingerprint=fingerprint_of(st),
            tenant_name=job.tenant_name or "",
            reason=exc.one_line(),
            call_uuid=job.call_uuid,
            core_uuid=job.core_uuid,
            metadata=job.metadata,
        )
    except (OSError, FsrecryptError) as err:
        # Not persisted: at least this process never adopts it.
        rt.refused_paths.add(job.path)
        rt.log.warning("job.unassigned_not_recorded", path=job.path, error=str(err))


def renew_claims(rt: Runtime) -> bool:
    """Renew this daemon's claims; True when another daemon's claims ran out.

    Claims are ``[jobs] lease_seconds`` leases renewed every
    ``heartbeat_interval`` (the ``leases`` loop). A daemon killed with
    SIGKILL (or its host lost) stops renewing, so its rows' leases run out
    within one lease; the caller then sweeps at once, and any daemon seeing
    the same files takes them over.
    """
    rt.services.db.renew_claims(rt.worker, rt.config.jobs.lease_seconds)
    expired = rt.services.db.expired_claims()
    if expired:
        rt.log.info("daemon.expired_claims", rows=expired)
    return expired > 0
