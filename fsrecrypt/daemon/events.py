"""From an Event Socket event to a job: classification, path vetting, refusals.

:meth:`EventHandler.on_event` runs in the ESL dispatcher greenlet for every
event. A RECORD_STOP is classified (:func:`~fsrecrypt.daemon.eslparse.classify_record_stop`),
its path vetted without opening the file, the idempotent ``pending`` row
written (so a crash keeps the event's tenant) and a :class:`~fsrecrypt.daemon.jobs.Job`
queued; :mod:`fsrecrypt.daemon.jobs` stores it. The row is written by a small
pool of intake greenlets, not by the dispatcher itself: one database round
trip per event, one event after another, capped a burst of RECORD_STOPs at
the database's latency (about 150 events/s under load) while the workers
waited for jobs. Anything refused is counted in
``fsrecrypt_refused_events`` by reason and logged as ``event.refused``; the
file is left untouched.
"""

from __future__ import annotations

from typing import Any

import gevent.pool

from fsrecrypt.daemon.eslparse import Event, RecordStop, classify_record_stop
from fsrecrypt.daemon.files import path_text_problem
from fsrecrypt.daemon.jobs import Job, JobQueue
from fsrecrypt.daemon.masks import MARK_EVENTS, MaskTracker
from fsrecrypt.daemon.runtime import Runtime
from fsrecrypt.errors import EventError, FsrecryptError, PathRefused, UnknownTenant
from fsrecrypt.plaintext import open_source, vet_path

INTAKE_CONCURRENCY = 16
"""Pending rows written at once; when all are busy the dispatcher waits (backpressure)."""


