"""Bulk jobs in PostgreSQL: a job row, its items, claiming, leases and counts.

The standard pattern (Oban, River, graphile-worker, Solid Queue): workers
claim a batch of queued items with ``FOR UPDATE SKIP LOCKED`` (so many
claimers never wait on each other) through a partial index, hold each item
under a lease they renew by a heartbeat, and whoever finds a lease run out
puts the item back in the queue. Finishing an item is a compare-and-set on
``claimed_by``, so a worker that lost its lease cannot overwrite the outcome
of the worker that took the item over; the item's *effect* is guarded by the
kind's own compare-and-set writes. Counts of finished items live in
``job_counts`` shards written in the same transaction, so ``jobs show`` reads
a handful of rows, not a million.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg2.extras import execute_values

from fsrecrypt.db.pool import Pool, translate_errors
from fsrecrypt.errors import InvalidState, NotFound

JOB_STATES = ("creating", "running", "done", "failed", "cancelled")
ITEM_STATES = ("queued", "running", "done", "failed", "skipped")
FINAL_ITEM_STATES = ("done", "failed", "skipped")
COUNT_SHARDS = 16
INSERT_BATCH = 1000
_JOB_COLUMNS = (
    "id, kind, params, state, created_by, created_at, started_at, finished_at,"
    " total_items, result, error"
)


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    params: dict[str, Any]
    state: str
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    total_items: int
    result: dict[str, Any] | None
    error: str | None

    @property
    def active(self) -> bool:
        return self.state in ("creating", "running")


@dataclass(frozen=True)
class JobItem:
    job_id: int
    seq: int
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class ItemRecord:
    """A finished (or unfinished) item as the summary and ``jobs show`` see it."""

    seq: int
    state: str
    payload: dict[str, Any]
    message: str | None
    result: dict[str, Any] | None
    attempts: int


@dataclass
class JobStatus:
    job: Job
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rate: float = 0.0
    eta_seconds: float | None = None
    first_failures: list[ItemRecord] = field(default_factory=list)

    @property
    def unfinished(self) -> int:
        return self.counts.get("queued", 0) + self.counts.get("running", 0)


def _job(row: tuple[Any, ...]) -> Job:
    return Job(
        int(row[0]),
        row[1],
        row[2] or {},
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        int(row[8]),
        row[9],
        row[10],
    )


class JobItems(Pool):
    """Claiming, leases and item outcomes (the hot path of every worker)."""

    # --- claiming and leases -------------------------------------------
    def claim_job_items(
        self, job_id: int, worker: str, *, limit: int, lease_seconds: float
    ) -> list[JobItem]:
        """Lease up to ``limit`` queued, due items of a job (``SKIP LOCKED``: never waits)."""
        with self.statement("claiming job items") as cur:
            cur.execute(
                "WITH picked AS (SELECT job_id, seq FROM job_items"
                " WHERE job_id = %s AND state = 'queued' AND available_at <= now()"
                " ORDER BY job_id, seq LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE job_items i SET state = 'running', claimed_by = %s,"
                " lease_until = now() + make_interval(secs => %s), attempts = i.attempts + 1"
                " FROM picked WHERE i.job_id = picked.job_id AND i.seq = picked.seq"
                " AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = %s"
                "  AND j.state IN ('creating', 'running'))"
                " RETURNING i.job_id, i.seq, i.payload, i.attempts",
                (job_id, limit, worker, lease_seconds, job_id),
            )
            rows = cur.fetchall()
        return sorted(
            (JobItem(int(r[0]), int(r[1]), r[2], int(r[3])) for r in rows), key=lambda i: i.seq
        )

    def renew_job_leases(
        self, worker: str, lease_seconds: float, held: list[tuple[int, int]] | None = None
    ) -> int:
        """The heartbeat: push out the leases this worker holds (only ``held`` if given).

        Naming the items (``(job_id, seq)``) means an item the worker gave up
        on (its loop died mid-batch) is not kept alive by the heartbeat: its
        lease runs out and another worker takes it.
        """
        if held is not None and not held:
            return 0
        where = "state = 'running' AND claimed_by = %s"
        params: list[Any] = [lease_seconds, worker]
        if held is not None:
            where += " AND (job_id, seq) IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))"
            params += [[j for j, _ in held], [q for _, q in held]]
        with self.statement("renewing job leases") as cur:
            cur.execute(
                "UPDATE job_items SET lease_until = now() + make_interval(secs => %s)"
                f" WHERE {where}",
                params,
            )
            return cur.rowcount

    def finish_job_item(
        self,
        item: JobItem,
        worker: str,
        state: str,
        message: str = "",
        result: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record an item's outcome; False if this worker no longer holds its lease."""
        if state not in FINAL_ITEM_STATES:
            raise ValueError(f"not a final item state: {state!r}")
        # One statement (one round trip, atomic on its own): the outcome and
        # its count, or nothing when the lease has moved on.
        with self.statement("finishing a job item") as cur:
            cur.execute(
                "WITH f AS (UPDATE job_items SET state = %s, message = %s, result = %s::jsonb,"
                " finished_at = now(), claimed_by = NULL, lease_until = NULL"
                " WHERE job_id = %s AND seq = %s AND state = 'running' AND claimed_by = %s"
                " RETURNING job_id)"
                f" INSERT INTO job_counts (job_id, shard, {state}) SELECT job_id, %s, 1 FROM f"
                f" ON CONFLICT (job_id, shard) DO UPDATE"
                f" SET {state} = job_counts.{state} + EXCLUDED.{state}",
                (
                    state,
                    message[:2000] or None,
                    None if result is None else json.dumps(dict(result), default=str),
                    item.job_id,
                    item.seq,
                    worker,
                    random.randrange(COUNT_SHARDS),  # noqa: S311 - spreads writers, no secret
                ),
            )
            return cur.rowcount == 1

    def requeue_job_item(
        self, item: JobItem, worker: str, *, delay: float, message: str = "", refund: bool = False
    ) -> bool:
        """Give an item back: after a transient failure (``delay``) or unstarted at a drain.

        ``refund`` un-counts the attempt (the item was never started).
        """
        with self.statement("re-queueing a job item") as cur:
            cur.execute(
                "UPDATE job_items SET state = 'queued', claimed_by = NULL, lease_until = NULL,"
                " attempts = attempts - CASE WHEN %s THEN 1 ELSE 0 END,"
                " available_at = now() + make_interval(secs => %s),"
                " message = coalesce(%s, message)"
                " WHERE job_id = %s AND seq = %s AND state = 'running' AND claimed_by = %s",
                (refund, delay, message[:2000] or None, item.job_id, item.seq, worker),
            )
            return cur.rowcount == 1

    def reap_job_leases(self, max_attempts: int) -> tuple[int, int]:
        """Items whose lease ran out (their worker died): back to the queue, or failed.

        An item that lost its lease ``max_attempts`` times fails (it may be
        what kills its workers). Returns ``(requeued, failed)``.
        """
        with self.transaction("taking over expired job leases") as cur:
            cur.execute(
                "UPDATE job_items SET state = CASE WHEN attempts >= %s THEN 'failed'"
                " ELSE 'queued' END,"
                " message = CASE WHEN attempts >= %s THEN 'lease lost ' || attempts"
                " || ' times (its workers died or hung)' ELSE message END,"
                " finished_at = CASE WHEN attempts >= %s THEN now() END,"
                " claimed_by = NULL, lease_until = NULL"
                " WHERE state = 'running' AND lease_until < now()"
                " RETURNING job_id, state",
                (max_attempts, max_attempts, max_attempts),
            )
            rows = cur.fetchall()
            failed: dict[int, int] = {}
            for job_id, state in rows:
                if state == "failed":
                    failed[int(job_id)] = failed.get(int(job_id), 0) + 1
            for job_id, n in failed.items():
                _bump_counts(cur, job_id, "failed", n)
        return len(rows) - sum(failed.values()), sum(failed.values())

    def job_item_holders(self, prefix: str) -> list[str]:
        """Distinct lease holders of running items whose id starts with ``prefix``."""
        with self.statement("listing job lease holders") as cur:
            cur.execute(
                "SELECT DISTINCT claimed_by FROM job_items WHERE state = 'running'"
                " AND claimed_by LIKE %s",
                (prefix.replace("%", r"\%").replace("_", r"\_") + "%",),
            )
            return [r[0] for r in cur.fetchall()]

    def release_job_items(self, holders: list[str]) -> int:
        """Re-queue every running item of these (dead) holders at once."""
        with self.statement("releasing dead workers' job items") as cur:
            cur.execute(
                "UPDATE job_items SET state = 'queued', claimed_by = NULL, lease_until = NULL"
                " WHERE state = 'running' AND claimed_by = ANY(%s)",
                (holders,),
            )
            return cur.rowcount


