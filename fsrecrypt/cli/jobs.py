"""``fsrecrypt jobs list|show|cancel|retry`` and ``worker``; ``work_or_detach`` for bulk commands.

A bulk command (``rotate``, ``verify``, ``expire``, ``erase --tenant``,
``backfill``) creates its job through its domain function, then calls
:func:`work_or_detach`: with ``--detach`` it prints the job id and returns
(``fsrecrypt worker`` processes do the work); otherwise this process works
the job itself with a progress bar (workers elsewhere may help) and gets
the finished job back, whose ``result`` is the kind's summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import ProgressBar, echo_json

if TYPE_CHECKING:  # pragma: no cover
    from fsrecrypt.db import Database
    from fsrecrypt.db.jobs import Job, JobStatus
    from fsrecrypt.pipeline import Services

F = Callable[..., Any]
JOB_ID = click.IntRange(1, 2**63 - 1)  # a PostgreSQL bigserial

detach_option: Callable[[F], F] = click.option(
    "--detach",
    is_flag=True,
    help="Create the job, print its id and return; 'fsrecrypt worker' processes do the work.",
)


def work_or_detach(services: Services, job: Job, *, detach: bool, desc: str) -> Job | None:
    """Print the job id and return None (``--detach``), or work it here and return it finished."""
    if detach:
        echo_json(
            {
                "job": job.id,
                "kind": job.kind,
                "items": job.total_items,
                "state": job.state,
                "detached": True,
                "show": f"fsrecrypt jobs show {job.id}",
            }
        )
        return None
    from fsrecrypt.jobs import run_job

    click.echo(f"job {job.id}: {job.total_items} item(s)", err=True)
    bar = ProgressBar(desc)
    try:
        return run_job(services, job.id, progress=bar)
    finally:
        bar.close()


def _database(ctx: click.Context) -> Database:
    """The database alone: ``jobs`` commands need no keys or store (and start faster)."""
    from fsrecrypt.cli import State
    from fsrecrypt.db import Database

    config = ctx.ensure_object(State).config
    return Database(
        config.database.dsn, max_connections=2, connect_timeout=config.database.connect_timeout
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def status_dict(status: JobStatus) -> dict[str, Any]:
    job = status.job
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "created_by": job.created_by,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "params": job.params,
        "counts": status.counts,
        "seconds": status.seconds,
        "rate_per_second": status.rate,
        "eta_seconds": None if status.eta_seconds is None else round(status.eta_seconds, 1),
        "first_failures": [
            {"seq": f.seq, "payload": f.payload, "message": f.message, "attempts": f.attempts}
            for f in status.first_failures
        ],
        "error": job.error,
        "result": job.result,
    }


@click.group("jobs")
def jobs_group() -> None:
    """Bulk jobs: list, show progress, cancel, retry failed items."""


@jobs_group.command("list")
@config_option
@click.option("--active", is_flag=True, help="Only creating or running jobs.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.pass_context
def jobs_list_command(ctx: click.Context, active: bool, limit: int) -> None:
    """List jobs, newest first (tab-separated: id, kind, state, items, created, by)."""
    database = _database(ctx)
    try:
        jobs = database.jobs(limit=limit, active_only=active)
    finally:
        database.close()
    for job in jobs:
        click.echo(
            "\t".join(
                str(v)
                for v in (
                    job.id,
                    job.kind,
                    job.state,
                    job.total_items,
                    job.created_at.isoformat(timespec="seconds"),
                    job.created_by,
                )
            )
        )


@jobs_group.command("show")
@config_option
@click.argument("job_id", type=JOB_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def jobs_show_command(ctx: click.Context, job_id: int, as_json: bool) -> None:
    """Show a job: counts by state, rate, ETA and the first failures."""
    database = _database(ctx)
    try:
        status = database.job_status(job_id)
    finally:
        database.close()
    if as_json:
        echo_json(status_dict(status))
        return
    job, c = status.job, status.counts
    click.echo(f"job {job.id} ({job.kind}) {job.state}, created by {job.created_by}")
    click.echo(f"params: {json.dumps(job.params, sort_keys=True)}")
    click.echo(
        f"items: {c['total']} total, {c['queued']} queued, {c['running']} running, "
        f"{c['done']} done, {c['failed']} failed, {c['skipped']} skipped"
    )
    click.echo(
        f"rate: {status.rate:.1f}/s over {_duration(status.seconds)}, "
        f"eta: {_duration(status.eta_seconds)}"
    )
    if job.error:
        click.echo(f"error: {job.error}")
    for f in status.first_failures:
        click.echo(f"FAILED #{f.seq} {json.dumps(f.payload, sort_keys=True)}: {f.message}")


@jobs_group.command("cancel")
@config_option
@click.argument("job_id", type=JOB_ID)
@click.pass_context
def jobs_cancel_command(ctx: click.Context, job_id: int) -> None:
    """Cancel a job: its queued items are no longer handed out (items in flight finish)."""
    database = _database(ctx)
    try:
        job = database.cancel_job(job_id)
    finally:
        database.close()
    echo_json({"job": job.id, "state": job.state})


@jobs_group.command("retry")
@config_option
@click.argument("job_id", type=JOB_ID)
@click.pass_context
def jobs_retry_command(ctx: click.Context, job_id: int) -> None:
    """Put a job's failed items back in the queue (a cancelled job resumes); workers take them."""
    database = _database(ctx)
    try:
        job, requeued = database.retry_job(job_id)
    finally:
        database.close()
    echo_json({"job": job.id, "state": job.state, "requeued": requeued})


@click.command("worker")
@config_option
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=None,
    help="Items worked at once (default: [jobs] concurrency).",
)
@click.pass_context
def worker_command(ctx: click.Context, concurrency: int | None) -> None:
    """Work items of every bulk job (any number, on any host; SIGTERM drains)."""
    from gevent import monkey

    monkey.patch_all()
    from fsrecrypt.cli import State
    from fsrecrypt.jobs.worker import run_worker

    ctx.exit(run_worker(ctx.ensure_object(State).config, concurrency=concurrency))