class EventHandler:
    """Turns each RECORD_STOP into a pending row and a job; one event's failure is its own."""

    def __init__(self, rt: Runtime, jobs: JobQueue) -> None:
        self.rt = rt
        self.jobs = jobs
        self.masks = MaskTracker(rt)
        self.intake = gevent.pool.Pool(INTAKE_CONCURRENCY)

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
            self.rt.count_refused("internal-error")
            self.rt.log.error(
                "event.refused",
                reason="internal-error",
                event_name=getattr(event, "name", None),
                error_type=type(exc).__name__,
                error=repr(exc)[:500],
                exc_info=exc,
            )

    def _handle_event(self, event: Event) -> None:
        """Classify one event and turn it into a row and a job."""
        rt = self.rt
        if rt.stopping.is_set():
            return
        if event.name in MARK_EVENTS:
            if self.masks.enabled:
                self.masks.on_event(event)
            return
        if event.name != "RECORD_STOP":
            return
        fs = rt.config.freeswitch
        try:
            rs = classify_record_stop(event, fs.tenant_variable, fs.consent_variable)
        except EventError as exc:
            rt.refuse("bad-event", error=str(exc))
            return
        tenant_name = rs.tenant or fs.default_tenant
        base = {"call_uuid": rs.call_uuid, "core_uuid": rs.core_uuid, "cause": rs.cause}
        problem = path_text_problem(rs.path)
        if problem is not None:
            rt.refuse("path", error=f"refusing {rs.path!r}: {problem}", **base)
            return
        if rs.sanitised:
            # Kept, not refused: the recording must still be encrypted. The
            # row says which values were altered (NUL or non-UTF-8 bytes).
            rt.log.warning("event.values_sanitised", fields=list(rs.sanitised), **base)
        metadata = _metadata(rs)
        self.masks.on_record_stop(rs, metadata)
        if rs.disposition == "remote":
            rt.count("out-of-scope")
            rt.log.info("event.out_of_scope", reason="not a local file (URL path)", **base)
            return
        if not tenant_name:
            rt.count("unknown-tenant")
            rt.log.error(
                "event.no_tenant",
                path=rs.path,
                hint="Set the channel variable or [freeswitch] default_tenant; "
                "the file was left in place.",
                **base,
            )
            return
        if rs.disposition in ("discarded", "uri-failure"):
            self._record_terminal(rs, tenant_name, metadata, base)
            return
        if not self._path_acceptable(rs.path, base):
            return
        job = Job(
            path=rs.path,
            tenant_name=tenant_name,
            call_uuid=rs.call_uuid,
            core_uuid=rs.core_uuid,
            metadata=metadata,
        )
        if job.path in self.jobs.busy:
            return  # queued, running or waiting to retry: that job stores the file
        self.intake.spawn(self._register_and_submit, job)

    def _register_and_submit(self, job: Job) -> None:
        """Write the job's row, then queue it; the job is queued whatever the row did."""
        try:
            self._register_early(job)
        except Exception as exc:  # a bug: the job registers itself (idempotently)
            self.rt.log.error(
                "event.register_failed", path=job.path, error=repr(exc)[:500], exc_info=exc
            )
        finally:
            self.jobs.submit(job)

    def finish_intake(self, timeout: float) -> None:
        """Let rows being written finish (shutdown); their jobs are then left pending."""
        self.intake.join(timeout=timeout)
        self.intake.kill(block=True, timeout=1.0)

    def _path_acceptable(self, path: str, base: dict[str, Any]) -> bool:
        """Refuse without opening: outside the directories, '..', NUL, symlinks, non-regular.

        The directories are walked by descriptor exactly as ``open_source``
        does (no name is resolved), so nothing here can be raced or looped.
        """
        try:
            vet_path(path, self.rt.config.freeswitch.recordings_dirs)
        except PathRefused as exc:
            self.rt.refuse(exc.reason, error=exc.one_line(), **base)
            return False
        except (OSError, RuntimeError, ValueError) as exc:
            # e.g. a self-looping symlink (RuntimeError from Path.resolve) or
            # a rename racing realpath (EINVAL): unresolvable means refused.
            self.rt.refuse(
                "path",
                error=f"refusing {path!r}: cannot resolve it ({type(exc).__name__})",
                **base,
            )
            return False
        return True

    def _register_early(self, job: Job) -> None:
        """Write the pending row now, so a crash before the job runs keeps the event's tenant.

        Without the row, a file whose job was lost (kill -9) could only be
        adopted by the sweep, which knows just the default tenant. Any
        failure here is left to the job, which registers (idempotently) itself.
        """
        rt = self.rt
        try:
            source = open_source(job.path, rt.config.freeswitch.recordings_dirs)
        except FsrecryptError:
            return
        try:
            # The tenant is resolved inside the INSERT (one statement, no
            # separate lookup): the key is read later, when the job claims.
            recording, _created = rt.services.db.create_pending_for_tenant_name(
                tenant_name=job.tenant_name or "",
                source_path=source.path,
                source_fingerprint=source.fingerprint,
                call_uuid=job.call_uuid,
                core_uuid=job.core_uuid,
                metadata=job.metadata,
            )
            job.recording_id = recording.id
        except FsrecryptError:
            return
        finally:
            source.fileobj.close()

    def _record_terminal(
        self, rs: RecordStop, tenant_name: str, metadata: dict[str, Any], base: dict[str, Any]
    ) -> None:
        """Discarded (FreeSWITCH deleted the file) or uri-failure (file still open): a row only.

        The fingerprint names the event, not a file (there is none to read),
        so a replayed event finds the same row and is never retried.
        """
        rt = self.rt
        discarded = rs.disposition == "discarded"
        status = "discarded" if discarded else "failed"
        fingerprint = f"{'absent' if discarded else 'uri-failure'}:{rs.core_uuid}:{rs.path}"
        error = (
            None
            if discarded
            else (
                "uri-failure: FreeSWITCH reported the recording failed before the file was "
                "closed; the file was not read and was left in place"
            )
        )
        try:
            tenant = rt.tenant(tenant_name)
            rt.services.db.create_pending(
                tenant_id=tenant.id,
                source_path=rs.path,
                source_fingerprint=fingerprint,
                call_uuid=rs.call_uuid,
                core_uuid=rs.core_uuid,
                metadata=metadata,
                status=status,
                last_error=error,
            )
        except UnknownTenant as exc:
            rt.count("unknown-tenant")
            rt.log.error("event.unknown_tenant", tenant=tenant_name, error=exc.one_line(), **base)
            return
        except FsrecryptError as exc:
            rt.log.error(
                "event.row_failed", disposition=rs.disposition, error=exc.one_line(), **base
            )
            return
        outcome = "discarded" if discarded else "uri-failure"
        rt.count(outcome)
        rt.log.info("recording", outcome=outcome, tenant=tenant_name, **base)


def _metadata(rs: RecordStop) -> dict[str, Any]:
    """The row's metadata from the event (which values were sanitised included)."""
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
    return metadata
