"""``fsrecrypt backfill``: store an existing plaintext archive (``fsrecrypt.backfill``)."""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import State, config_option
from fsrecrypt.cli.helpers import ProgressBar, echo_json, operator, user_option
from fsrecrypt.cli.jobs import detach_option, work_or_detach


@click.command("backfill")
@config_option
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--tenant", "tenant", default=None, help="Store everything for this tenant.")
@click.option(
    "--tenant-from",
    "tenant_from",
    default=None,
    metavar="REGEX",
    help="Take each item's tenant from the (?P<tenant>...) group of REGEX, searched in its "
    "name below SOURCE.",
)
@click.option(
    "--call-uuid-from",
    "call_uuid_from",
    default=None,
    metavar="REGEX",
    help="Take the call UUID from REGEX's (?P<call>...) group (or group 1), searched in the "
    "name below SOURCE (default: the first UUID in the file's base name).",
)
@click.option("--keep-source", is_flag=True, help="Never remove a source file or object.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="List what would happen (one JSON line per item); change nothing.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=None,
    help="Items this command works at once (default: [jobs] concurrency).",
)
@click.option("--source-endpoint-url", default=None, help="S3 endpoint of s3:// sources.")
@click.option("--source-region", default=None, help="S3 region of s3:// sources.")
@detach_option
@user_option
@click.pass_context
def backfill_command(
    ctx: click.Context,
    sources: tuple[str, ...],
    tenant: str | None,
    tenant_from: str | None,
    call_uuid_from: str | None,
    keep_source: bool,
    dry_run: bool,
    concurrency: int | None,
    source_endpoint_url: str | None,
    source_region: str | None,
    detach: bool,
    user_id: str | None,
) -> None:
    """Encrypt an existing archive of plaintext recordings, then remove the plaintext.

    \b
    SOURCE is a directory (walked recursively, symbolic links never
    followed) or s3://BUCKET/PREFIX (every version in a versioned bucket).
    Each file or object becomes a stored recording exactly as the daemon
    stores one (same object format, tenant key, audit row with origin
    'backfill', custody fingerprint). WAV files must be complete; mp3, ogg,
    opus and flac are stored as they are; anything else is skipped and
    reported. A source is removed only after its row is stored and the
    object was read back and verified; an S3 object that changed since it
    was listed is kept and reported.

    The backfill is a job: this command works it (with a progress bar)
    unless --detach, and any 'fsrecrypt worker' may help. Kill it at any
    moment and resume with 'fsrecrypt jobs retry ID' or a worker: nothing is
    stored twice and no source goes without a stored row. Prints a JSON
    summary; exits non-zero if any item failed.
    """
    from fsrecrypt.backfill.job import BackfillRequest, start_backfill, work_backfill
    from fsrecrypt.backfill.job import dry_run as run_dry
    from fsrecrypt.backfill.naming import Naming
    from fsrecrypt.backfill.sources import S3Options
    from fsrecrypt.config import with_overrides
    from fsrecrypt.errors import ConfigError, InvalidState
    from fsrecrypt.pipeline import Services

    if dry_run and detach:
        raise ConfigError("--dry-run and --detach do not go together", hint="Drop one of them.")
    request = BackfillRequest(
        sources,
        Naming(tenant=tenant, tenant_from=tenant_from, call_uuid_from=call_uuid_from),
        keep_source=keep_source,
        s3=S3Options(source_endpoint_url, source_region),
    )
    config = ctx.ensure_object(State).config
    workers = concurrency or config.jobs.concurrency
    if workers != config.jobs.concurrency:
        # The connection pool is sized from [jobs] concurrency: one per item at once.
        config = with_overrides(config, jobs={"concurrency": workers})
    services = Services(config)
    try:
        if dry_run:
            summary = run_dry(
                services,
                request,
                lambda outcome: click.echo(json.dumps(outcome.as_dict(), default=str)),
            )
            echo_json(summary)
            return
        job = start_backfill(services, request, user_id=operator(user_id))
        if detach:
            work_or_detach(services, job, detach=True, desc="backfill")
            return
        click.echo(f"job {job.id}: {job.total_items} item(s)", err=True)
        bar = ProgressBar("backfill")
        try:
            final = work_backfill(services, job.id, progress=bar, concurrency=workers)
        finally:
            bar.close()
    finally:
        services.close()
    echo_json(final.result)
    failed = (final.result or {}).get("counts", {}).get("failed", 0)
    if final.state != "done" or failed:
        raise InvalidState(
            f"backfill job {final.id} ended {final.state} with {failed} failed item(s)"
            + (f": {final.error}" if final.error else ""),
            hint=f"See 'fsrecrypt jobs show {final.id}'; fix the cause, then "
            f"'fsrecrypt jobs retry {final.id}'.",
        )