class Jobs(JobItems):
    """Job queries (part of :class:`fsrecrypt.db.Database`)."""

    # --- creating -----------------------------------------------------
    def create_job(self, kind: str, params: Mapping[str, Any], created_by: str) -> Job:
        with self.transaction("creating a job") as cur:
            cur.execute(
                "INSERT INTO jobs (kind, params, created_by) VALUES (%s, %s::jsonb, %s)"
                f" RETURNING {_JOB_COLUMNS}",
                (kind, json.dumps(dict(params)), created_by),
            )
            return _job(cur.fetchone())

    def add_job_items(
        self, job_id: int, payloads: Iterable[Mapping[str, Any]], *, batch: int = INSERT_BATCH
    ) -> int:
        """Insert items from any iterable, ``batch`` rows per transaction; returns how many.

        The iterable is consumed lazily (a generator over a paginated
        listing is the point): at most one batch is held in memory. Each
        batch commits on its own and bumps ``total_items``, so workers can
        start on the first items while the rest are still being listed.
        """
        added = 0
        chunk: list[str] = []
        for payload in payloads:
            chunk.append(json.dumps(dict(payload), separators=(",", ":")))
            if len(chunk) >= batch:
                added += self._insert_items(job_id, chunk)
                chunk = []
        if chunk:
            added += self._insert_items(job_id, chunk)
        return added

    def _insert_items(self, job_id: int, chunk: list[str]) -> int:
        with self.transaction("adding job items") as cur:
            cur.execute(
                "UPDATE jobs SET total_items = total_items + %s WHERE id = %s"
                " AND state = 'creating' RETURNING total_items - %s",
                (len(chunk), job_id, len(chunk)),
            )
            row = cur.fetchone()
            if row is None:
                raise InvalidState(f"job {job_id} is no longer accepting items")
            first = int(row[0])
            execute_values(
                cur,
                "INSERT INTO job_items (job_id, seq, payload) VALUES %s",
                [(job_id, first + i + 1, p) for i, p in enumerate(chunk)],
                template="(%s, %s, %s::jsonb)",
                page_size=len(chunk),
            )
        return len(chunk)

    def seal_job(self, job_id: int) -> Job:
        """All items are in: ``creating`` -> ``running`` (the job can now finish)."""
        with self.transaction("starting a job") as cur:
            cur.execute(
                "UPDATE jobs SET state = 'running', started_at = coalesce(started_at, now())"
                f" WHERE id = %s AND state = 'creating' RETURNING {_JOB_COLUMNS}",
                (job_id,),
            )
            row = cur.fetchone()
        return _job(row) if row else self.job(job_id)

    def stream_rows(
        self, query: str, params: Iterable[Any] = (), *, batch: int = 2000
    ) -> Iterator[Any]:
        """Rows of a SELECT through a server-side cursor: ``batch`` rows in memory at a time.

        For producing job items from a large table without a full list.
        The cursor holds one pooled connection until the iterator is exhausted
        or closed.
        """
        with translate_errors("listing job items"), self.connection() as conn:
            try:
                with conn.cursor(name=f"fsrecrypt_stream_{random.getrandbits(48):x}") as cur:
                    cur.itersize = batch
                    cur.execute(query, tuple(params))
                    yield from cur
            finally:
                conn.rollback()

    # --- reading ------------------------------------------------------
    def job(self, job_id: int) -> Job:
        with self.transaction("reading a job") as cur:
            cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id}", hint="List jobs with 'fsrecrypt jobs list'.")
        return _job(row)

    def jobs(self, *, limit: int = 50, active_only: bool = False) -> list[Job]:
        where = "WHERE state IN ('creating', 'running')" if active_only else ""
        with self.transaction("listing jobs") as cur:
            cur.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT %s",
                (limit,),
            )
            return [_job(r) for r in cur.fetchall()]

    def active_job_ids(self) -> list[int]:
        with self.statement("listing active jobs") as cur:
            cur.execute("SELECT id FROM jobs WHERE state IN ('creating', 'running') ORDER BY id")
            return [int(r[0]) for r in cur.fetchall()]

    def job_counts(self, job_id: int) -> dict[str, int]:
        """Items by state, from the counter shards and the small running set (no full scan)."""
        with self.transaction("counting job items") as cur:
            cur.execute(
                "SELECT j.total_items, coalesce(sum(c.done), 0), coalesce(sum(c.failed), 0),"
                " coalesce(sum(c.skipped), 0),"
                " (SELECT count(*) FROM job_items i WHERE i.state = 'running'"
                "  AND i.job_id = j.id)"
                " FROM jobs j LEFT JOIN job_counts c ON c.job_id = j.id"
                " WHERE j.id = %s GROUP BY j.id",
                (job_id,),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id}")
        total, done, failed, skipped, running = (int(v) for v in row)
        queued = max(0, total - done - failed - skipped - running)
        return {
            "total": total,
            "queued": queued,
            "running": running,
            "done": done,
            "failed": failed,
            "skipped": skipped,
        }

    def job_status(self, job_id: int, *, failures: int = 10) -> JobStatus:
        job = self.job(job_id)
        counts = self.job_counts(job_id)
        with self.transaction("reading a job's progress") as cur:
            cur.execute(
                "SELECT extract(epoch FROM coalesce(finished_at, now()) - created_at)"
                " FROM jobs WHERE id = %s",
                (job_id,),
            )
            seconds = float(cur.fetchone()[0] or 0.0)
            cur.execute(
                "SELECT seq, state, payload, message, result, attempts FROM job_items"
                " WHERE job_id = %s AND state = 'failed' ORDER BY seq LIMIT %s",
                (job_id, failures),
            )
            first = [ItemRecord(int(r[0]), r[1], r[2], r[3], r[4], int(r[5])) for r in cur]
        finished = counts["done"] + counts["failed"] + counts["skipped"]
        rate = finished / seconds if seconds > 0 else 0.0
        left = counts["queued"] + counts["running"]
        eta = None if not job.active else (left / rate if rate > 0 else None)
        return JobStatus(job, counts, round(seconds, 3), round(rate, 3), eta, first)

    def iter_job_items(self, job_id: int, *, batch: int = 2000) -> Iterator[ItemRecord]:
        """Every item of a job in order, streamed (for a kind's summary)."""
        for r in self.stream_rows(
            "SELECT seq, state, payload, message, result, attempts FROM job_items"
            " WHERE job_id = %s ORDER BY seq",
            (job_id,),
            batch=batch,
        ):
            yield ItemRecord(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]))

    # --- finishing, cancelling, retrying ---------------------------------
    def claim_job_finish(self, job_id: int, worker: str, lease_seconds: float) -> Job | None:
        """The right to write a sealed job's summary, once nothing is queued or running."""
        with self.transaction("finishing a job") as cur:
            cur.execute(
                "UPDATE jobs SET finishing_by = %s,"
                " finishing_until = now() + make_interval(secs => %s)"
                " WHERE id = %s AND state = 'running'"
                " AND (finishing_until IS NULL OR finishing_until < now() OR finishing_by = %s)"
                " AND NOT EXISTS (SELECT 1 FROM job_items WHERE job_id = %s"
                "  AND state = 'queued')"
                " AND NOT EXISTS (SELECT 1 FROM job_items WHERE job_id = %s"
                "  AND state = 'running')"
                f" RETURNING {_JOB_COLUMNS}",
                (worker, lease_seconds, job_id, worker, job_id, job_id),
            )
            row = cur.fetchone()
        return _job(row) if row else None

    def complete_job(
        self, job_id: int, worker: str, result: Mapping[str, Any], error: str | None = None
    ) -> bool:
        """Write the summary and the final state (``failed`` if any item failed)."""
        with self.transaction("completing a job") as cur:
            cur.execute(
                "UPDATE jobs SET result = %s::jsonb, error = %s, finished_at = now(),"
                " finishing_by = NULL, finishing_until = NULL,"
                " state = CASE WHEN %s IS NOT NULL OR EXISTS (SELECT 1 FROM job_items"
                "  WHERE job_id = %s AND state = 'failed') THEN 'failed' ELSE 'done' END"
                " WHERE id = %s AND state = 'running' AND finishing_by = %s",
                (json.dumps(dict(result), default=str), error, error, job_id, job_id, worker),
            )
            return cur.rowcount == 1

    def cancel_job(self, job_id: int) -> Job:
        """Stop handing out the job's queued items (items in flight finish)."""
        with self.transaction("cancelling a job") as cur:
            cur.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = now()"
                f" WHERE id = %s AND state IN ('creating', 'running') RETURNING {_JOB_COLUMNS}",
                (job_id,),
            )
            row = cur.fetchone()
        if row is None:
            job = self.job(job_id)
            raise InvalidState(
                f"job {job_id} is {job.state}, not running",
                hint="Only a creating or running job can be cancelled.",
            )
        return _job(row)

    def abandon_job(self, job_id: int, error: str) -> None:
        """A job whose items could not all be created: cancelled, with the reason."""
        with self.transaction("abandoning a job") as cur:
            cur.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = now(), error = %s"
                " WHERE id = %s AND state IN ('creating', 'running')",
                (error[:2000], job_id),
            )

    def retry_job(self, job_id: int) -> tuple[Job, int]:
        """Failed items back to the queue and the job running again; returns the count.

        A cancelled job resumes where it stopped. A job whose creation never
        finished (its command died) stays in ``creating``.
        """
        job = self.job(job_id)
        if job.state == "creating":
            raise InvalidState(
                f"job {job_id} is still being created",
                hint="Wait for its command; if that died, cancel the job and run it again.",
            )
        with self.transaction("retrying a job") as cur:
            cur.execute(
                "UPDATE job_items SET state = 'queued', attempts = 0, available_at = now(),"
                " finished_at = NULL WHERE job_id = %s AND state = 'failed'",
                (job_id,),
            )
            requeued = cur.rowcount
            if requeued:
                _bump_counts(cur, job_id, "failed", -requeued)
            cur.execute(
                "UPDATE jobs SET state = 'running', finished_at = NULL, result = NULL,"
                " error = NULL, finishing_by = NULL, finishing_until = NULL"
                f" WHERE id = %s RETURNING {_JOB_COLUMNS}",
                (job_id,),
            )
            return _job(cur.fetchone()), requeued

    def oldest_queued_age(self) -> float:
        """Seconds the oldest due queued item of an active job has waited (the lag metric)."""
        with self.statement("measuring the job lag") as cur:
            cur.execute(
                "SELECT coalesce(max(extract(epoch FROM now() - i.available_at)), 0)"
                " FROM jobs j, LATERAL (SELECT available_at FROM job_items"
                "  WHERE job_id = j.id AND state = 'queued' AND available_at <= now()"
                "  ORDER BY seq LIMIT 1) i WHERE j.state IN ('creating', 'running')"
            )
            return max(0.0, float(cur.fetchone()[0]))


def _bump_counts(cur: Any, job_id: int, state: str, n: int) -> None:
    if state not in FINAL_ITEM_STATES:
        raise ValueError(state)
    cur.execute(
        f"INSERT INTO job_counts (job_id, shard, {state}) VALUES (%s, %s, %s)"
        f" ON CONFLICT (job_id, shard) DO UPDATE"
        f" SET {state} = job_counts.{state} + EXCLUDED.{state}",
        (job_id, random.randrange(COUNT_SHARDS), n),  # noqa: S311 - spreads writers, no secret
    )
