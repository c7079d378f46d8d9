"""``fsrecrypt erase``, ``hold add|remove|list``, ``expire``: erasing recordings, and what stops it.

The domain (``fsrecrypt.lifecycle.erase`` and ``.holds``) checks holds and
retention before it asks the ``confirm`` callback these commands pass (an
interactive question unless ``--yes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import (
    confirm_or_abort,
    echo_json,
    operator,
    services_for,
    user_option,
)
from fsrecrypt.cli.jobs import detach_option, work_or_detach


def _erase_question(recordings: Sequence[Any]) -> str:
    shown = ", ".join(r.id for r in recordings[:5]) + (" ..." if len(recordings) > 5 else "")
    return f"Permanently erase {len(recordings)} recording(s) ({shown})? This cannot be undone"


@click.command("erase")
@config_option
@click.option("--recording", "recording_id", default=None, help="Erase this recording.")
@click.option("--call", "call_uuid", default=None, help="Erase every recording of this call.")
@click.option("--tenant", "tenant_name", default=None, help="Erase every recording of a tenant.")
@click.option("--reason", required=True, help="Why (ticket, request id); kept in the receipt.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--override-retention",
    is_flag=True,
    help="Erase even inside the retention period (recorded in the audit log).",
)
@user_option
@detach_option
@click.pass_context
def erase_command(
    ctx: click.Context,
    recording_id: str | None,
    call_uuid: str | None,
    tenant_name: str | None,
    reason: str,
    yes: bool,
    override_retention: bool,
    user_id: str | None,
    detach: bool,
) -> None:
    """Permanently destroy recordings (crypto-shredding) and print a deletion receipt.

    Deletes every version of each object, destroys the wrapped data key,
    marks the row erased and keeps all audit rows. Nothing can decrypt the
    recording afterwards. Refused for recordings under legal hold, and for
    recordings inside the retention period unless --override-retention
    ([retention] days = 0 keeps recordings forever, so erasing then always
    needs the override). Running it again on erased recordings retries any
    object deletion that failed. The work is a job (one item per recording):
    --detach leaves it to 'fsrecrypt worker' processes.
    """
    from fsrecrypt.lifecycle.erase import erasure_receipt, start_erase_selected

    services = services_for(ctx)
    try:
        job = start_erase_selected(
            services,
            reason=reason,
            user_id=operator(user_id),
            recording_id=recording_id,
            call_uuid=call_uuid,
            tenant_name=tenant_name,
            override_retention=override_retention,
            confirm=None if yes else confirm_or_abort(_erase_question),
        )
        final = work_or_detach(services, job, detach=detach, desc="erase")
    finally:
        services.close()
    if final is not None:
        echo_json(erasure_receipt(final))


def _change_hold(
    ctx: click.Context,
    change: Callable[..., Any],
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    user_id: str | None,
) -> None:
    services = services_for(ctx)
    try:
        results = change(
            services,
            reason=reason,
            user_id=operator(user_id),
            recording_id=recording_id,
            call_uuid=call_uuid,
        )
    finally:
        services.close()
    echo_json(results)


@click.group("hold")
def hold_group() -> None:
    """Legal holds: recordings on hold cannot be erased or expired."""


@hold_group.command("add")
@config_option
@click.option("--recording", "recording_id", default=None, help="Hold this recording.")
@click.option("--call", "call_uuid", default=None, help="Hold every recording of this call.")
@click.option("--reason", required=True, help="Why (case or matter number).")
@user_option
@click.pass_context
def hold_add_command(
    ctx: click.Context,
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    user_id: str | None,
) -> None:
    """Place a legal hold (logged as hold_add)."""
    from fsrecrypt.lifecycle.holds import add_hold

    _change_hold(ctx, add_hold, recording_id, call_uuid, reason, user_id)


@hold_group.command("remove")
@config_option
@click.option("--recording", "recording_id", default=None, help="Release this recording.")
@click.option("--call", "call_uuid", default=None, help="Release every recording of this call.")
@click.option("--reason", required=True, help="Why the hold ends.")
@user_option
@click.pass_context
def hold_remove_command(
    ctx: click.Context,
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    user_id: str | None,
) -> None:
    """Release a legal hold (logged as hold_remove; the hold stays as history)."""
    from fsrecrypt.lifecycle.holds import remove_hold

    _change_hold(ctx, remove_hold, recording_id, call_uuid, reason, user_id)


@hold_group.command("list")
@config_option
@click.option("--tenant", "tenant_name", default=None, help="Only this tenant's holds.")
@click.pass_context
def hold_list_command(ctx: click.Context, tenant_name: str | None) -> None:
    """List active legal holds (tab-separated)."""
    from fsrecrypt.lifecycle.holds import list_holds

    services = services_for(ctx)
    try:
        holds = list_holds(services, tenant_name=tenant_name)
    finally:
        services.close()
    for h in holds:
        click.echo(
            "\t".join(
                str(h[k] or "-")
                for k in ("recording_id", "tenant", "call_uuid", "placed_at", "placed_by", "reason")
            )
        )


@click.command("expire")
@config_option
@click.option("--dry-run", is_flag=True, help="Only list what would be erased.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@user_option
@detach_option
@click.pass_context
def expire_command(
    ctx: click.Context, dry_run: bool, yes: bool, user_id: str | None, detach: bool
) -> None:
    """Erase stored recordings older than [retention] days that are not on legal hold.

    Each is erased like 'fsrecrypt erase' (logged as expire) and one receipt
    is printed. With [retention] days = 0 nothing ever expires. The work is
    a job: --detach leaves it to 'fsrecrypt worker' processes.
    """
    from fsrecrypt.lifecycle.erase import erasure_receipt, start_expiry

    services = services_for(ctx)
    try:
        report, job = start_expiry(
            services,
            user_id=operator(user_id),
            dry_run=dry_run,
            confirm=None
            if yes
            else confirm_or_abort(
                lambda expired: f"Permanently erase {len(expired)} recording(s) past retention?"
            ),
        )
        final = None
        if job is not None:
            final = work_or_detach(services, job, detach=detach, desc="expire")
            if final is None:
                return
    finally:
        services.close()
    if final is not None:
        report["receipt"] = erasure_receipt(final)
    echo_json(report)
