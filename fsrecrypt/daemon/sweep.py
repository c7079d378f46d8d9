"""The sweep: why a kill -9, a lost event or a daemon that was down loses nothing.

At start and every ``sweep_interval`` the sweeper resumes due ``pending`` rows,
tries ``failed`` rows whose scheduled retry is due (one attempt each; a new
failure schedules the next one further out), finishes files stored but not
yet deleted (killed before the unlink), adopts finished files no row covers,
and hourly aborts orphan multipart uploads. The database, not this process's
memory, is the queue of record.

One file is never the pass's problem: an unexpected error while judging one
file (a bug, a library error on an odd name or header) refuses that file
(``fsrecrypt_refused_events{reason="internal-error"}``, ``sweep.file_failed``
with the traceback) and the pass goes on with the others. The file is
remembered with its identity (device, inode, size, mtime) and skipped until
it changes, so it neither floods the log every pass nor, counted as a failed
pass, restarts the daemon. fsrecrypt's own errors (PostgreSQL down) still end
the pass: they concern every file, and the next pass retries.
"""

from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from typing import Any

import gevent

from fsrecrypt.daemon.files import (
    open_by_others,
    path_text_problem,
    wav_complete,
)
from fsrecrypt.daemon.jobs import Job, JobQueue
from fsrecrypt.daemon.runtime import Runtime
from fsrecrypt.errors import FsrecryptError
from fsrecrypt.plaintext import fingerprint_of, is_inside, iter_recording_files

ORPHAN_UPLOAD_AGE = 3600.0
SWEEP_BATCH = 1000


CALL_UUID_LIMIT = 128


