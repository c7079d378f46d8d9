"""``fsrecrypt recordings list/show/pending`` and ``fsrecrypt retry``: the queue without psql.

An operator asks three questions: what is stored (``list``, ``show``), what
is still plaintext on disk and why (``pending``: pending and failed rows,
files whose tenant does not exist), and how to get a failed recording stored
once its cause is fixed (``retry``, audited). The queries are in
``fsrecrypt.db``; this module parses, calls and prints.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import echo_json, operator, services_for, user_option

if TYPE_CHECKING:  # pragma: no cover
    from fsrecrypt.db import Recording

STATUSES = ("pending", "stored", "failed", "discarded", "erased")
# ASCII only: no odd Unicode digits, NUL bytes or braces reach the database.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
UNASSIGNED_HINT = (
    "Add the tenant ('fsrecrypt tenants add NAME --key KEY'; the daemon then stores it), "
    "or store it for an existing tenant with 'fsrecrypt ingest --tenant TENANT PATH'."
)


ORPHAN_HINT = (
    "No event and no row names these files and no [freeswitch] default_tenant is set, so the "
    "daemon leaves them: store each with 'fsrecrypt ingest --tenant TENANT PATH' "
    "(run as the service user), or set default_tenant to have the sweep adopt them."
)


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _orphan_files(services: Any, limit: int) -> list[dict[str, Any]]:
    """Plaintext files in the recordings dirs no row covers (when no default tenant is set,
    nothing will ever adopt them).

    The same walk as the daemon's sweep (:func:`fsrecrypt.plaintext.iter_recording_files`):
    names and ``lstat`` only, symlinks not followed, no file opened.
    """
    config = services.config
    if config.freeswitch.default_tenant:
        return []  # the sweep adopts them for the default tenant
    from fsrecrypt.plaintext import fingerprint_of, iter_recording_files

    found = []
    for path, st in iter_recording_files(config.freeswitch.recordings_dirs):
        found.append((path, st))
        if len(found) >= 10 * limit:
            break
    orphans: list[dict[str, Any]] = []
    for i in range(0, len(found), 500):
        batch = found[i : i + 500]
        # A name that is not UTF-8 cannot be in the database: an orphan by definition.
        askable = [p for p, _ in batch if _utf8(p)]
        known = {(p, fp) for p, fp, _status, _id in services.db.rows_for_sources(askable)}
        held = set(services.db.unassigned_for(askable))
        for path, st in batch:
            key = (path, fingerprint_of(st))
            if key in known or key in held:
                continue
            orphans.append(
                {
                    "source_path": path,
                    "size_bytes": st.st_size,
                    "modified_at": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(),
                    "hint": ORPHAN_HINT,
                }
            )
    return orphans[:limit]


def _recording_id(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    """A recording id as the database writes it (lower-case canonical UUID), or a usage error."""
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is not None and not _UUID.fullmatch(v):
            raise click.BadParameter(f"{v[:80]!r} is not a recording id (a lower-case UUID)")
    return value


def _when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO 8601 date or time; one without a zone is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if value.isascii() else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise click.BadParameter(f"{value[:80]!r} is not an ISO 8601 date or time (2026-12-01)")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _row(rec: Recording, tenant_names: dict[str, str]) -> dict[str, Any]:
    """What an operator needs of a row; the wrapped data key is only said to be there."""
    return {
        "id": rec.id,
        "tenant": tenant_names.get(rec.tenant_id, rec.tenant_id),
        "status": rec.status,
        "call_uuid": rec.call_uuid,
        "core_uuid": rec.core_uuid,
        "source_path": rec.source_path,
        "created_at": rec.created_at.isoformat(),
        "stored_at": rec.stored_at.isoformat() if rec.stored_at else None,
        "erased_at": rec.erased_at.isoformat() if rec.erased_at else None,
        "object_key": rec.s3_path,
        "key_id": rec.kms_key_id,
        "has_wrapped_key": rec.encrypted_dek is not None,
        "file_size_bytes": rec.file_size_bytes,
        "encrypted_size_bytes": rec.encrypted_size_bytes,
        "attempts": rec.attempts,
        "last_error": rec.last_error,
        "next_attempt_at": rec.next_attempt_at.isoformat() if rec.next_attempt_at else None,
        "metadata": rec.encryption_metadata,
        "mask_verified": rec.mask_verified,
        "mask_spans": rec.mask_spans,
        "mask_acknowledged_at": rec.mask_ack_at.isoformat() if rec.mask_ack_at else None,
        "mask_acknowledged_by": rec.mask_ack_by,
    }


def _line(row: dict[str, Any]) -> str:
    error = (row["last_error"] or "").replace("\n", " ")[:120]
    fields = (row["id"], row["tenant"], row["status"], row["created_at"], row["call_uuid"] or "-")
    tail = f"\tattempts {row['attempts']}: {error}" if error else ""
    return "\t".join(fields) + f"\t{row['source_path']!r}{tail}"


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group("recordings")
def recordings_group() -> None:
    """List and inspect recordings, and what is still waiting as plaintext."""


@recordings_group.command("list")
@config_option
@click.option("--tenant", help="Only this tenant's recordings (its name).")
@click.option("--call-uuid", help="Only recordings of this call UUID.")
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Repeatable."
)
@click.option("--since", callback=_when, help="Created at or after (ISO 8601; UTC if no zone).")
@click.option("--until", callback=_when, help="Created before (ISO 8601; UTC if no zone).")
@click.option(
    "--mask",
    type=click.Choice(["unverified", "verified", "any", "none"]),
    help="By masked (PCI-paused) spans: unverified = not silent in the audio and not acknowledged.",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@json_option
@click.pass_context
def recordings_list(
    ctx: click.Context,
    tenant: str | None,
    call_uuid: str | None,
    statuses: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    mask: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List recordings, oldest first (id, tenant, status, created, call UUID, file)."""
    services = services_for(ctx)
    try:
        names = {t.id: t.name for t in services.db.tenants()}
        tenant_id = services.db.tenant_by_name(tenant).id if tenant is not None else None
        rows = services.db.recordings(
            tenant_id=tenant_id,
            call_uuid=call_uuid,
            status=statuses or None,
            created_from=since,
            created_to=until,
            limit=limit,
            mask=mask,
        )
    finally:
        services.close()
    out = [_row(r, names) for r in rows]
    if as_json:
        echo_json(out)
        return
    for row in out:
        click.echo(_line(row))


