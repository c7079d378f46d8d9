"""The ``backfill`` job kind: items from the listing, one stored recording per item.

``start_backfill`` checks the options, then creates the job with one item
per listed file or object, streamed from the listing (never a full list in
memory). ``handle`` works one item (:class:`~fsrecrypt.backfill.item.ItemWorker`),
in the command that created the job or in any ``fsrecrypt worker``; it may
run again after a lost lease, which is safe: the item's steps are idempotent
(see :mod:`fsrecrypt.backfill.item`). ``finish`` sums the job up once and
writes one audit row. ``dry_run`` lists what would happen without creating
anything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fsrecrypt.backfill.item import ItemOutcome, ItemWorker, dead_local_process
from fsrecrypt.backfill.naming import BackfillSourceError, Naming, SourceSpec, parse_source
from fsrecrypt.backfill.sources import S3Options, SourceItem, iter_source
from fsrecrypt.db.jobs import Job
from fsrecrypt.errors import FsrecryptError
from fsrecrypt.jobs import (
    FinishedJob,
    JobContext,
    JobKind,
    JobWorker,
    Outcome,
    create_job,
    done,
    run_job,
    skipped,
)
from fsrecrypt.pipeline import Services, worker_id

REPORT_LIMIT = 100
"""Sources named per category in a summary (skipped, changed, failed); the rest are counted."""


@dataclass(frozen=True)
class BackfillRequest:
    """What ``fsrecrypt backfill`` was asked: the sources, how names map, what to keep."""

    sources: Sequence[str]
    naming: Naming
    keep_source: bool = False
    s3: S3Options = field(default_factory=S3Options)

    def specs(self) -> list[SourceSpec]:
        if not self.sources:
            raise BackfillSourceError("give at least one SOURCE")
        specs = [parse_source(s) for s in self.sources]
        self.naming.validate()
        return specs

    def params(self) -> dict[str, Any]:
        return {
            "sources": [s.label for s in self.specs()],
            "tenant": self.naming.tenant,
            "tenant_from": self.naming.tenant_from,
            "call_uuid_from": self.naming.call_uuid_from,
            "keep_source": self.keep_source,
            "source_endpoint_url": self.s3.endpoint_url,
            "source_region": self.s3.region,
        }


def _check_sources(services: Services, request: BackfillRequest) -> list[SourceSpec]:
    """Fail before any item exists: a missing directory, an unknown --tenant."""
    specs = request.specs()
    for spec in specs:
        if spec.kind == "dir":
            if not os.path.isdir(spec.root):
                raise BackfillSourceError(f"source {spec.root} is not a directory")
    if request.naming.tenant is not None:
        services.db.tenant_by_name(request.naming.tenant)
    return specs


def iter_items(request: BackfillRequest, specs: Sequence[SourceSpec]) -> Iterator[SourceItem]:
    for spec in specs:
        yield from iter_source(spec, request.naming, request.s3)


def start_backfill(services: Services, request: BackfillRequest, *, user_id: str) -> Job:
    """Create the backfill job, its items streamed from the listing.

    A sealed, unfinished backfill job with the very same parameters (a
    killed run of the same command) is resumed instead of listing again;
    one whose listing process died before the list was complete is
    cancelled (its items are a partial list) and the sources listed again.
    """
    specs = _check_sources(services, request)
    params = request.params()
    for job in services.db.jobs(limit=1000, active_only=True):
        found = dict(job.params)
        creator = str(found.pop("listed_by", ""))
        if job.kind != "backfill" or found != params:
            continue
        if job.state == "running":
            return job
        if dead_local_process(creator):  # killed while listing: its items are a partial list
            services.db.abandon_job(job.id, f"its listing process {creator} died; listed again")
    params["listed_by"] = f"{socket.gethostname()}:{os.getpid()}"
    items = (item.payload() for item in iter_items(request, specs))
    return create_job(services, "backfill", params, items, user_id=user_id)


def work_backfill(
    services: Services,
    job_id: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    concurrency: int | None = None,
) -> Job:
    """Work the job in this process, ``concurrency`` items at once; return it finished.

    Why more than one at a time: an item mostly waits (commits, fsyncs, S3
    round trips), so one process working several in threads keeps up with
    the daemon's concurrent pipeline. ``run_job`` works one loop (and writes
    the summary); helper threads run more loops under one extra
    ``JobWorker`` whose leases a heartbeat renews like ``run_job``'s own.
    """
    settings = services.config.jobs
    extra = max(0, (concurrency or settings.concurrency) - 1)
    stop = threading.Event()
    helper = JobWorker(services, settings=settings)

    def loop() -> None:
        while not stop.is_set():
            try:
                if not helper.work_batch([job_id], stop.is_set):
                    stop.wait(min(settings.poll_interval, 0.5))
            except FsrecryptError:  # the database away: run_job's loop reports it
                stop.wait(settings.poll_interval)

    def beat() -> None:
        while not stop.wait(settings.heartbeat_interval):
            with contextlib.suppress(FsrecryptError):
                helper.heartbeat()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(extra)]
    threads += [threading.Thread(target=beat, daemon=True)] if extra else []
    for thread in threads:
        thread.start()
    try:
        return run_job(services, job_id, progress=progress)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def dry_run(
    services: Services,
    request: BackfillRequest,
    on_item: Callable[[ItemOutcome], None],
) -> dict[str, Any]:
    """What a backfill would do, item by item (nothing is stored, registered or removed)."""
    specs = _check_sources(services, request)
    worker = ItemWorker(services, worker=worker_id(), dry_run=True, s3=request.s3)
    counts: dict[str, int] = {}
    for item in iter_items(request, specs):
        outcome = worker.run(item)
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        on_item(outcome)
    return {"dry_run": True, "sources": [s.label for s in specs], "counts": counts}


# --- the job kind -----------------------------------------------------------------------


def _worker(ctx: JobContext) -> ItemWorker:
    found = ctx.cache.get("backfill")
    if found is None:
        params = ctx.params
        found = ItemWorker(
            ctx.services,
            worker=ctx.worker,
            user_id=ctx.job.created_by,
            keep_source=bool(params.get("keep_source")),
            s3=S3Options(params.get("source_endpoint_url"), params.get("source_region")),
        )
        ctx.cache["backfill"] = found
    return found


def handle(ctx: JobContext, payload: dict[str, Any]) -> Outcome:
    """One item: stored (or found stored) and verified, its source removed; or why not."""
    outcome = _worker(ctx).run(SourceItem.from_payload(payload))
    result = outcome.as_dict()
    if outcome.status in ("stored", "already-stored", "would-store"):
        return done(outcome.status, **result)
    return skipped(f"{outcome.status}: {outcome.reason}", **result)


def finish(ctx: JobContext, finished: FinishedJob) -> dict[str, Any]:
    """Counts by outcome, the sources skipped, kept as changed or failed; one audit row."""
    counts: dict[str, int] = {}
    named: dict[str, list[dict[str, Any]]] = {"skipped": [], "changed": [], "failed": []}
    stored_bytes = removed = 0
    for record in finished.items():
        result = dict(record.result or {})
        status = result.get("status") or record.state
        if record.state == "failed":
            status = "failed"
        counts[status] = counts.get(status, 0) + 1
        stored_bytes += int(result.get("bytes", 0)) if status == "stored" else 0
        removed += 1 if result.get("source_removed") else 0
        if status in named and len(named[status]) < REPORT_LIMIT:
            source = result.get("source") or SourceItem.from_payload(record.payload).shown
            named[status].append({"source": source, "why": record.message})
    summary = {
        "job": finished.job.id,
        "sources": ctx.params.get("sources"),
        "items": finished.counts.get("total", 0),
        "counts": counts,
        "stored_bytes": stored_bytes,
        "sources_removed": removed,
        "keep_source": bool(ctx.params.get("keep_source")),
        **{name: entries for name, entries in named.items() if entries},
    }
    # finish may run again if its process died after writing the row: one row per job.
    written = ctx.services.db.audit_rows(action="backfill")
    if not any((row["details"] or {}).get("job") == finished.job.id for row in written):
        ctx.services.db.audit(
            action="backfill",
            user_id=finished.job.created_by,
            success=counts.get("failed", 0) == 0,
            details={
                k: summary[k] for k in ("job", "sources", "items", "counts", "sources_removed")
            },
        )
    return summary


JOB_KIND = JobKind(
    "backfill",
    handle,
    finish,
    description="store an existing plaintext archive (directory or S3 prefix), then remove it",
    max_attempts=10,
)