@functools.lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def call_uuid_from_name(path: str, pattern: str) -> str | None:
    """The call UUID a file's name holds, per ``[freeswitch] call_uuid_pattern``.

    Why: a file adopted by the sweep has no RECORD_STOP to name its call, but
    FreeSWITCH dialplans name recordings after the call UUID; without it the
    stored recording could not be found by call. Only the base name is
    searched (a directory named like a UUID is not the call's), and an
    overlong match is not taken.
    """
    if not pattern:
        return None
    match = _compiled(pattern).search(os.path.basename(path))
    if match is None:
        return None
    found = match.group(1) if match.re.groups else match.group(0)
    return found if found and len(found) <= CALL_UUID_LIMIT else None


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Sweeper:
    """Finds the work no event announced: due rows, unfinished deletions, orphan files."""

    def __init__(self, rt: Runtime, jobs: JobQueue) -> None:
        self.rt = rt
        self.jobs = jobs
        self._last_abort = float("-inf")
        # Files whose judgement crashed, with the identity they had then.
        self.failed_files: dict[str, tuple[int, int, int, int]] = {}
        # Directories the last pass could not list (refused once, until readable again).
        self.unreadable_dirs: set[str] = set()

    def sweep_pass(self) -> None:
        """One periodic pass (the supervisor's ``sweeper`` loop calls this)."""
        # Orphaned uploads (a crash mid-multipart) are cleaned at start and then
        # hourly; only those older than ORPHAN_UPLOAD_AGE, so a live upload of
        # another daemon sharing the bucket is never cut.
        due = time.monotonic() - self._last_abort >= ORPHAN_UPLOAD_AGE
        self.sweep(abort_uploads=due)
        if due:
            self._last_abort = time.monotonic()

    def sweep(self, *, abort_uploads: bool = False) -> dict[str, int]:
        """Resume due pending rows, finish stored-but-undeleted files, adopt orphan files."""
        rt = self.rt
        resumed = 0
        dirs = rt.config.freeswitch.recordings_dirs
        for rec in rt.services.db.due_pending(limit=SWEEP_BATCH):
            # Rows of other hosts sharing the database are theirs to resume.
            if not is_inside(Path(rec.source_path), dirs):
                continue
            job = Job(
                path=rec.source_path,
                recording_id=rec.id,
                call_uuid=rec.call_uuid,
                core_uuid=rec.core_uuid,
                origin="resume",
            )
            if self.jobs.submit(job):
                resumed += 1
        resumed += self._retry_failed()
        adopted = self._sweep_files()
        aborted = 0
        if abort_uploads:
            try:
                aborted = rt.services.store.abort_incomplete_uploads(ORPHAN_UPLOAD_AGE)
            except FsrecryptError as exc:
                rt.log.warning("sweep.abort_uploads_failed", error=exc.one_line())
        if resumed or adopted or aborted:
            rt.log.info("sweep.done", resumed=resumed, adopted=adopted, aborted_uploads=aborted)
        return {"resumed": resumed, "adopted": adopted, "aborted_uploads": aborted}

    def _retry_failed(self) -> int:
        """Submit failed rows whose automatic retry is due: one attempt each.

        The job starts at its last attempt, so a failure that persists makes
        the row ``failed`` again at once with a longer wait, instead of a new
        burst of ``max_attempts`` tries every time.
        """
        rt = self.rt
        retried = 0
        dirs = rt.config.freeswitch.recordings_dirs
        last = max(0, rt.config.pipeline.max_attempts - 1)
        for rec in rt.services.db.due_failed(limit=SWEEP_BATCH):
            if not is_inside(Path(rec.source_path), dirs):
                continue
            job = Job(
                path=rec.source_path,
                recording_id=rec.id,
                call_uuid=rec.call_uuid,
                core_uuid=rec.core_uuid,
                origin="retry",
                attempts=last,
                failed_wait=(rec.next_attempt_at - rec.updated_at).total_seconds()
                if rec.next_attempt_at is not None
                else None,
            )
            if self.jobs.submit(job):
                retried += 1
        return retried

    # --- files --------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[str, os.stat_result]]:
        """Files old enough to judge, not busy, not refused, not failed as they are now."""
        rt = self.rt
        quiet = rt.config.pipeline.quiet_period
        now = time.time()
        candidates: list[tuple[str, os.stat_result]] = []
        unreadable: set[str] = set()
        oldest: float | None = None

        def cannot_list(exc: OSError) -> None:
            where = str(exc.filename)
            unreadable.add(where)
            if where not in self.unreadable_dirs:
                rt.refuse(
                    "unreadable",
                    error=f"cannot list {where!r}: {exc.strerror}",
                    origin="sweep",
                    hint="Give the fsrecrypt service user read and search access to it.",
                )

        for path, st in iter_recording_files(rt.config.freeswitch.recordings_dirs, cannot_list):
            if path in self.jobs.busy or now - st.st_mtime < quiet:
                continue
            if path in rt.refused_paths or self.failed_files.get(path) == _identity(st):
                # refused, or it crashed the last time and has not changed since
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
                continue
            problem = path_text_problem(path)
            if problem is not None:  # refused once, then never looked at again
                rt.refused_paths.add(path)
                rt.refuse("path", error=f"refusing {path!r}: {problem}", origin="sweep")
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
                continue
            candidates.append((path, st))
            if len(candidates) % 200 == 0:
                gevent.sleep(0)
        self.unreadable_dirs = unreadable
        rt.unreadable_dirs = unreadable
        # Plaintext still on disk past the quiet period that the sweep will not
        # take (refused): the heartbeat carries the oldest, so health sees one
        # left behind. _sweep_files adds the candidates no stored row covers.
        rt.oldest_plaintext_mtime = oldest
        return candidates

    def _sweep_files(self) -> int:
        candidates = self._candidates()
        if not candidates:
            return 0
        db = self.rt.services.db
        held = open_by_others(self.rt.config.freeswitch.recordings_dirs)
        adopted = 0
        for i in range(0, len(candidates), 500):
            batch = candidates[i : i + 500]
            rows = db.rows_for_sources([p for p, _ in batch])
            known = _Known(rows, db.unassigned_for([p for p, _ in batch]))
            self._note_waiting(batch, known)
            for path, st in batch:
                try:
                    adopted += self._consider(path, st, held, known)
                except FsrecryptError:
                    raise  # an outage concerns every file: the pass fails, the next retries
                except Exception as exc:  # noqa: BLE001 - logged with its traceback there
                    self._file_failed(path, st, exc)
                else:
                    self.failed_files.pop(path, None)
            gevent.sleep(0)
        return adopted

    def _note_waiting(self, batch: list[tuple[str, os.stat_result]], known: _Known) -> None:
        """The oldest plaintext here that no stored row covers (a kept copy, with
        delete_plaintext off, is not waiting) into the heartbeat's view."""
        rt = self.rt
        for path, st in batch:
            row = known.by_key.get((path, fingerprint_of(st)))
            if row is not None and row[0] == "stored":
                continue
            if rt.oldest_plaintext_mtime is None or st.st_mtime < rt.oldest_plaintext_mtime:
                rt.oldest_plaintext_mtime = st.st_mtime

    def _file_failed(self, path: str, st: os.stat_result, exc: Exception) -> None:
        """Contain one file's unexpected error: refuse it until it changes, go on."""
        self.failed_files[path] = _identity(st)
        self.rt.count_refused("internal-error")
        self.rt.log.error(
            "sweep.file_failed",
            path=repr(path)[:300],
            error_type=type(exc).__name__,
            error=repr(exc)[:500],
            hint="The file was left in place and is skipped until it changes; "
            "the traceback is in this line.",
            exc_info=exc,
        )

    def _consider(self, path: str, st: os.stat_result, held: set[str], known: _Known) -> int:
        """Queue what this one file needs (if anything); returns 1 when it was adopted."""
        rt = self.rt
        cfg = rt.config
        if os.path.realpath(path) in held or path in known.uri_failed or path in self.jobs.busy:
            return 0
        fingerprint = fingerprint_of(st)
        row = known.by_key.get((path, fingerprint))
        if row is not None:
            status, rid = row
            if status == "stored" and cfg.pipeline.delete_plaintext:
                # Stored, then killed before the unlink: finish the job.
                self.jobs.submit(Job(path=path, recording_id=rid, origin="finish"))
            return 0
        if not wav_complete(path, cfg.freeswitch.recordings_dirs):
            return 0
        grown = known.pending_inode.get((path, f"{st.st_dev}:{st.st_ino}"))
        if grown is not None:
            self.jobs.submit(Job(path=path, recording_id=grown, origin="resume"))
            return 0
        waiting = known.unassigned.get((path, fingerprint))
        if waiting is not None:
            # Its event named a tenant: never the default one. Store it for
            # that tenant once it exists; until then leave it alone.
            if not rt.tenant_exists(waiting["tenant_name"]):
                return 0
            job = Job(
                path=path,
                tenant_name=waiting["tenant_name"],
                call_uuid=waiting["call_uuid"]
                or call_uuid_from_name(path, cfg.freeswitch.call_uuid_pattern),
                core_uuid=waiting["core_uuid"],
                metadata={**waiting["metadata"], "assigned_by": "sweep"},
                origin="sweep",
            )
            return self._adopt(job)
        if not cfg.freeswitch.default_tenant:
            rt.log.warning(
                "sweep.orphan_without_tenant",
                path=path,
                hint="Set [freeswitch] default_tenant to adopt it.",
            )
            return 0
        job = Job(
            path=path,
            tenant_name=cfg.freeswitch.default_tenant,
            call_uuid=call_uuid_from_name(path, cfg.freeswitch.call_uuid_pattern),
            metadata={"adopted_by": "sweep"},
            origin="sweep",
        )
        return self._adopt(job)

    def _adopt(self, job: Job) -> int:
        if not self.jobs.submit(job):
            return 0
        self.rt.metrics.swept.inc()
        return 1


class _Known:
    """What the database knows about one batch of files, indexed for the per-file checks."""

    def __init__(self, rows: list[Any], unassigned: dict[Any, Any]) -> None:
        self.by_key = {(p, fp): (status, rid) for p, fp, status, rid in rows}
        # A pending row whose file grew since it was registered (its event
        # came while the WAV was being written) is still that row's file.
        self.pending_inode = {
            (p, ":".join(fp.split(":")[:2])): rid
            for p, fp, status, rid in rows
            if status == "pending"
        }
        self.uri_failed = {p for p, fp, _status, _rid in rows if fp.startswith("uri-failure:")}
        self.unassigned = unassigned