@recordings_group.command("show")
@config_option
@click.argument("recording_id", callback=_recording_id)
@json_option
@click.pass_context
def recordings_show(ctx: click.Context, recording_id: str, as_json: bool) -> None:
    """Show everything about RECORDING_ID (never key material)."""
    services = services_for(ctx)
    try:
        rec = services.db.recording(recording_id)
        row = _row(rec, {t.id: t.name for t in services.db.tenants()})
    finally:
        services.close()
    if as_json:
        echo_json(row)
        return
    for name, value in row.items():
        click.echo(f"{name}: {value if value is not None else '-'}")


@recordings_group.command("pending")
@config_option
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@json_option
@click.pass_context
def recordings_pending(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List files still waiting as plaintext: pending and failed rows, files of unknown tenants."""
    services = services_for(ctx)
    try:
        names = {t.id: t.name for t in services.db.tenants()}
        rows = services.db.recordings(status=("pending", "failed"), limit=limit)
        unassigned = services.db.unassigned_files(limit=limit)
        orphans = _orphan_files(services, limit)
    finally:
        services.close()
    waiting = [_row(r, names) for r in rows]
    files = [
        {
            "source_path": u["source_path"],
            "tenant": u["tenant_name"],
            "tenant_exists": u["tenant_exists"],
            "call_uuid": u["call_uuid"],
            "reason": u["reason"],
            "created_at": u["created_at"].isoformat(),
            "hint": None if u["tenant_exists"] else UNASSIGNED_HINT,
        }
        for u in unassigned
    ]
    if as_json:
        echo_json({"recordings": waiting, "unassigned_files": files, "orphan_files": orphans})
        return
    for row in waiting:
        click.echo(_line(row))
    for o in orphans:
        click.echo(f"orphan\t-\t{o['modified_at']}\t{o['source_path']!r}\t{o['size_bytes']} bytes")
    if orphans:
        click.echo(f"hint: {ORPHAN_HINT}", err=True)
    for f in files:
        state = "tenant added, stored at the next sweep" if f["tenant_exists"] else "no tenant"
        click.echo(f"unassigned\t{f['tenant']}\t{f['created_at']}\t{f['source_path']!r}\t{state}")
    if any(not f["tenant_exists"] for f in files):
        click.echo(f"hint: {UNASSIGNED_HINT}", err=True)
    if not waiting and not files and not orphans:
        click.echo("nothing waiting")


@recordings_group.command("ack-mask")
@config_option
@click.argument("recording_id", callback=_recording_id)
@click.option("--note", required=True, help="What was checked (kept in the audit log).")
@user_option
@click.pass_context
def recordings_ack_mask(
    ctx: click.Context, recording_id: str, note: str, user_id: str | None
) -> None:
    """Acknowledge RECORDING_ID's unverified mask: health stops alerting on it (audited)."""
    services = services_for(ctx)
    try:
        services.db.acknowledge_mask(recording_id, operator(user_id), note)
    finally:
        services.close()
    click.echo(f"acknowledged the unverified mask of {recording_id}")


@click.command("retry")
@config_option
@click.option(
    "--recording",
    "recording_ids",
    multiple=True,
    callback=_recording_id,
    help="A failed recording's id (repeatable).",
)
@click.option("--all", "all_failed", is_flag=True, help="Every failed recording.")
@user_option
@json_option
@click.pass_context
def retry_command(
    ctx: click.Context,
    recording_ids: tuple[str, ...],
    all_failed: bool,
    user_id: str | None,
    as_json: bool,
) -> None:
    """Queue failed recordings again; the daemon stores them at its next sweep (audited)."""
    from fsrecrypt.errors import InvalidState

    if bool(recording_ids) == all_failed:
        raise click.UsageError("give --recording ID (repeatable) or --all")
    services = services_for(ctx)
    try:
        if recording_ids:
            for rid in recording_ids:
                rec = services.db.recording(rid)  # NotFound names an unknown id
                if rec.status != "failed":
                    raise InvalidState(
                        f"recording {rid} is {rec.status}, not failed; nothing was changed",
                        hint="Only failed recordings are retried "
                        "('fsrecrypt recordings list --status failed').",
                    )
        queued = services.db.retry_failed(
            user_id=operator(user_id), recording_ids=list(recording_ids) or None
        )
    finally:
        services.close()
    if as_json:
        echo_json({"queued": [r.id for r in queued]})
        return
    for rec in queued:
        click.echo(f"queued {rec.id}\t{rec.source_path!r}")
    click.echo(
        f"{len(queued)} failed recording(s) queued; the daemon stores them at its next sweep"
    )
